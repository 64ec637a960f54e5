"""phm_adapter: the Compacter bottleneck adapter y = x + PHM_up(gelu(PHM_down(x))), fused.

A PHM layer computes x @ W + bias with W = sum_i kron(A_i, s_i t_i), never materialised:
    z[p, i] = X_p s_i,   u[q, i] = sum_p A_i[p, q] z[p, i],   y_q = sum_i u[q, i] t_i + bias_q
(x split into n blocks X_p). Parameter layout = the `adapters` library's PHMLayer (so its weights load 1:1):

    rule_down, rule_up  (n, n, n)      the "phm rule", rule[i] = A_i (one tensor may serve both, and all layers)
    s_down              (n, d/n, r)    library: adapter_down.0.W_left
    t_down              (n, r, k/n)    library: adapter_down.0.W_right
    b_down              (k,)           library: adapter_down.0.b
    s_up                (n, k/n, r)    library: adapter_up.W_left
    t_up                (n, r, d/n)    library: adapter_up.W_right
    b_up                (d,)           library: adapter_up.b

GELU is the exact (erf) form, the library's "gelu". The forward saves only x; the backward recomputes the
bottleneck and GELU (see kernels/phm.py). Gradients flow to x and all eight parameters (a rule passed as both
rule_down and rule_up receives the sum of both gradients through autograd).

The triton kernels take n * n * rank <= MAX_TRITON_RULE_WIDTH (128; the paper's n = 4, rank 1 is 16); beyond
it the automatic choice runs the reference, and a forced triton backend raises.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import phm as ref

__all__ = ["phm_adapter", "phm_linear"]

OP = "phm_adapter"
backend.register_op(OP, ("triton", "reference"))
MAX_TRITON_RULE_WIDTH = 128  # wider rule tiles do not fit Hopper's shared memory (kernels/phm.py _config)


@torch.library.custom_op("mmkernels::phm_adapter_fwd", mutates_args=())
def phm_adapter_fwd(x: Tensor, rule_down: Tensor, s_down: Tensor, t_down: Tensor, b_down: Tensor, rule_up: Tensor,
                    s_up: Tensor, t_up: Tensor, b_up: Tensor, impl: str) -> Tensor:
    """x (M, d) -> y (M, d)."""
    args = (rule_down, s_down, t_down, b_down, rule_up, s_up, t_up, b_up)
    if impl == "triton" and x.dtype != torch.float64:  # float64 runs the reference math (kernels: fp32)
        from mmkernels.kernels import phm as kernels

        return kernels.phm_adapter_fwd(x, *args)
    return ref.phm_adapter(x, *args)


@torch.library.custom_op("mmkernels::phm_adapter_bwd", mutates_args=())
def phm_adapter_bwd(dy: Tensor, x: Tensor, rule_down: Tensor, s_down: Tensor, t_down: Tensor, b_down: Tensor,
                    rule_up: Tensor, s_up: Tensor, t_up: Tensor, b_up: Tensor, impl: str) -> Tuple[
                        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_rule_down, ds_down, dt_down, db_down, d_rule_up, ds_up, dt_up, db_up), each in its input's dtype."""
    if impl == "triton" and x.dtype != torch.float64:
        from mmkernels.kernels import phm as kernels

        grads = kernels.phm_adapter_bwd(dy, x, rule_down, s_down, t_down, b_down, rule_up, s_up, t_up)
    else:
        grads = ref.phm_adapter_backward(dy, x, rule_down, s_down, t_down, b_down, rule_up, s_up, t_up, b_up)
    like = (x, rule_down, s_down, t_down, b_down, rule_up, s_up, t_up, b_up)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, like))  # the fake impl promises contiguous


@phm_adapter_fwd.register_fake
def _(x, rule_down, s_down, t_down, b_down, rule_up, s_up, t_up, b_up, impl):
    return torch.empty_like(x)


@phm_adapter_bwd.register_fake
def _(dy, x, rule_down, s_down, t_down, b_down, rule_up, s_up, t_up, b_up, impl):
    return tuple(torch.empty_like(t) for t in (x, rule_down, s_down, t_down, b_down, rule_up, s_up, t_up, b_up))


def _setup(ctx, inputs, output):
    *tensors, impl = inputs
    ctx.save_for_backward(*tensors)  # x and the (small) parameters: no activation besides x
    ctx.impl = impl


def _backward(ctx, dy):
    grads = phm_adapter_bwd(dy.contiguous(), *ctx.saved_tensors, ctx.impl)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


phm_adapter_fwd.register_autograd(_backward, setup_context=_setup)


