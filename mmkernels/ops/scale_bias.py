"""scale_bias: LLaMA-Adapter V2's output-form epilogue of a frozen linear, out = (y + bias) * scale.

    y (..., N): the GEMM's output W x;  scale, bias (N,): trainable, any float dtype (float32 master weights)

In float32 inside, written once in `out_dtype` (default y's). One Triton pass instead of autograd's chain of
an upcast, an add, a multiply and a downcast, each a float32 round trip through memory; the backward is one
pass that writes dy = dout * scale and reduces d scale and d bias over the rows (two-stage, float32).

Memory: the scale's gradient needs y + bias, so y is saved, in its own dtype, and only when the scale
requires a gradient; bias and scale are parameters. nn.ScaleBiasLinear's output form runs on this op.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import scale_bias as ref

OP = "scale_bias"
backend.register_op(OP, ("triton", "reference"))


def _kernel_runs(impl: str, y: Tensor) -> bool:
    return impl == "triton" and y.dtype != torch.float64  # float64 runs the reference math (kernels: fp32)


@torch.library.custom_op("mmkernels::scale_bias_fwd", mutates_args=())
def scale_bias_fwd(y: Tensor, scale: Tensor, bias: Tensor, out_dtype: torch.dtype, impl: str) -> Tensor:
    """y (M, N) -> (M, N) in out_dtype."""
    if _kernel_runs(impl, y):
        from mmkernels.kernels import scale_bias as kernels

        return kernels.scale_bias_fwd(y, scale, bias, out_dtype)
    return ref.scale_bias(y, scale, bias, out_dtype)


@torch.library.custom_op("mmkernels::scale_bias_bwd", mutates_args=())
def scale_bias_bwd(dout: Tensor, y: Tensor, scale: Tensor, bias: Tensor, impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(d y, d scale, d bias), each in its input's dtype."""
    if _kernel_runs(impl, y):
        from mmkernels.kernels import scale_bias as kernels

        grads = kernels.scale_bias_bwd(dout, y, scale, bias)
    else:
        grads = ref.scale_bias_backward(dout, y, scale, bias)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (y, scale, bias)))


@scale_bias_fwd.register_fake
def _(y, scale, bias, out_dtype, impl):
    return y.new_empty(y.shape, dtype=out_dtype)


@scale_bias_bwd.register_fake
def _(dout, y, scale, bias, impl):
    return torch.empty_like(y), torch.empty_like(scale), torch.empty_like(bias)


def _setup(ctx, inputs, output):
    y, scale, bias, _out_dtype, impl = inputs
    # y only for the scale's gradient (a frozen scale saves no activation); the backward needs y's dtype
    ctx.save_for_backward(y if ctx.needs_input_grad[1] else None, scale, bias)
    ctx.y_meta = (y.shape, y.dtype)
    ctx.impl = impl


def _backward(ctx, dout):
    y, scale, bias = ctx.saved_tensors
    need_y, need_scale, need_bias = ctx.needs_input_grad[:3]
    if y is None:  # the scale is frozen: dy and d bias need no y
        shape, dtype = ctx.y_meta
        g_pre = dout.to(torch.promote_types(dtype, torch.float32)) * scale
        dbias = g_pre.reshape(-1, shape[-1]).sum(0).to(bias.dtype) if need_bias else None
        return (g_pre.to(dtype) if need_y else None), None, dbias, None, None
    dy, dscale, dbias = scale_bias_bwd(dout.contiguous(), y, scale, bias, ctx.impl)
    return (dy if need_y else None), (dscale if need_scale else None), (dbias if need_bias else None), None, None


scale_bias_fwd.register_autograd(_backward, setup_context=_setup)


def scale_bias(y: Tensor, scale: Tensor, bias: Optional[Tensor] = None, out_dtype: Optional[torch.dtype] = None
               ) -> Tensor:
    """(y + bias) * scale per channel of y's last dim, in float32 (float64 for float64 y), as out_dtype (default
    y's). y (..., N); scale, bias (N,) of any float dtype, bias None for zeros. Gradients flow to all three."""
    _checks.tensor("y", y, ndim=range(1, 9))
    n = y.shape[-1]
    if bias is None:
        bias = scale.new_zeros(n)
    for name, v in (("scale", scale), ("bias", bias)):
        _checks.tensor(name, v, ndim=1)
        _checks.shape(name, v, (n,))
    _checks.same_device(y=y, scale=scale, bias=bias)
    out_dtype = y.dtype if out_dtype is None else out_dtype
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"out_dtype: expected a float dtype, got {out_dtype}")
    impl = backend.select(OP, y.device)
    rows = y.shape[:-1].numel()  # not reshape(-1, n): n may be 0
    out = scale_bias_fwd(y.reshape(rows, n).contiguous(), scale.contiguous(), bias.contiguous(), out_dtype, impl)
    return out.view(y.shape)
