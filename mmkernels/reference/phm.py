"""PHM layer and Compacter adapter (METHODS.md section 5) in plain PyTorch, never materialising W.

Layout (the `adapters` library's PHMLayer, so its weights load 1:1):
    rule  (n, n, n)       rule[i] = A_i, the "phm rule" (shared across layers by Compacter)
    s     (n, d_in/n, r)  the library's W_left  (B_i = s[i] @ t[i], of rank r)
    t     (n, r, d_out/n) the library's W_right
    bias  (d_out,)        the library's b
    W = sum_i kron(A_i, B_i)  (d_in, d_out) and the layer computes y = x @ W + bias (x @ W, not x @ W^T).

Factorised: with x split into n blocks X_p of d_in/n features,
    z[p, i] = X_p s_i  (r values),   u[q, i] = sum_p A_i[p, q] z[p, i],   y_q = sum_i u[q, i] t_i + bias_q,
O(n r (d_in + d_out)) per row instead of O(d_in d_out).

Adapter: y = x + PHM_up(gelu(PHM_down(x))), exact (erf) GELU as the library's "gelu".

The math runs in the input dtype (each product rounded as an eager PyTorch model rounds it), float64 for
the oracle. `phm_adapter_backward` is the explicit gradient, the spec of the fused backward kernel.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F


def _dims(x2d: Tensor, rule: Tensor, s: Tensor, t: Tensor) -> Tuple[int, int, int, int]:
    n, r = rule.shape[0], s.shape[2]
    return x2d.shape[0], n, r, t.shape[2] * n


def _phm_parts(x2d: Tensor, rule: Tensor, s: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """x2d (M, d_in) -> (z (M, n_p, n_i, r), u (M, n_q, n_i, r), y without bias (M, d_out))."""
    m, n, r, d_out = _dims(x2d, rule, s, t)
    z = torch.einsum("mpa,iar->mpir", x2d.reshape(m, n, -1), s)
    u = torch.einsum("ipq,mpir->mqir", rule, z)
    y = torch.einsum("mqir,irb->mqb", u, t).reshape(m, d_out)
    return z, u, y


def phm_linear(x: Tensor, rule: Tensor, s: Tensor, t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """One PHM layer: x (..., d_in) -> x @ sum_i kron(A_i, s_i t_i) + bias, (..., d_out)."""
    d_in = x.shape[-1]
    _, _, y = _phm_parts(x.reshape(-1, d_in), rule, s, t)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


def phm_linear_backward(dy: Tensor, x2d: Tensor, rule: Tensor, s: Tensor, t: Tensor,
                        z: Tensor, u: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_rule, ds, dt, d_bias) of one PHM layer, given its saved z and u (see _phm_parts).

        du[q,i] = dy_q t_i^T,  dt_i = sum_{m,q} u[q,i]^T dy_q,  dA_i[p,q] = sum_m z[p,i] . du[q,i],
        dz[p,i] = sum_q A_i[p,q] du[q,i],  ds_i = sum_{m,p} X_p^T dz[p,i],  dX_p = sum_i dz[p,i] s_i^T."""
    m, n, _, d_out = _dims(x2d, rule, s, t)
    dyb = dy.reshape(m, n, d_out // n)
    du = torch.einsum("mqb,irb->mqir", dyb, t)
    dt = torch.einsum("mqir,mqb->irb", u, dyb)
    d_rule = torch.einsum("mpir,mqir->ipq", z, du)
    dz = torch.einsum("ipq,mqir->mpir", rule, du)
    xb = x2d.reshape(m, n, -1)
    ds = torch.einsum("mpa,mpir->iar", xb, dz)
    dx = torch.einsum("mpir,iar->mpa", dz, s).reshape(m, -1)
    return dx, d_rule, ds, dt, dy.sum(0)


def gelu_grad(h: Tensor) -> Tensor:
    """d gelu(h) / dh = Phi(h) + h phi(h) for the exact (erf) GELU."""
    return 0.5 * (1.0 + torch.erf(h * (1.0 / math.sqrt(2.0)))) + h * torch.exp(-0.5 * h * h) / math.sqrt(2.0 * math.pi)


def phm_adapter(x: Tensor, rule_down: Tensor, s_down: Tensor, t_down: Tensor, b_down: Tensor,
                rule_up: Tensor, s_up: Tensor, t_up: Tensor, b_up: Tensor) -> Tensor:
    """y = x + PHM_up(gelu(PHM_down(x))); x (..., d) -> (..., d), hidden k = t_down.shape[2] * n."""
    d = x.shape[-1]
    x2d = x.reshape(-1, d)
    h = phm_linear(x2d, rule_down, s_down, t_down, b_down)
    y = x2d + phm_linear(F.gelu(h), rule_up, s_up, t_up, b_up)
    return y.reshape(x.shape)


def phm_adapter_backward(dy: Tensor, x: Tensor, rule_down: Tensor, s_down: Tensor, t_down: Tensor, b_down: Tensor,
                         rule_up: Tensor, s_up: Tensor, t_up: Tensor, b_up: Tensor) -> Tuple[Tensor, ...]:
    """(dx, d_rule_down, ds_down, dt_down, db_down, d_rule_up, ds_up, dt_up, db_up) for dy = dL/dy.

    Recomputes the forward from x (nothing but x is saved): h = PHM_down(x), g = gelu(h), then
    dg = PHM_up^T(dy), dh = dg * gelu'(h), dx = dy + PHM_down^T(dh)."""
    d = x.shape[-1]
    x2d, dy2d = x.reshape(-1, d), dy.reshape(-1, d)
    z_d, u_d, h = _phm_parts(x2d, rule_down, s_down, t_down)
    h = h + b_down
    g = F.gelu(h)
    z_u, u_u, _ = _phm_parts(g, rule_up, s_up, t_up)
    dg, d_rule_up, ds_up, dt_up, db_up = phm_linear_backward(dy2d, g, rule_up, s_up, t_up, z_u, u_u)
    dh = dg * gelu_grad(h)
    dx, d_rule_down, ds_down, dt_down, db_down = phm_linear_backward(dh, x2d, rule_down, s_down, t_down, z_d, u_d)
    dx = (dy2d + dx).reshape(x.shape)
    return dx, d_rule_down, ds_down, dt_down, db_down, d_rule_up, ds_up, dt_up, db_up


def kron_weight(rule: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """W = sum_i kron(A_i, s_i t_i) (d_in, d_out), materialised. For tests and the benchmark's peer-style
    formulation only: the layers above never build it."""
    b = torch.bmm(s, t)  # (n, d_in/n, d_out/n)
    n, p, q = b.shape
    return (rule[:, :, None, :, None] * b[:, None, :, None, :]).sum(0).reshape(n * p, n * q)
