"""Dynamic expert (HyperLLaVA): a bottleneck adapter whose weights are given per sample.

    swiglu:            hidden = silu(x W_g) * (x W_u),  [W_g | W_u] = w_down (B, d_in, 2h)
    gelu / silu / relu: hidden = act(x W_d),             W_d = w_down (B, d_in, h)
    y = residual + hidden @ w_up                          w_up (B, h, d_out); residual (B, T, d_out) or 0

x (B, T, d_in). The two products are batched matmuls in the input dtype; the activation runs in float32
(float64 for float64 inputs) and `hidden` is rounded to the input dtype before the up product; the residual
add is done in float32 and rounded once. gelu is the exact (erf) form, as nn.GELU().
Custom-op implementations run with autograd off, so the backward here is explicit formulas.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

ACTIVATIONS: Tuple[str, ...] = ("swiglu", "gelu", "silu", "relu")


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def bottleneck(activation: str, down_cols: int) -> int:
    """h from the number of w_down columns: 2h for swiglu (gate, then up), h otherwise."""
    return down_cols // 2 if activation == "swiglu" else down_cols


def activate(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """pre (B, T, 2h or h) in the accumulation dtype -> hidden (B, T, h)."""
    if activation == "swiglu":
        h = pre.shape[-1] // 2
        g, u = pre[..., :h], pre[..., h:]
        return g * torch.sigmoid(g) * u
    if activation == "gelu":
        return 0.5 * pre * (1.0 + torch.erf(pre / math.sqrt(2.0)))
    if activation == "silu":
        return pre * torch.sigmoid(pre)
    if activation == "relu":
        return pre.clamp_min(0)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def activate_backward(dhidden: torch.Tensor, pre: torch.Tensor, activation: str) -> torch.Tensor:
    """d pre (B, T, 2h or h) from d hidden (B, T, h); both in the accumulation dtype."""
    if activation == "swiglu":
        h = pre.shape[-1] // 2
        g, u = pre[..., :h], pre[..., h:]
        sig = torch.sigmoid(g)
        return torch.cat([dhidden * u * sig * (1 + g * (1 - sig)), dhidden * g * sig], dim=-1)
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(pre / math.sqrt(2.0)))
        pdf = torch.exp(-0.5 * pre * pre) / math.sqrt(2.0 * math.pi)
        return dhidden * (cdf + pre * pdf)
    if activation == "silu":
        sig = torch.sigmoid(pre)
        return dhidden * sig * (1 + pre * (1 - sig))
    if activation == "relu":
        return dhidden * (pre > 0).to(dhidden.dtype)
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")


def _hidden(x: torch.Tensor, w_down: torch.Tensor, activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(pre in the accumulation dtype, hidden rounded to x's dtype)."""
    pre = torch.bmm(x, w_down).to(_acc(x))
    return pre, activate(pre, activation).to(x.dtype)


def dynamic_expert(x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
                   residual: Optional[torch.Tensor] = None, activation: str = "swiglu") -> torch.Tensor:
    """y (B, T, d_out) in x's dtype; see the module docstring. Differentiable by autograd as well."""
    _, hidden = _hidden(x, w_down, activation)
    y = torch.bmm(hidden, w_up)
    if residual is None:
        return y
    acc = _acc(x)
    return (y.to(acc) + residual.to(acc)).to(x.dtype)


def dynamic_expert_backward(dy: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor,
                            activation: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx (B, T, d_in), d w_down (B, d_in, 2h or h), d w_up (B, h, d_out)), each in its input's dtype.

    d w_up = hidden^T dy;  d pre = act'(pre) (dy w_up^T);  dx = d pre w_down^T;  d w_down = x^T d pre.
    The residual's gradient is dy itself."""
    pre, hidden = _hidden(x, w_down, activation)
    d_w_up = torch.bmm(hidden.transpose(1, 2), dy)
    dhidden = torch.bmm(dy, w_up.transpose(1, 2)).to(pre.dtype)
    dpre = activate_backward(dhidden, pre, activation).to(x.dtype)
    dx = torch.bmm(dpre, w_down.transpose(1, 2))
    d_w_down = torch.bmm(x.transpose(1, 2), dpre)
    return dx, d_w_down, d_w_up
