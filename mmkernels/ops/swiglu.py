"""swiglu: the gating of the LLaMA MLP, out = silu(gate) * up.

Backward recomputes silu from the saved inputs instead of saving it (one tensor less in memory).

swiglu_scale_bias: the same with LLaMA-Adapter V2's per-channel bias/scale of gate_proj and up_proj fused in,
    out = silu(s_g (g + b_g)) * s_u (u + b_u)        g, u: the frozen GEMMs' outputs
The epilogues run inside the kernel in float32, so the scaled gate and up are neither written nor saved: the
backward reads g and u (which the scales' gradients need anyway) and returns the gradients of g, u and the
four vectors. Unfused, each ScaleBiasLinear saves its g (or u) and swiglu saves the scaled pair again: two
(tokens x intermediate) tensors more per layer.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import swiglu as ref

OP = "swiglu"
backend.register_op(OP, ("triton", "reference"))
OP_SCALE_BIAS = "swiglu_scale_bias"
backend.register_op(OP_SCALE_BIAS, ("triton", "reference"))


@torch.library.custom_op("mmkernels::swiglu_fwd", mutates_args=())
def swiglu_fwd(gate: Tensor, up: Tensor, impl: str) -> Tensor:
    if impl == "triton":
        from mmkernels.kernels import swiglu as kernels

        return kernels.swiglu_fwd(gate, up)
    return ref.swiglu(gate, up)


@torch.library.custom_op("mmkernels::swiglu_bwd", mutates_args=())
def swiglu_bwd(dout: Tensor, gate: Tensor, up: Tensor, impl: str) -> Tuple[Tensor, Tensor]:
    if impl == "triton":
        from mmkernels.kernels import swiglu as kernels

        return kernels.swiglu_bwd(dout, gate, up)
    return ref.swiglu_backward(dout, gate, up)


@swiglu_fwd.register_fake
def _(gate, up, impl):
    return torch.empty_like(gate)


@swiglu_bwd.register_fake
def _(dout, gate, up, impl):
    return torch.empty_like(gate), torch.empty_like(up)


def _setup(ctx, inputs, output):
    gate, up, impl = inputs
    ctx.save_for_backward(gate, up)
    ctx.impl = impl


def _backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = swiglu_bwd(dout.contiguous(), gate, up, ctx.impl)
    return dgate, dup, None


swiglu_fwd.register_autograd(_backward, setup_context=_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for two tensors of the same shape and dtype; math in float32."""
    _checks.tensor("gate", gate, ndim=range(1, 9))
    _checks.tensor("up", up, ndim=range(1, 9))
    if gate.shape != up.shape:
        raise ValueError(f"up: expected the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    _checks.same_dtype(gate=gate, up=up)
    _checks.same_device(gate=gate, up=up)
    impl = backend.select(OP, gate.device)
    return swiglu_fwd(gate.contiguous(), up.contiguous(), impl)


@torch.library.custom_op("mmkernels::swiglu_scale_bias_fwd", mutates_args=())
def swiglu_scale_bias_fwd(gate: Tensor, up: Tensor, gate_scale: Tensor, gate_bias: Tensor, up_scale: Tensor,
                          up_bias: Tensor, impl: str) -> Tensor:
    """gate, up (M, N) -> (M, N)."""
    vectors = (gate_scale, gate_bias, up_scale, up_bias)
    if impl == "triton" and gate.dtype != torch.float64:  # float64 runs the reference math (kernels: fp32)
        from mmkernels.kernels import swiglu as kernels

        return kernels.swiglu_scale_bias_fwd(gate, up, *vectors)
    return ref.swiglu_scale_bias(gate, up, *vectors)


@torch.library.custom_op("mmkernels::swiglu_scale_bias_bwd", mutates_args=())
def swiglu_scale_bias_bwd(dout: Tensor, gate: Tensor, up: Tensor, gate_scale: Tensor, gate_bias: Tensor,
                          up_scale: Tensor, up_bias: Tensor, impl: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(d gate, d up, d gate_scale, d gate_bias, d up_scale, d up_bias), each in its input's dtype."""
    vectors = (gate_scale, gate_bias, up_scale, up_bias)
    if impl == "triton" and gate.dtype != torch.float64:
        from mmkernels.kernels import swiglu as kernels

        grads = kernels.swiglu_scale_bias_bwd(dout, gate, up, *vectors)
    else:
        grads = ref.swiglu_scale_bias_backward(dout, gate, up, *vectors)
    return tuple(g.to(t.dtype) for g, t in zip(grads, (gate, up, *vectors)))


@swiglu_scale_bias_fwd.register_fake
def _(gate, up, gate_scale, gate_bias, up_scale, up_bias, impl):
    return torch.empty_like(gate)


@swiglu_scale_bias_bwd.register_fake
def _(dout, gate, up, gate_scale, gate_bias, up_scale, up_bias, impl):
    return tuple(torch.empty_like(t) for t in (gate, up, gate_scale, gate_bias, up_scale, up_bias))


def _setup_scale_bias(ctx, inputs, output):
    *tensors, impl = inputs
    ctx.save_for_backward(*tensors)  # g, u and the four (N,) vectors: the scaled gate and up are recomputed
    ctx.impl = impl


def _backward_scale_bias(ctx, dout):
    grads = swiglu_scale_bias_bwd(dout.contiguous(), *ctx.saved_tensors, ctx.impl)
    return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None)


swiglu_scale_bias_fwd.register_autograd(_backward_scale_bias, setup_context=_setup_scale_bias)


def swiglu_scale_bias(gate: Tensor, up: Tensor, gate_scale: Tensor, gate_bias: Optional[Tensor], up_scale: Tensor,
                      up_bias: Optional[Tensor]) -> Tensor:
    """silu(gate_scale * (gate + gate_bias)) * up_scale * (up + up_bias), per channel of the last dim, the
    epilogues in float32. gate, up (..., N) of one dtype; the four vectors (N,), any float dtype (a trainer's
    float32 master weights beside 16-bit activations), a bias None for zeros. Gradients flow to all six."""
    _checks.tensor("gate", gate, ndim=range(1, 9))
    _checks.tensor("up", up, ndim=range(1, 9))
    if gate.shape != up.shape:
        raise ValueError(f"up: expected the shape of gate {tuple(gate.shape)}, got {tuple(up.shape)}")
    _checks.same_dtype(gate=gate, up=up)
    n = gate.shape[-1]
    if gate_bias is None:
        gate_bias = gate_scale.new_zeros(n)
    if up_bias is None:
        up_bias = up_scale.new_zeros(n)
    vectors = dict(gate_scale=gate_scale, gate_bias=gate_bias, up_scale=up_scale, up_bias=up_bias)
    for name, v in vectors.items():
        _checks.tensor(name, v, ndim=1)
        _checks.shape(name, v, (n,))
    _checks.same_device(gate=gate, up=up, **vectors)
    impl = backend.select(OP_SCALE_BIAS, gate.device)
    rows = gate.shape[:-1].numel()  # not reshape(-1, n): n may be 0
    out = swiglu_scale_bias_fwd(gate.reshape(rows, n).contiguous(), up.reshape(rows, n).contiguous(),
                                *(v.contiguous() for v in vectors.values()), impl)
    return out.view(gate.shape)
