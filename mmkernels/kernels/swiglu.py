"""Triton SwiGLU: out = silu(gate) * up, and its backward recomputing silu instead of saving it."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    d = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (d * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (d * silu).to(DU.dtype.element_ty), mask=mask)


def _grid(n: int):
    block = 1024
    return (triton.cdiv(n, block),), block


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: contiguous, same shape."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        grid, block = _grid(n)
        _swiglu_fwd_kernel[grid](gate, up, out, n, BLOCK=block, num_warps=4)
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        grid, block = _grid(n)
        _swiglu_bwd_kernel[grid](dout, gate, up, dgate, dup, n, BLOCK=block, num_warps=4)
    return dgate, dup
