"""linear_cross_entropy: the LM-head projection and the cross-entropy loss, without the (N x V) logits.

    loss = reduce_i CE(x_i W^T (+ b), t_i)       x (..., d), W (V, d), b (V,), t (...) int64

Tokens are processed in chunks of `chunk_size` rows (default: a chunk's logits take about
reference.linear_cross_entropy.CHUNK_LOGITS_BYTES = 256 MiB, see default_chunk_size). Per chunk: the
logits GEMM (cuBLAS, input dtype, fp32 accumulate), ONE Triton kernel that computes the row's logsumexp
online in fp32 and its loss and overwrites the logits buffer in place with d loss / d logits, then
dx_c = dlogits W (input dtype) and dW += dlogits^T x_c, db += sum dlogits, accumulated in float32.
So for "mean"/"sum" the gradients are computed in the forward (as Liger does); the backward only scales
them by the incoming gradient (times 1/n for "mean"), in fp32, and casts them to the input dtype. Nothing
of size N x d is saved besides dx, and dW / db are computed only when weight / bias require grad (a
frozen lm_head costs no dW GEMM).

reduction "none" returns the per-token losses (float32) and cannot know their gradients in the forward:
its forward computes losses only, and its backward runs the chunk loop again with the per-token incoming
gradients as row scales (a second pass of GEMMs; x and W are saved).

Semantics follow torch.nn.functional.cross_entropy (ignore_index, label_smoothing), except that "mean"
over zero counted tokens (all ignored, or no tokens) is 0 with zero gradients, not NaN. The loss is
float32 (float64 for float64 inputs). Target values are checked (outside torch.compile), which costs one
device-to-host sync per call.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import linear_cross_entropy as ref

__all__ = ["linear_cross_entropy"]

OP = "linear_cross_entropy"
backend.register_op(OP, ("triton", "reference"))
REDUCTIONS = ("mean", "sum", "none")


def _step(impl: str, dtype: torch.dtype):
    if impl == "triton" and dtype != torch.float64:  # float64 runs the reference math (kernels: fp32)
        from mmkernels.kernels import linear_cross_entropy as kernels

        return kernels.chunk_loss_and_grad_
    return ref.chunk_loss_and_grad_


def _scale(g: Tensor, s: Tensor, dtype: torch.dtype, impl: str) -> Tensor:
    if impl == "triton" and dtype != torch.float64:
        from mmkernels.kernels import linear_cross_entropy as kernels

        return kernels.scale_grad(g, s, dtype)
    return ref.scale_grad(g, s, dtype)


@torch.library.custom_op("mmkernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
                             label_smoothing: float, reduction: str, chunk_size: int, need_dx: bool, need_dw: bool,
                             need_db: bool, impl: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (N, d) contiguous, target (N,). Returns (loss: () or (N,) for "none"; dx (N, d) in x's dtype,
    dW (V, d), db (V,) in float32, unscaled gradients of the summed loss, empty when not needed (always for
    "none"); the scale () of the reduction: 1/max(n_counted, 1) for "mean", 1 otherwise)."""
    if reduction == "none":
        need_dx = need_dw = need_db = False
    loss_rows, dx, dw, db = ref.chunked_loss_and_grads(
        x, weight, target, bias, ignore_index, label_smoothing, chunk_size, need_dx, need_dw, need_db,
        step=_step(impl, x.dtype))
    acc = loss_rows.dtype
    if reduction == "mean":
        scale = 1.0 / (target != ignore_index).sum().clamp_min(1).to(acc)
    else:
        scale = torch.ones((), dtype=acc, device=x.device)
    loss = loss_rows if reduction == "none" else loss_rows.sum() * scale
    return loss, dx, dw, db, scale


