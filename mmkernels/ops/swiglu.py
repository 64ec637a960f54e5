"""swiglu: the gating of the LLaMA MLP, out = silu(gate) * up.

Backward recomputes silu from the saved inputs instead of saving it (one tensor less in memory).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import swiglu as ref

OP = "swiglu"
backend.register_op(OP, ("triton", "reference"))


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
