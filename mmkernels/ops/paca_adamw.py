"""paca_adamw_sync: one AdamW step of a PaCA delta, fused with the rewrite of its weight columns.

    delta *= 1 - lr wd;   m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
    delta -= lr m_hat / (sqrt(v_hat) + eps)                   (torch.optim.AdamW, decoupled weight decay)
    W[:, I] = orig + s delta                                  (fp32 math, one rounding to W's dtype)

One pass over the (d_out, r) elements instead of AdamW's several plus a separate `sync_columns`: after it
the weight already holds the new W_eff. The kernels reproduce torch.optim.AdamW(foreach=False)'s operation
order (see reference/paca_adamw.py) with IEEE division and square root. Against torch's CPU AdamW the one
difference is the square root (torch's can be 1 ulp off); torch's CUDA AdamW also divides by the bias
correction through its reciprocal. The reference backend is torch's own operations, bit for bit.

Backend rule: the kernels take a weight in fp32/fp16/bf16 and fp32 delta, grad and states; the CUDA kernel
also needs delta, exp_avg and exp_avg_sq contiguous (it updates them in place). A call the selected kernel
cannot take runs the next backend that can (cuda -> triton -> reference) when the backend was chosen
automatically, and raises when it was forced.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.ops.paca import _check_common
from mmkernels.reference import paca_adamw as ref

__all__ = ["check_adamw_hparams", "paca_adamw_sync", "paca_adamw_sync_op"]

OP = "paca_adamw"
backend.register_op(OP, ("cuda", "triton", "reference"))

_KERNEL_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("mmkernels::paca_adamw_sync",
                         mutates_args=("weight", "delta", "exp_avg", "exp_avg_sq"))
def paca_adamw_sync_op(weight: Tensor, orig_cols: Tensor, idx: Tensor, scaling: float, delta: Tensor, grad: Tensor,
                       exp_avg: Tensor, exp_avg_sq: Tensor, step: float, lr: float, beta1: float, beta2: float,
                       eps: float, weight_decay: float, impl: str) -> None:
    """The fused step with the implementation `impl`; arguments already validated (see paca_adamw_sync)."""
    if impl == "cuda":
        backend.cuda_ops().paca_adamw_sync(weight, orig_cols.contiguous(), idx.to(torch.int64).contiguous(),
                                           scaling, delta, grad.contiguous(), exp_avg, exp_avg_sq, step, lr,
                                           beta1, beta2, eps, weight_decay)
    elif impl == "triton":
        from mmkernels.kernels import paca_adamw as kernels

        kernels.adamw_sync(weight, orig_cols, idx, scaling, delta, grad, exp_avg, exp_avg_sq, step, lr, beta1,
                           beta2, eps, weight_decay)
    else:
        ref.adamw_sync_step(weight, orig_cols, idx, scaling, delta, grad, exp_avg, exp_avg_sq, step, lr, beta1,
                            beta2, eps, weight_decay)


@paca_adamw_sync_op.register_fake
def _(weight, orig_cols, idx, scaling, delta, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps,
      weight_decay, impl):
    return None


def _why_not(impl: str, weight: Tensor, delta: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> Optional[str]:
    """Why the `impl` kernel cannot take this call, or None if it can."""
    if impl == "reference":
        return None
    if weight.dtype not in _KERNEL_WEIGHT_DTYPES:
        return f"weight: expected dtype in {_KERNEL_WEIGHT_DTYPES} for the {impl} kernel, got {weight.dtype}"
    if delta.dtype != torch.float32:
        return f"delta: expected dtype torch.float32 for the {impl} kernel, got {delta.dtype}"
    if impl == "cuda":
        for name, t in (("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if not t.is_contiguous():
                return f"{name}: expected a contiguous tensor for the cuda kernel (it is updated in place)"
    return None


def _select(device: torch.device, weight: Tensor, delta: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> str:
    impl = backend.select(OP, device)
    why = _why_not(impl, weight, delta, exp_avg, exp_avg_sq)
    if why is None:
        return impl
    if backend.forced_backend() is not None:
        raise ValueError(f"backend {impl!r} was forced for op {OP!r}, but its kernel cannot take this call: {why}")
    if impl == "cuda" and backend.availability("triton", OP, device)[0] \
            and _why_not("triton", weight, delta, exp_avg, exp_avg_sq) is None:
        return "triton"
    return "reference"


def _number(name: str, value: object) -> float:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    value = _checks.number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return value


def check_adamw_hparams(lr: object, betas: object, eps: object, weight_decay: object):
    """(lr, beta1, beta2, eps, weight_decay) as floats, checked like torch.optim.AdamW's: finite, lr, eps and
    weight_decay >= 0, betas a pair in [0, 1)."""
    lr = _number("lr", lr)
    if lr < 0:
        raise ValueError(f"lr: expected a number >= 0, got {lr!r}")
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = _number("betas[0]", betas[0]), _number("betas[1]", betas[1])
    for i, b in enumerate((beta1, beta2)):
        if not 0 <= b < 1:
            raise ValueError(f"betas[{i}]: expected a number in [0, 1), got {b!r}")
    eps = _number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    weight_decay = _number("weight_decay", weight_decay)
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")
    return lr, beta1, beta2, eps, weight_decay


def paca_adamw_sync(weight: Tensor, orig_cols: Tensor, idx: Tensor, scaling: float, delta: Tensor, grad: Tensor,
                    exp_avg: Tensor, exp_avg_sq: Tensor, step, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 1e-2) -> None:
    """In place, without autograd: an AdamW step of delta (updating exp_avg and exp_avg_sq), then
    weight[:, idx] = orig_cols + scaling * delta.

    weight (d_out, d_in) float; orig_cols (d_out, r) in weight's dtype; idx (r,) int64/int32, sorted, distinct,
    in [0, d_in); delta, grad, exp_avg, exp_avg_sq (d_out, r), one dtype (float32; float64 on the reference
    backend); all on one device. step: the step count including this one (an int, float or 1-element tensor,
    as torch's state["step"] after its increment); lr, betas, eps, weight_decay as in torch.optim.AdamW."""
    d_out, _, r = _check_common(weight, delta, idx)
    _checks.tensor("orig_cols", orig_cols, ndim=2)
    _checks.shape("orig_cols", orig_cols, (d_out, r))
    _checks.same_dtype(weight=weight, orig_cols=orig_cols)
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _checks.tensor(name, t, ndim=2)
        _checks.shape(name, t, (d_out, r))
    if delta.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"delta: expected dtype torch.float32 (or torch.float64), got {delta.dtype}")
    _checks.same_dtype(delta=delta, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    _checks.same_device(weight=weight, orig_cols=orig_cols, idx=idx, delta=delta, grad=grad, exp_avg=exp_avg,
                        exp_avg_sq=exp_avg_sq)
    if grad.is_sparse:
        raise ValueError("grad: expected a dense tensor, got a sparse one")
    scaling = _checks.number("scaling", scaling)
    step = _number("step", step)
    if step < 1 or step != int(step):
        raise ValueError(f"step: expected a positive integer count (this step included), got {step!r}")
    lr, beta1, beta2, eps, weight_decay = check_adamw_hparams(lr, betas, eps, weight_decay)
    impl = _select(weight.device, weight, delta, exp_avg, exp_avg_sq)
    with torch.no_grad():
        paca_adamw_sync_op(weight, orig_cols, idx, scaling, delta, grad, exp_avg, exp_avg_sq, step, lr, beta1,
                           beta2, eps, weight_decay, impl)