def _check_layer(names: Tuple[str, str, str, str], rule: Tensor, s: Tensor, t: Tensor, bias: Optional[Tensor],
                 d_in: int, d_out: Optional[int]) -> Tuple[int, int, int]:
    """Check one PHM layer's parameters (argument names: rule, s, t, bias) against d_in (and d_out when
    known); returns (n, r, d_out)."""
    rule_name, s_name, t_name, b_name = names
    _checks.tensor(rule_name, rule, ndim=3)
    n = rule.shape[0]
    _checks.shape(rule_name, rule, (n, n, n))
    if n < 1 or d_in % n:
        raise ValueError(f"{rule_name}: the input size {d_in} must be divisible by n = {n} (shape {tuple(rule.shape)})")
    _checks.tensor(s_name, s, ndim=3)
    r = s.shape[2]
    if r < 1:
        raise ValueError(f"{s_name}: expected a rank >= 1 in the last dim, got shape {tuple(s.shape)}")
    _checks.shape(s_name, s, (n, d_in // n, r))
    _checks.tensor(t_name, t, ndim=3)
    _checks.shape(t_name, t, (n, r, None if d_out is None else d_out // n))
    out = t.shape[2] * n
    if out < n or (d_out is not None and out != d_out):
        raise ValueError(f"{t_name}: expected shape ({n}, {r}, {(d_out or n) // n}), got {tuple(t.shape)}")
    if bias is not None:
        _checks.tensor(b_name, bias, ndim=1)
        _checks.shape(b_name, bias, (out,))
    return n, r, out


def phm_adapter(x: Tensor, rule_down: Tensor, s_down: Tensor, t_down: Tensor, b_down: Optional[Tensor],
                rule_up: Tensor, s_up: Tensor, t_up: Tensor, b_up: Optional[Tensor]) -> Tensor:
    """y = x + PHM_up(gelu(PHM_down(x))); x (..., d) -> (..., d).

    Shapes (n = phm dim, r = rank, k = bottleneck, d and k divisible by n): rule_* (n, n, n), s_down (n, d/n, r),
    t_down (n, r, k/n), b_down (k,) or None, s_up (n, k/n, r), t_up (n, r, d/n), b_up (d,) or None; layouts as
    the `adapters` library's PHMLayer (module docstring). All tensors share x's dtype and device."""
    _checks.tensor("x", x, ndim=range(1, 9))
    d = x.shape[-1]
    n, r, k = _check_layer(("rule_down", "s_down", "t_down", "b_down"), rule_down, s_down, t_down, b_down, d, None)
    _checks.tensor("rule_up", rule_up, ndim=3)
    _checks.shape("rule_up", rule_up, (n, n, n))  # the same n as rule_down
    _checks.tensor("s_up", s_up, ndim=3)
    _checks.shape("s_up", s_up, (n, k // n, r))  # the rank of s_down
    _check_layer(("rule_up", "s_up", "t_up", "b_up"), rule_up, s_up, t_up, b_up, k, d)
    _checks.same_dtype(x=x, rule_down=rule_down, s_down=s_down, t_down=t_down, b_down=b_down, rule_up=rule_up,
                       s_up=s_up, t_up=t_up, b_up=b_up)
    _checks.same_device(x=x, rule_down=rule_down, s_down=s_down, t_down=t_down, b_down=b_down, rule_up=rule_up,
                        s_up=s_up, t_up=t_up, b_up=b_up)
    if b_down is None:
        b_down = x.new_zeros(k)
    if b_up is None:
        b_up = x.new_zeros(d)
    impl = backend.select(OP, x.device)
    if impl == "triton" and n * n * r > MAX_TRITON_RULE_WIDTH:
        if backend.forced_backend() == "triton":
            raise ValueError(f"s_down: the triton phm_adapter kernels take n * n * rank <= {MAX_TRITON_RULE_WIDTH} "
                             f"(their rule tiles must fit the shared memory), got n = {n}, rank = {r}: {n * n * r}")
        impl = "reference"  # as mom_adapter: the automatic choice skips a kernel that cannot take the shape
    params = [p.contiguous() for p in (rule_down, s_down, t_down, b_down, rule_up, s_up, t_up, b_up)]
    y = phm_adapter_fwd(x.reshape(-1, d).contiguous(), *params, impl)
    return y.view(x.shape)


def phm_linear(x: Tensor, rule: Tensor, s: Tensor, t: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """One PHM layer, y = x @ sum_i kron(A_i, s_i t_i) + bias; x (..., d_in) -> (..., d_out), rule (n, n, n),
    s (n, d_in/n, r), t (n, r, d_out/n), bias (d_out,) or None. Plain PyTorch (autograd): the fused kernel
    is the whole adapter, where the bottleneck never leaves registers."""
    _checks.tensor("x", x, ndim=range(1, 9))
    _check_layer(("rule", "s", "t", "bias"), rule, s, t, bias, x.shape[-1], None)
    _checks.same_dtype(x=x, rule=rule, s=s, t=t, bias=bias)
    _checks.same_device(x=x, rule=rule, s=s, t=t, bias=bias)
    return ref.phm_linear(x, rule, s, t, bias)
