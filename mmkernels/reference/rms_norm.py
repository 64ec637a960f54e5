"""RMSNorm, optionally fused with the residual add: the executable spec.

    h = x + residual (in x's dtype; h = x without a residual)
    y = h / sqrt(mean(h^2) + eps) * weight       (computed in float32, cast to x's dtype)
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual: Optional[torch.Tensor] = None
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """y, or (y, h) when `residual` is given. x, residual: (..., N); weight: (N,)."""
    h = x if residual is None else x + residual
    hf = h.float() if h.dtype != torch.float64 else h
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    y = (hf * rstd * weight.to(hf.dtype)).to(x.dtype)
    return y if residual is None else (y, h)


def rms_norm_rstd(h: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(h^2) + eps) per row, float32 (float64 for float64 input). h: (M, N) -> (M,)."""
    hf = h.float() if h.dtype != torch.float64 else h
    return torch.rsqrt(hf.pow(2).mean(-1) + eps)


def rms_norm_backward(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh_extra: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of y = h * rstd * w: (dh, dw). h, dy: (M, N); rstd: (M,).

    xhat = h * rstd, g = dy * w:  dh = rstd * (g - xhat * mean(g * xhat)),  dw = sum_rows(dy * xhat).
    `dh_extra` is a gradient arriving at h from elsewhere (the residual stream) and is added to dh.
    """
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    hf, dyf, wf = h.to(acc), dy.to(acc), weight.to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    xhat = hf * r
    g = dyf * wf
    dh = r * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh_extra is not None:
        dh = dh + dh_extra.to(acc)
    dw = (dyf * xhat).sum(0)
    return dh.to(h.dtype), dw.to(weight.dtype)
