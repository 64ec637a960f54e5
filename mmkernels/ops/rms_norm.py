"""rms_norm: RMSNorm with a weight gradient, optionally fused with the residual add.

    h = x + residual;  y = h / sqrt(mean(h^2) + eps) * weight

This file is the template every op family follows:
1. `backend.register_op` declares the implementations, fastest first.
2. Forward and backward are each one `torch.library.custom_op` taking the chosen backend as its last
   (string) argument, so torch.compile, export and FSDP see a single opaque op per direction.
3. `register_fake` gives shapes and dtypes without computing; `register_autograd` connects the two and
   saves only what the backward needs (h and the per-row rstd, not y).
4. The public function validates its arguments, flattens to 2-D, selects the backend and calls the op.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import rms_norm as ref

OP = "rms_norm"
backend.register_op(OP, ("cuda", "triton", "reference"))


def _forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, eps: float, impl: str):
    """Returns (y, h or None, rstd) with the chosen implementation."""
    if impl == "triton":
        from mmkernels.kernels import rms_norm as kernels

        return kernels.rms_norm_fwd(x, weight, residual, eps)
    if impl == "cuda":
        y, h, rstd = backend.cuda_ops().rms_norm_fwd(x, residual, weight, eps)
        return y, (h if residual is not None else None), rstd
    h = x if residual is None else x + residual
    y = ref.rms_norm(h, weight, eps)
    return y, (h if residual is not None else None), ref.rms_norm_rstd(h, eps)


@torch.library.custom_op("mmkernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Tensor, eps: float, impl: str) -> Tuple[Tensor, Tensor]:
    """x: (M, N) -> (y (M, N), rstd (M,) float32)."""
    y, _, rstd = _forward(x, None, weight, eps, impl)
    return y, rstd


@torch.library.custom_op("mmkernels::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, impl: str
) -> Tuple[Tensor, Tensor, Tensor]:
    """x, residual: (M, N) -> (y, h = x + residual, rstd (M,) float32)."""
    return _forward(x, residual, weight, eps, impl)


@torch.library.custom_op("mmkernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: Tensor, h: Tensor, weight: Tensor, rstd: Tensor, dh_extra: Optional[Tensor], impl: str
) -> Tuple[Tensor, Tensor]:
    """(dh, dw) for y = rms_norm(h) * weight; dh_extra (a gradient reaching h directly) is added to dh."""
    if impl == "triton":
        from mmkernels.kernels import rms_norm as kernels

        return kernels.rms_norm_bwd(dy, h, weight, rstd, dh_extra)
    if impl == "cuda":
        dh, dw = backend.cuda_ops().rms_norm_bwd(dy, h, weight, rstd, dh_extra)
        return dh, dw
    return ref.rms_norm_backward(dy, h, weight, rstd, dh_extra)


@rms_norm_fwd.register_fake
def _(x, weight, eps, impl):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, impl):
    return torch.empty_like(x), torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@rms_norm_bwd.register_fake
def _(dy, h, weight, rstd, dh_extra, impl):
    return torch.empty_like(h), torch.empty_like(weight)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _eps, impl = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.impl = impl


def _backward_rms_norm(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = rms_norm_bwd(dy.contiguous(), x, weight, rstd, None, ctx.impl)
    return dx, dw, None, None


def _setup_add_rms_norm(ctx, inputs, output):
    _x, _residual, weight, _eps, impl = inputs
    _y, h, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.impl = impl


def _backward_add_rms_norm(ctx, dy, dh_out, _drstd):
    h, weight, rstd = ctx.saved_tensors
    dh, dw = rms_norm_bwd(dy.contiguous(), h, weight, rstd, dh_out.contiguous(), ctx.impl)
    # h = x + residual, so both inputs receive dh.
    return dh, dh, dw, None, None


rms_norm_fwd.register_autograd(_backward_rms_norm, setup_context=_setup_rms_norm)
add_rms_norm_fwd.register_autograd(_backward_add_rms_norm, setup_context=_setup_add_rms_norm)


_CUDA_MAX_ROW = 8192  # elements per row of the csrc kernel; x 16 bytes / element size when vectorisable


def _cuda_kernel_serves(x: Tensor, weight: Tensor) -> bool:
    """The shapes and dtypes csrc/rms_norm.cu takes (it keeps a row in registers)."""
    n = x.shape[-1]
    if x.dtype == torch.float64 or weight.dtype not in (x.dtype, torch.float32):
        return False
    vec = 16 // x.element_size()
    return 0 < n <= _CUDA_MAX_ROW * (vec if n % vec == 0 else 1)


def _rows(t: Tensor, n: int) -> Tensor:
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(
    x: Tensor, weight: Tensor, eps: float = 1e-6, residual: Optional[Tensor] = None
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """RMSNorm over the last dim. x: (..., N), weight: (N,). Returns y, or (y, h) with h = x + residual.

    The statistics are computed in float32 and y is returned in x's dtype. Gradients flow to x, weight
    and residual. The CUDA kernel takes rows of up to 8192 elements, or up to 8192 16-byte vectors when the
    row length is a multiple of one (32768 float32, 65536 16-bit elements), and a weight in x's dtype or
    float32; the automatic backend choice uses the Triton kernel otherwise, while a forced `cuda` backend
    raises. With `residual`, the sum h is returned for the next residual connection, so a transformer block
    needs no separate add kernel.
    """
    _checks.tensor("x", x, ndim=range(1, 9))
    _checks.tensor("weight", weight, ndim=1)
    n = x.shape[-1]
    if weight.shape[0] != n:
        raise ValueError(f"weight: expected shape ({n},) to match the last dim of x, got {tuple(weight.shape)}")
    _checks.positive_float("eps", eps)
    if residual is not None:
        _checks.tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {tuple(x.shape)} (the shape of x), got {tuple(residual.shape)}")
        _checks.same_dtype(x=x, residual=residual)
    _checks.same_device(x=x, weight=weight, residual=residual)

    impl = backend.select(OP, x.device)
    if impl == "cuda" and backend.forced_backend() is None and not _cuda_kernel_serves(x, weight):
        impl = "triton"  # documented rule: the automatic choice skips a kernel that cannot take the shape
    x2 = _rows(x, n)
    if residual is None:
        y, _ = rms_norm_fwd(x2, weight, float(eps), impl)
        return y.view(x.shape)
    y, h, _ = add_rms_norm_fwd(x2, _rows(residual, n), weight, float(eps), impl)
    return y.view(x.shape), h.view(x.shape)
