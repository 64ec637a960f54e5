"""paca_linear: a linear layer whose r selected input columns are trainable (PaCA).

    W_eff[:, I] = W[:, I] + s * delta;   y = x W_eff^T (+ bias)
    backward: dx = dy W_eff,  d_delta = s * dy^T x_I  (fp32 accumulation)

Contract: `weight` already IS W_eff. The forward uses it as given and never reads `delta`; `delta` is an
input only so that autograd routes d_delta to it. The caller keeps the two consistent by rewriting the r
columns after every change of delta (`sync_columns`, what nn.PaCALinear.sync_() does once per optimizer
step). A weight that was not synced gives the output of the stale W_eff, with no error; a weight rewritten
between a forward and its backward fails the backward (autograd's version-counter check on the saved weight).

Memory: the forward saves x_I (tokens x r) and a reference to the weight, never x. No adapter GEMMs: the
two big GEMMs are cuBLAS (torch.matmul); the Triton kernels gather x_I and reduce d_delta over the tokens.
The weight (and, unless it requires grad, the bias) gets no gradient.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from mmkernels import _checks, backend
from mmkernels.reference import paca as ref
from mmkernels.reference.paca import layer_seed, select_columns  # re-exported: nn/ builds on ops/ only

__all__ = ["layer_seed", "paca_linear", "paca_linear_bwd", "paca_linear_fwd", "select_columns", "sync_columns"]

OP = "paca_linear"
backend.register_op(OP, ("triton", "reference"))


@torch.library.custom_op("mmkernels::paca_linear_fwd", mutates_args=())
def paca_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], delta: Tensor, idx: Tensor, scaling: float,
                    impl: str) -> Tuple[Tensor, Tensor]:
    """x (M, d_in) -> (y (M, d_out), x_I (M, r)). `delta` and `scaling` are not read here (see the contract)."""
    if impl == "triton":
        from mmkernels.kernels import paca as kernels

        y = torch.nn.functional.linear(x, weight, bias)
        return y, kernels.gather_columns(x, idx.to(torch.int32))
    return ref.paca_linear(x, weight, idx, bias)


@torch.library.custom_op("mmkernels::paca_linear_bwd", mutates_args=())
def paca_linear_bwd(dy: Tensor, x_i: Tensor, weight: Tensor, scaling: float, need_dx: bool,
                    impl: str) -> Tuple[Tensor, Tensor]:
    """(dx (M, d_in) in dy's dtype, or an empty tensor when not need_dx; d_delta (d_out, r) in float32,
    float64 for float64 inputs)."""
    if impl == "triton" and dy.dtype != torch.float64:  # float64 runs the reference math (kernels: fp32)
        from mmkernels.kernels import paca as kernels

        d_delta = kernels.delta_grad(dy, x_i, scaling)
    else:
        d_delta = ref.delta_grad(dy, x_i, scaling)
    dx = dy @ weight if need_dx else dy.new_empty(0)
    return dx, d_delta


@paca_linear_fwd.register_fake
def _(x, weight, bias, delta, idx, scaling, impl):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], idx.shape[0])


@paca_linear_bwd.register_fake
def _(dy, x_i, weight, scaling, need_dx, impl):
    dx = dy.new_empty(dy.shape[0], weight.shape[1]) if need_dx else dy.new_empty(0)
    return dx, dy.new_empty(weight.shape[0], x_i.shape[1], dtype=torch.promote_types(dy.dtype, torch.float32))


def _setup(ctx, inputs, output):
    x, weight, bias, delta, idx, scaling, impl = inputs
    # x_I and the (frozen, already resident) weight: nothing of size tokens x d_in.
    ctx.save_for_backward(output[1], weight)
    ctx.scaling, ctx.impl = scaling, impl
    ctx.delta_dtype = delta.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy, _dx_i):
    x_i, weight = ctx.saved_tensors
    need_dx, _, need_dbias, need_ddelta = ctx.needs_input_grad[:4]
    dx, d_delta = paca_linear_bwd(dy, x_i, weight, ctx.scaling, need_dx, ctx.impl)
    d_bias = None
    if need_dbias:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        d_bias = dy.sum(0, dtype=acc).to(ctx.bias_dtype)
    return (dx if need_dx else None, None, d_bias, d_delta.to(ctx.delta_dtype) if need_ddelta else None,
            None, None, None)


paca_linear_fwd.register_autograd(_backward, setup_context=_setup)

# idx tensors whose values were checked, with their version counter and d_in: a value check costs a
# device-to-host sync, so it runs once per idx tensor (and again after an in-place change), not per call.
_CHECKED_IDX: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_idx(idx: Tensor, d_in: int) -> None:
    _checks.tensor("idx", idx, ndim=1, dtypes=(torch.int64, torch.int32))
    r = idx.shape[0]
    if not 1 <= r <= d_in:
        raise ValueError(f"idx: expected between 1 and {d_in} (d_in) column indices, got {r}")
    if not _checks.has_values(idx):
        return
    try:
        key = (idx._version, d_in)
    except RuntimeError:  # inference tensors have no version counter: check every call
        key = None
    if key is not None and _CHECKED_IDX.get(idx) == key:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= d_in:
        raise ValueError(f"idx: expected column indices in [0, {d_in}) (d_in), got values in [{lo}, {hi}]")
    if r > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError("idx: expected strictly increasing column indices (sorted, no duplicates)")
    if key is not None:
        _CHECKED_IDX[idx] = key


def _check_common(weight: Tensor, delta: Tensor, idx: Tensor) -> Tuple[int, int, int]:
    _checks.tensor("weight", weight, ndim=2)
    d_out, d_in = weight.shape
    _check_idx(idx, d_in)
    r = idx.shape[0]
    _checks.tensor("delta", delta, ndim=2)
    _checks.shape("delta", delta, (d_out, r))
    return d_out, d_in, r


def paca_linear(x: Tensor, weight: Tensor, delta: Tensor, idx: Tensor, scaling: float,
                bias: Optional[Tensor] = None) -> Tensor:
    """y = x W_eff^T (+ bias); x (..., d_in) -> (..., d_out), gradients for x, delta (and bias if it requires one).

    weight (d_out, d_in): W_eff, already synced (see the module docstring); delta (d_out, r), any float dtype
    (float32 as a trainable master), its gradient is returned in its dtype; idx (r,) int64 or int32, sorted,
    distinct, in [0, d_in); x, weight and bias share one float dtype and, with delta and idx, one device."""
    d_out, d_in, r = _check_common(weight, delta, idx)
    _checks.tensor("x", x, ndim=range(1, 9))
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dim {d_in} (weight's in_features), got shape {tuple(x.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (d_out,))
    _checks.same_dtype(x=x, weight=weight, bias=bias)
    _checks.same_device(x=x, weight=weight, delta=delta, idx=idx, bias=bias)
    scaling = _checks.number("scaling", scaling)
    impl = backend.select(OP, x.device)
    y, _ = paca_linear_fwd(x.reshape(-1, d_in), weight, bias, delta, idx, scaling, impl)
    return y.view(*x.shape[:-1], d_out)


def sync_columns(weight: Tensor, orig_cols: Tensor, delta: Tensor, idx: Tensor, scaling: float) -> None:
    """In place, without autograd: weight[:, idx] = orig_cols + scaling * delta, computed in float32 and
    rounded once to weight's dtype. orig_cols (d_out, r) in weight's dtype."""
    d_out, d_in, r = _check_common(weight, delta, idx)
    _checks.tensor("orig_cols", orig_cols, ndim=2)
    _checks.shape("orig_cols", orig_cols, (d_out, r))
    _checks.same_dtype(weight=weight, orig_cols=orig_cols)
    _checks.same_device(weight=weight, orig_cols=orig_cols, delta=delta, idx=idx)
    scaling = _checks.number("scaling", scaling)
    impl = backend.select(OP, weight.device)
    with torch.no_grad():
        if impl == "triton" and weight.dtype != torch.float64:  # the kernel computes in fp32
            from mmkernels.kernels import paca as kernels

            kernels.sync_columns(weight, orig_cols, delta, idx.to(torch.int32), scaling)
        else:
            ref.sync_columns(weight, orig_cols, delta, idx, scaling)
