"""rope: rotary position embedding of q and k (HF rotate_half convention, llama3 scaling).

    rope(x)[..., :D/2] = x1 cos - x2 sin,   rope(x)[..., D/2:] = x2 cos + x1 sin

q: (B, T, H, D), k: (B, T, H_kv, D), cos/sin: (1 or B, T, D/2) float32 from `rope_cos_sin`. Per-sample
positions (left padding) come in through a batch dim of B on cos/sin. cos and sin are constants: no
gradient flows to them. Backward is the inverse rotation, so it saves nothing but cos and sin.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import rope as ref
from mmkernels.reference.rope import rope_cos_sin, rope_inv_freq

OP = "rope"
backend.register_op(OP, ("triton", "reference"))

__all__ = ["rope", "rope_cos_sin", "rope_inv_freq"]


@torch.library.custom_op("mmkernels::rope_rotate", mutates_args=())
def rope_rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool, impl: str) -> Tuple[Tensor, Tensor]:
    """Rotate q and k by the angles of (cos, sin), or by minus them when `inverse`."""
    if impl == "triton":
        from mmkernels.kernels import rope as kernels

        return kernels.rotate(q, cos, sin, inverse), kernels.rotate(k, cos, sin, inverse)
    return ref.rotate(q, cos, sin, inverse), ref.rotate(k, cos, sin, inverse)


@rope_rotate.register_fake
def _(q, k, cos, sin, inverse, impl):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    )


def _setup(ctx, inputs, output):
    _q, _k, cos, sin, inverse, impl = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse, ctx.impl = inverse, impl


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = rope_rotate(_unit_last(dq), _unit_last(dk), cos, sin, not ctx.inverse, ctx.impl)
    return dq, dk, None, None, None, None


rope_rotate.register_autograd(_backward, setup_context=_setup)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """Apply the rotary embedding to q (B, T, H, D) and k (B, T, H_kv, D); returns new tensors."""
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.same_dtype(q=q, k=k)
    bsz, seq, _, dim = q.shape
    if dim % 2:
        raise ValueError(f"q: expected an even head dim, got {dim}")
    if k.shape[0] != bsz or k.shape[1] != seq or k.shape[3] != dim:
        raise ValueError(f"k: expected shape ({bsz}, {seq}, H_kv, {dim}) to match q, got {tuple(k.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(name, t, ndim=3, dtypes=(torch.float32, torch.float64))
        if t.shape[0] not in (1, bsz) or t.shape[1] != seq or t.shape[2] != dim // 2:
            raise ValueError(
                f"{name}: expected shape (1 or {bsz}, {seq}, {dim // 2}) for q of shape {tuple(q.shape)}, "
                f"got {tuple(t.shape)}"
            )
    if cos.shape != sin.shape:
        raise ValueError(f"sin: expected the shape of cos {tuple(cos.shape)}, got {tuple(sin.shape)}")
    _checks.same_device(q=q, k=k, cos=cos, sin=sin)
    impl = backend.select(OP, q.device)
    return rope_rotate(_unit_last(q), _unit_last(k), _unit_last(cos), _unit_last(sin), False, impl)
