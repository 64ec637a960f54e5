"""dynamic_expert: a bottleneck expert whose weights differ per sample (HyperLLaVA, METHODS.md section 4).

    swiglu:             hidden = silu(x W_g) * (x W_u),  [W_g | W_u] = w_down (B, d_in, 2h)
    gelu / silu / relu: hidden = act(x W_d),             W_d = w_down (B, d_in, h)
    y = residual + hidden @ w_up,  w_up (B, h, d_out);  x (B, T, d_in) -> y (B, T, d_out)

Gradients flow into x, w_down, w_up (a hypernetwork generates them) and the residual (its gradient is dy
itself, no copy). The forward saves x and the two small weights only; the backward recomputes the hidden
activation. Triton: one kernel forward, two kernels backward (see kernels/dynamic_expert.py); float64 runs
the reference math (the kernels accumulate in fp32).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import dynamic_expert as ref
from mmkernels.reference.dynamic_expert import ACTIVATIONS

__all__ = ["ACTIVATIONS", "MAX_BOTTLENECK", "dynamic_expert"]

OP = "dynamic_expert"
backend.register_op(OP, ("triton", "reference"))

MAX_BOTTLENECK = 128  # the Triton kernels keep (rows, 2h) accumulators in registers


def _use_kernels(impl: str, x: Tensor) -> bool:
    return impl == "triton" and x.dtype != torch.float64


@torch.library.custom_op("mmkernels::dynamic_expert_fwd", mutates_args=())
def dynamic_expert_fwd(x: Tensor, w_down: Tensor, w_up: Tensor, residual: Optional[Tensor], activation: str,
                       impl: str) -> Tensor:
    if _use_kernels(impl, x):
        from mmkernels.kernels import dynamic_expert as kernels

        return kernels.dynamic_expert_fwd(x, w_down, w_up, residual, activation)
    return ref.dynamic_expert(x, w_down, w_up, residual, activation)


@torch.library.custom_op("mmkernels::dynamic_expert_bwd", mutates_args=())
def dynamic_expert_bwd(dy: Tensor, x: Tensor, w_down: Tensor, w_up: Tensor, activation: str,
                       impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, d w_down, d w_up) in the input dtype."""
    if _use_kernels(impl, x):
        from mmkernels.kernels import dynamic_expert as kernels

        return kernels.dynamic_expert_bwd(dy, x, w_down, w_up, activation)
    return ref.dynamic_expert_backward(dy, x, w_down, w_up, activation)


@dynamic_expert_fwd.register_fake
def _(x, w_down, w_up, residual, activation, impl):
    return x.new_empty(x.shape[0], x.shape[1], w_up.shape[2])


@dynamic_expert_bwd.register_fake
def _(dy, x, w_down, w_up, activation, impl):
    return torch.empty_like(x), torch.empty_like(w_down), torch.empty_like(w_up)


def _setup(ctx, inputs, output):
    x, w_down, w_up, residual, activation, impl = inputs
    ctx.save_for_backward(x, w_down, w_up)
    ctx.activation, ctx.impl = activation, impl


def _backward(ctx, dy):
    x, w_down, w_up = ctx.saved_tensors
    need_x, need_down, need_up, need_res = ctx.needs_input_grad[:4]
    dx = d_down = d_up = None
    if need_x or need_down or need_up:
        dx, d_down, d_up = dynamic_expert_bwd(dy.contiguous(), x, w_down, w_up, ctx.activation, ctx.impl)
    return (dx if need_x else None, d_down if need_down else None, d_up if need_up else None,
            dy if need_res else None, None, None)


dynamic_expert_fwd.register_autograd(_backward, setup_context=_setup)


def dynamic_expert(x: Tensor, w_down: Tensor, w_up: Tensor, residual: Optional[Tensor] = None,
                   activation: str = "swiglu") -> Tensor:
    """y = (residual or 0) + act(x W_d) W_u with per-sample weights (see the module docstring).

    x (B, T, d_in); w_down (B, d_in, 2h) for swiglu (gate columns first, then up), else (B, d_in, h);
    w_up (B, h, d_out) with 1 <= h <= MAX_BOTTLENECK for the triton backend; residual (B, T, d_out) or None.
    All share one float dtype and device. Returns (B, T, d_out) in x's dtype."""
    _checks.one_of("activation", activation, ACTIVATIONS)
    _checks.tensor("x", x, ndim=3)
    _checks.tensor("w_down", w_down, ndim=3)
    _checks.tensor("w_up", w_up, ndim=3)
    bsz, _, d_in = x.shape
    h, d_out = w_up.shape[1], w_up.shape[2]
    if h < 1:
        raise ValueError(f"w_up: expected a bottleneck h >= 1 (dim 1), got shape {tuple(w_up.shape)}")
    _checks.shape("w_up", w_up, (bsz, h, d_out))
    _checks.shape("w_down", w_down, (bsz, d_in, 2 * h if activation == "swiglu" else h))
    if residual is not None:
        _checks.tensor("residual", residual, ndim=3)
        _checks.shape("residual", residual, (bsz, x.shape[1], d_out))
    _checks.same_dtype(x=x, w_down=w_down, w_up=w_up, residual=residual)
    _checks.same_device(x=x, w_down=w_down, w_up=w_up, residual=residual)
    impl = backend.select(OP, x.device)
    if impl == "triton" and h > MAX_BOTTLENECK:
        if backend.forced_backend() == "triton":
            raise ValueError(f"w_up: the triton kernels support a bottleneck h <= {MAX_BOTTLENECK}, got h={h}")
        impl = "reference"  # documented rule: wider bottlenecks run the reference (cuBLAS bmm)
    return dynamic_expert_fwd(x.contiguous(), w_down.contiguous(), w_up.contiguous(),
                              None if residual is None else residual.contiguous(), activation, impl)
