"""LLaMA-Adapter V2's output-form epilogue of a frozen linear: out = (y + bias) * scale per channel of the
last dim, y the GEMM's output (computed in float32, or float64 for float64 y)."""

from __future__ import annotations

from typing import Tuple

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def scale_bias(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    acc = _acc(y)
    return ((y.to(acc) + bias.to(acc)) * scale.to(acc)).to(out_dtype)


def scale_bias_backward(dout: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d y in y's dtype, d scale and d bias in float32 (float64), summed over the rows)."""
    acc = _acc(y)
    g = dout.to(acc)
    g_pre = g * scale.to(acc)
    rows = tuple(range(y.dim() - 1))
    return g_pre.to(y.dtype), (g * (y.to(acc) + bias.to(acc))).sum(rows), g_pre.sum(rows)
