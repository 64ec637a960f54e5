"""Mixture-of-modality adapter (LaVIN's MMA, METHODS.md section 3): the executable spec.

    x_hat = x                                         (or rms_norm(x) * norm_weight, kept in float32)
    u     = x_hat A^T + a                             A (h, d), a (h,)
    y     = x_hat + s * (w0 (B u + b) + w1 (D u + d_b))

per sample, with router weights w = (w0, w1) of that sample. B and D are grouped up-projections stored as
(d, h / G): output channel c of group g = c // (d / G) reads u[g h/G : (g+1) h/G]. This is exactly the weight
of a grouped 1x1 nn.Conv1d(h, d, 1, groups=G) (weight (d, h/G, 1)), which is how LaVIN stores them:
conv_B.weight[:, :, 0] == B, conv_B.bias == b, conv_A.weight[:, :, 0] == A.

Everything is computed in float32 (float64 for float64 inputs) and y is rounded once to x's dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_grouped(weight: Tensor, hidden: int) -> Tensor:
    """(d, h/G) grouped weight -> the dense (d, h) matrix it stands for (zeros outside each channel's group)."""
    d, per = weight.shape
    groups = hidden // per
    full = weight.new_zeros(groups, d // groups, groups, per)
    grouped = weight.view(groups, d // groups, per)
    for g in range(groups):
        full[g, :, g] = grouped[g]
    return full.view(d, hidden)


def compress_grouped(full: Tensor, groups: int) -> Tensor:
    """The inverse of expand_grouped: (d, h) -> (d, h/G), keeping each channel's group columns."""
    d, hidden = full.shape
    per = hidden // groups
    blocks = full.view(groups, d // groups, groups, per)
    return torch.stack([blocks[g, :, g] for g in range(groups)]).view(d, per)


def _normed(x: Tensor, norm_weight: Optional[Tensor], eps: float) -> Tuple[Tensor, Optional[Tensor]]:
    xf = x.to(_acc(x))
    if norm_weight is None:
        return xf, None
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf * rstd * norm_weight.to(xf.dtype), rstd.squeeze(-1)


def mom_adapter_fwd(x: Tensor, A: Tensor, a: Tensor, B: Tensor, b: Tensor, D: Tensor, d_b: Tensor, router_w: Tensor,
                    scale: float, norm_weight: Optional[Tensor] = None, eps: float = 1e-6, dropout: float = 0.0,
                    training: bool = False) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """x (batch, T, d), router_w (batch, 2) -> (y (batch, T, d) in x's dtype, u (batch, T, h) in the compute
    dtype, rstd (batch, T) or None). Differentiable by autograd."""
    acc = _acc(x)
    hidden = A.shape[0]
    xh, rstd = _normed(x, norm_weight, eps)
    u = torch.nn.functional.dropout(xh @ A.to(acc).t() + a.to(acc), dropout, training)
    w = router_w.to(acc)[:, None, :]
    up_b = u @ expand_grouped(B.to(acc), hidden).t() + b.to(acc)
    up_d = u @ expand_grouped(D.to(acc), hidden).t() + d_b.to(acc)
    y = xh + scale * (w[..., :1] * up_b + w[..., 1:] * up_d)
    return y.to(x.dtype), u, rstd


def mom_adapter(x: Tensor, A: Tensor, a: Tensor, B: Tensor, b: Tensor, D: Tensor, d_b: Tensor, router_w: Tensor,
                scale: float = 1.0, norm_weight: Optional[Tensor] = None, eps: float = 1e-6, dropout: float = 0.0,
                training: bool = False) -> Tensor:
    """y (batch, T, d). `dropout` on u (LaVIN's training) exists only here: the fused kernel has none
    (nn.MoMAdapter routes training with dropout > 0 to this function)."""
    return mom_adapter_fwd(x, A, a, B, b, D, d_b, router_w, scale, norm_weight, eps, dropout, training)[0]


def mom_adapter_backward(dy: Tensor, x: Tensor, u: Tensor, rstd: Optional[Tensor], A: Tensor, a: Tensor, B: Tensor,
                         b: Tensor, D: Tensor, d_b: Tensor, router_w: Tensor, scale: float,
                         norm_weight: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
    """(dx, dA, da, dB, db, dD, dd_b, drouter_w, dnorm_weight or None), each in its input's dtype.

    du = s dy (w0 B_full + w1 D_full);  dx_hat = dy + du A;  dA = du^T x_hat;  da = sum du;
    dB = s sum_b w0_b (dy_b^T u_b) restricted to the groups (dD with w1);  db = s sum_b w0_b sum_t dy;
    dw0_b = s sum_t dy . (B u + b) (dw1_b with D);  with the norm: the RMSNorm backward of dx_hat."""
    acc = _acc(x)
    hidden, groups = A.shape[0], A.shape[0] // B.shape[1]
    dyf, uf = dy.to(acc), u.to(acc)
    w = router_w.to(acc)
    xf = x.to(acc)
    if norm_weight is None:
        xh = xf
    else:
        xn = xf * rstd.to(acc)[..., None]
        xh = xn * norm_weight.to(acc)
    bf, df = expand_grouped(B.to(acc), hidden), expand_grouped(D.to(acc), hidden)
    dub, dud = dyf @ bf, dyf @ df                              # (batch, T, h)
    du = scale * (w[:, None, :1] * dub + w[:, None, 1:] * dud)
    dxh = dyf + du @ A.to(acc)
    d_a_w = torch.einsum("btk,btc->kc", du, xh)
    d_a_b = du.sum((0, 1))
    per_sample = torch.einsum("btc,btk->bck", dyf, uf)          # (batch, d, h)
    col = dyf.sum(1)                                            # (batch, d)
    d_b_w = compress_grouped(scale * torch.einsum("b,bck->ck", w[:, 0], per_sample), groups)
    d_d_w = compress_grouped(scale * torch.einsum("b,bck->ck", w[:, 1], per_sample), groups)
    d_b_b = scale * (w[:, :1] * col).sum(0)
    d_d_b = scale * (w[:, 1:] * col).sum(0)
    dw0 = scale * ((dub * uf).sum((1, 2)) + col @ b.to(acc))
    dw1 = scale * ((dud * uf).sum((1, 2)) + col @ d_b.to(acc))
    d_router = torch.stack([dw0, dw1], -1)
    d_norm = None
    if norm_weight is None:
        dx = dxh
    else:
        r = rstd.to(acc)[..., None]
        g = dxh * norm_weight.to(acc)
        dx = r * (g - xn * (g * xn).mean(-1, keepdim=True))
        d_norm = (dxh * xn).sum((0, 1)).to(norm_weight.dtype)
    return (dx.to(x.dtype), d_a_w.to(A.dtype), d_a_b.to(a.dtype), d_b_w.to(B.dtype), d_b_b.to(b.dtype),
            d_d_w.to(D.dtype), d_d_b.to(d_b.dtype), d_router.to(router_w.dtype), d_norm)
