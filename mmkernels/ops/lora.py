"""lora_linear: a frozen linear layer plus a low-rank update (LoRA).

    y = x W^T + s (x A^T) B^T  (+ bias)       W (d_out, d_in) frozen; A (r, d_in); B (d_out, r)

When A's rows follow W's rows in one buffer (nn.LoRALinear allocates them so), the forward runs ONE GEMM
x [W; A]^T that reads x once for both products; otherwise two. The backward skips dW and runs
g = s dy B, dB = s dy^T h, dA = g^T x, dx = dy W + g A (h = x A^T, saved by the forward with x).
The GEMMs are cuBLAS (torch.matmul); this op's value is the shared read of x and the skipped dW.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks


def stacked(weight: Tensor, lora_a: Tensor) -> Optional[Tensor]:
    """[W; A] as one (d_out + r, d_in) view when A's rows directly follow W's in memory, else None."""
    if weight.dtype != lora_a.dtype or weight.device != lora_a.device or not (weight.is_contiguous()
                                                                             and lora_a.is_contiguous()):
        return None
    if lora_a.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
        return None
    if lora_a.storage_offset() != weight.storage_offset() + weight.numel():
        return None
    return weight.as_strided((weight.shape[0] + lora_a.shape[0], weight.shape[1]), weight.stride())


@torch.library.custom_op("mmkernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tuple[Tensor, Tensor]:
    """x (M, d_in) -> (y (M, d_out), h = x A^T (M, r))."""
    d_out = weight.shape[0]
    both = stacked(weight, lora_a)
    if both is not None:
        yh = x @ both.t()
        y, h = yh[:, :d_out], yh[:, d_out:].contiguous()
    else:
        y, h = x @ weight.t(), x @ lora_a.t()
    return torch.addmm(y, h, lora_b.t(), alpha=scaling), h


@torch.library.custom_op("mmkernels::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(dy: Tensor, x: Tensor, h: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                    scaling: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dA, dB) in the dtypes of x, A, B."""
    g = (dy @ lora_b) * scaling  # (M, r)
    d_b = (dy.t() @ h) * scaling
    d_a = g.t() @ x
    dx = torch.addmm(dy @ weight, g, lora_a)
    return dx, d_a.to(lora_a.dtype), d_b.to(lora_b.dtype)


@lora_linear_fwd.register_fake
def _(x, weight, lora_a, lora_b, scaling):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


@lora_linear_bwd.register_fake
def _(dy, x, h, weight, lora_a, lora_b, scaling):
    return x.new_empty(x.shape), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup(ctx, inputs, output):
    x, weight, lora_a, lora_b, scaling = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b)
    ctx.scaling = scaling


def _backward(ctx, dy, _dh):
    x, h, weight, lora_a, lora_b = ctx.saved_tensors
    dx, d_a, d_b = lora_linear_bwd(dy.contiguous(), x, h, weight, lora_a, lora_b, ctx.scaling)
    return dx, None, d_a, d_b, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup)


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + scaling (x A^T) B^T (+ bias); x (..., d_in) -> (..., d_out). W and bias get no gradient.

    A and B must have x's dtype (the low-rank products run in it, as in PEFT without autocast)."""
    _checks.tensor("weight", weight, ndim=2)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dim {d_in} (weight's in_features), got {tuple(x.shape)}")
    _checks.tensor("lora_a", lora_a, ndim=2)
    rank = lora_a.shape[0]
    _checks.shape("lora_a", lora_a, (rank, d_in))
    _checks.shape("lora_b", lora_b, (d_out, rank))
    _checks.same_dtype(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b)
    _checks.same_device(x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    scaling = _checks.number("scaling", scaling)
    x2d = x.reshape(-1, d_in)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y, _ = lora_linear_fwd(x2d, weight, lora_a, lora_b, scaling)
    y = y.view(*x.shape[:-1], d_out)
    return y if bias is None else y + bias