@torch.library.custom_op("mmkernels::linear_cross_entropy_scale_bwd", mutates_args=())
def linear_cross_entropy_scale_bwd(dloss: Tensor, scale: Tensor, dx: Tensor, dw: Tensor, db: Tensor,
                                   dtype: torch.dtype, impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    """"mean"/"sum": the forward's gradients times dloss * scale, in `dtype` (the inputs'; empty stays
    empty)."""
    s = dloss.to(scale.dtype) * scale
    return tuple(_scale(g, s, dtype, impl) if g.numel() else g.new_empty(0, dtype=dtype) for g in (dx, dw, db))


@torch.library.custom_op("mmkernels::linear_cross_entropy_rows_bwd", mutates_args=())
def linear_cross_entropy_rows_bwd(dloss: Tensor, x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                                  ignore_index: int, label_smoothing: float, chunk_size: int, need_dx: bool,
                                  need_dw: bool, need_db: bool, impl: str) -> Tuple[Tensor, Tensor, Tensor]:
    """"none": recompute the chunks with dloss (N,) as row scales. (dx, dW, db) in x's dtype, empty when not
    needed."""
    _, dx, dw, db = ref.chunked_loss_and_grads(
        x, weight, target, bias, ignore_index, label_smoothing, chunk_size, need_dx, need_dw, need_db,
        row_scale=dloss.contiguous(), step=_step(impl, x.dtype))
    return dx, dw.to(x.dtype), db.to(x.dtype)


def _empty_or(cond: bool, t: Tensor, *shape: int, dtype: torch.dtype) -> Tensor:
    return t.new_empty(*shape, dtype=dtype) if cond else t.new_empty(0, dtype=dtype)


@linear_cross_entropy_fwd.register_fake
def _(x, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, need_dx, need_dw, need_db,
      impl):
    acc = ref.acc_dtype(x.dtype)
    grads = reduction != "none"
    loss = x.new_empty(x.shape[0], dtype=acc) if reduction == "none" else x.new_empty((), dtype=acc)
    return (loss, _empty_or(grads and need_dx, x, *x.shape, dtype=x.dtype),
            _empty_or(grads and need_dw, x, *weight.shape, dtype=acc),
            _empty_or(grads and need_db, x, weight.shape[0], dtype=acc), x.new_empty((), dtype=acc))


@linear_cross_entropy_scale_bwd.register_fake
def _(dloss, scale, dx, dw, db, dtype, impl):
    return tuple(g.new_empty(g.shape if g.numel() else (0,), dtype=dtype) for g in (dx, dw, db))


@linear_cross_entropy_rows_bwd.register_fake
def _(dloss, x, weight, target, bias, ignore_index, label_smoothing, chunk_size, need_dx, need_dw, need_db, impl):
    return (_empty_or(need_dx, x, *x.shape, dtype=x.dtype), _empty_or(need_dw, x, *weight.shape, dtype=x.dtype),
            _empty_or(need_db, x, weight.shape[0], dtype=x.dtype))


def _setup(ctx, inputs, output):
    x, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, _, _, _, impl = inputs
    ctx.reduction, ctx.impl, ctx.dtype = reduction, impl, x.dtype
    if reduction == "none":
        ctx.save_for_backward(x, weight, target, bias)
        ctx.args = (ignore_index, label_smoothing, chunk_size)
    else:
        # The gradients themselves: neither x nor the logits are kept.
        _, dx, dw, db, scale = output
        ctx.save_for_backward(dx, dw, db, scale)


def _backward(ctx, dloss, *_unused):
    need_dx, need_dw, _, need_db = ctx.needs_input_grad[:4]
    if ctx.reduction == "none":
        x, weight, target, bias = ctx.saved_tensors
        dx, dw, db = linear_cross_entropy_rows_bwd(dloss, x, weight, target, bias, *ctx.args, need_dx, need_dw,
                                                   need_db and bias is not None, ctx.impl)
    else:
        dx, dw, db, scale = ctx.saved_tensors
        dx, dw, db = linear_cross_entropy_scale_bwd(dloss, scale, dx, dw, db, ctx.dtype, ctx.impl)
    return (dx if need_dx else None, dw if need_dw else None, None, db if need_db else None,
            None, None, None, None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


def _check_target_values(target: Tensor, vocab: int, ignore_index: int) -> None:
    if not _checks.has_values(target) or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        value = int(target[bad][0])
        raise ValueError(f"target: expected class indices in [0, {vocab}) (weight's rows) or ignore_index "
                         f"{ignore_index}, got {value}")


def linear_cross_entropy(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         chunk_size: Optional[int] = None) -> Tensor:
    """cross_entropy(x W^T (+ b), target) without materialising the logits; see the module docstring.

    x (..., d) and weight (V, d) (and bias (V,)) share one float dtype; target (...) int64 with values in
    [0, V) or ignore_index. reduction "mean" (over tokens whose target is not ignore_index), "sum" or
    "none" (shape of target). Returns float32 (float64 for float64 inputs). chunk_size: token rows per
    chunk (default: default_chunk_size, ~256 MiB of logits per chunk)."""
    _checks.tensor("x", x, ndim=range(1, 9))
    _checks.tensor("weight", weight, ndim=2)
    vocab, d = weight.shape
    if x.shape[-1] != d:
        raise ValueError(f"x: expected last dim {d} (weight's in_features), got shape {tuple(x.shape)}")
    _checks.tensor("target", target, dtypes=(torch.int64,))
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(x.shape[:-1])} (x's leading dims), got {tuple(target.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1)
        _checks.shape("bias", bias, (vocab,))
    _checks.same_dtype(x=x, weight=weight, bias=bias)
    _checks.same_device(x=x, weight=weight, target=target, bias=bias)
    _checks.one_of("reduction", reduction, REDUCTIONS)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    label_smoothing = _checks.number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing}")
    n = target.numel()
    if chunk_size is None:
        chunk_size = ref.default_chunk_size(n, vocab, x.dtype)
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    _check_target_values(target, vocab, ignore_index)

    grad = torch.is_grad_enabled()
    need_dx = grad and x.requires_grad
    need_dw = grad and weight.requires_grad
    need_db = grad and bias is not None and bias.requires_grad
    impl = backend.select(OP, x.device)
    x2d = x.reshape(n, d)
    if not x2d.is_contiguous():
        x2d = x2d.contiguous()
    loss = linear_cross_entropy_fwd(x2d, weight, target.reshape(n).contiguous(), bias, ignore_index, label_smoothing, reduction,
                                    max(chunk_size, 1), need_dx, need_dw, need_db, impl)[0]
    return loss.view(target.shape) if reduction == "none" else loss
