"""quantized_linear: a linear layer over a frozen, quantized weight (the base of QPaCA).

    y = x deq(W)^T (+ bias)          dx = dy deq(W)          (no weight gradient: W is frozen)

W (d_out, d_in) is held as a QuantizedWeight: int8 with a scale per output channel, or NF4 (4-bit
NormalFloat, two codes per byte) with an absmax per block of `block` elements of the row-major weight, the
last block zero-padded (reference/quantize.py); any d_in works. The Triton kernels dequantize tiles inside
the GEMM; W is never materialised.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import quantize as ref

OP = "quantized_linear"
KINDS = ("int8", "nf4")
backend.register_op(OP, ("triton", "reference"))


@dataclasses.dataclass
class QuantizedWeight:
    data: Tensor  # int8 (d_out, d_in) or uint8 (n_blocks * block / 2,)
    scales: Tensor  # float32: (d_out,) for int8, (n_blocks,) for nf4, n_blocks = ceil(d_out * d_in / block)
    kind: str
    shape: Tuple[int, int]
    block: int = 64

    @classmethod
    def quantize(cls, weight: Tensor, kind: str = "nf4", block: int = 64) -> "QuantizedWeight":
        _checks.tensor("weight", weight, ndim=2)
        _checks.one_of("kind", kind, KINDS)
        if kind == "int8":
            data, scales = ref.quantize_int8(weight)
        else:
            data, scales = ref.quantize_nf4(weight, block)
        return cls(data, scales, kind, (int(weight.shape[0]), int(weight.shape[1])), block)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self.kind == "int8":
            return ref.dequantize_int8(self.data, self.scales, dtype)
        return ref.dequantize_nf4(self.data, self.scales, self.shape, self.block, dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


def _dequantized(data, scales, kind, n, k, block, dtype):
    return QuantizedWeight(data, scales, kind, (n, k), block).dequantize(dtype)


@torch.library.custom_op("mmkernels::quantized_linear_fwd", mutates_args=())
def quantized_linear_fwd(x: Tensor, data: Tensor, scales: Tensor, kind: str, n: int, k: int, block: int,
                         impl: str) -> Tensor:
    if impl == "triton":
        from mmkernels.kernels.quant_matmul import dequant_matmul

        return dequant_matmul(x, data, scales, kind, n, k, block, transpose_w=True)
    return x @ _dequantized(data, scales, kind, n, k, block, x.dtype).t()


@torch.library.custom_op("mmkernels::quantized_linear_bwd", mutates_args=())
def quantized_linear_bwd(dy: Tensor, data: Tensor, scales: Tensor, kind: str, n: int, k: int, block: int,
                         impl: str) -> Tensor:
    if impl == "triton":
        from mmkernels.kernels.quant_matmul import dequant_matmul

        return dequant_matmul(dy, data, scales, kind, n, k, block, transpose_w=False)
    return dy @ _dequantized(data, scales, kind, n, k, block, dy.dtype)


@quantized_linear_fwd.register_fake
def _(x, data, scales, kind, n, k, block, impl):
    return x.new_empty(x.shape[0], n)


@quantized_linear_bwd.register_fake
def _(dy, data, scales, kind, n, k, block, impl):
    return dy.new_empty(dy.shape[0], k)


def _setup(ctx, inputs, output):
    _x, data, scales, kind, n, k, block, impl = inputs
    ctx.save_for_backward(data, scales)
    ctx.meta = (kind, n, k, block, impl)


def _backward(ctx, dy):
    data, scales = ctx.saved_tensors
    dx = quantized_linear_bwd(dy.contiguous(), data, scales, *ctx.meta)
    return dx, None, None, None, None, None, None, None


quantized_linear_fwd.register_autograd(_backward, setup_context=_setup)


def quantized_linear(x: Tensor, weight: QuantizedWeight, bias: Optional[Tensor] = None) -> Tensor:
    """x (..., d_in) -> (..., d_out) in x's dtype; gradients flow to x only."""
    if not isinstance(weight, QuantizedWeight):
        raise TypeError(f"weight: expected a QuantizedWeight, got {type(weight).__name__}")
    _checks.tensor("x", x)
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dim {d_in} (the weight's in_features), got {tuple(x.shape)}")
    _checks.same_device(x=x, data=weight.data, scales=weight.scales, bias=bias)
    impl = backend.select(OP, x.device)
    x2d = x.reshape(-1, d_in)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = quantized_linear_fwd(x2d, weight.data, weight.scales, weight.kind, d_out, d_in, weight.block, impl)
    y = y.view(*x.shape[:-1], d_out)
    return y if bias is None else y + bias
