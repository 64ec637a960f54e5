"""PaCA (Partial Connection Adaptation): train r chosen input columns of a frozen linear layer.

    W_eff[:, I] = W[:, I] + s * delta        W (d_out, d_in), I: r sorted column indices, delta (d_out, r)
    y = x W_eff^T (+ bias);   dx = dy W_eff;   d_delta = s * dy^T x_I   (x_I = x[..., I], fp32 accumulation)

The forward keeps only x_I (tokens x r) for the backward. W_eff lives in the weight buffer: its r columns are
rewritten once per optimizer step (`sync_columns`) from the kept original columns.
Custom-op implementations run with autograd off, so the backward here is explicit formulas.
"""

from __future__ import annotations

import zlib
from typing import Optional, Tuple

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def layer_seed(name: str, seed: int = 0) -> int:
    """A stable 32-bit seed for one layer: crc32 of its name, started from the user seed (taken mod 2**32).

    Stable across processes and Python versions (unlike hash()). For one name, distinct user seeds give
    distinct layer seeds (a CRC maps its start value one-to-one). 32 bits because torch's CPU generator
    reads only the low 32 bits of its seed."""
    return zlib.crc32(name.encode("utf-8"), int(seed) % (1 << 32))


def select_columns(d_in: int, r: int, seed: int) -> torch.Tensor:
    """r distinct input-column indices in [0, d_in), uniformly at random, sorted ascending (int64, CPU).

    Deterministic in `seed` (a CPU torch.Generator, so the same on every machine)."""
    if not isinstance(d_in, int) or d_in < 1:
        raise ValueError(f"d_in: expected a positive integer, got {d_in!r}")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= d_in:
        raise ValueError(f"r: expected an integer in [1, {d_in}] (d_in), got {r!r}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(d_in, generator=gen)[:r].sort().values


def gather_columns(x2d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x_I: (M, d_in) -> (M, r), the selected columns, contiguous, in x's dtype."""
    return x2d.index_select(1, idx.long())


def scatter_delta(weight: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + s * scatter(delta): the effective weight, out of place, in the wider of the two dtypes."""
    dtype = torch.promote_types(weight.dtype, delta.dtype)
    w = weight.to(dtype).clone()
    w[:, idx.long()] += scaling * delta.to(dtype)
    return w


def synced_columns(orig_cols: torch.Tensor, delta: torch.Tensor, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """orig + s * delta computed in fp32 (fp64 for fp64 weights) and rounded once to `dtype`."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return (orig_cols.to(acc) + scaling * delta.to(acc)).to(dtype)


def sync_columns(weight: torch.Tensor, orig_cols: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor,
                 scaling: float) -> None:
    """In place: W[:, I] = orig + s * delta (see synced_columns)."""
    with torch.no_grad():
        weight[:, idx.long()] = synced_columns(orig_cols, delta, scaling, weight.dtype)


def paca_linear(x2d: torch.Tensor, weight_eff: torch.Tensor, idx: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: (y = x W_eff^T + bias (M, d_out), x_I (M, r)). `weight_eff` already holds the synced columns."""
    return torch.nn.functional.linear(x2d, weight_eff, bias), gather_columns(x2d, idx)


def delta_grad(dy2d: torch.Tensor, x_i: torch.Tensor, scaling: float) -> torch.Tensor:
    """d_delta = s * dy^T x_I: (M, d_out), (M, r) -> (d_out, r) in float32 (float64 for float64 inputs)."""
    acc = _acc(dy2d)
    return (dy2d.to(acc).t() @ x_i.to(acc)) * scaling


def paca_linear_backward(dy2d: torch.Tensor, x_i: torch.Tensor, weight_eff: torch.Tensor,
                         scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx = dy W_eff in x's dtype, d_delta = s dy^T x_I in float32 / float64)."""
    return dy2d @ weight_eff, delta_grad(dy2d, x_i, scaling)
