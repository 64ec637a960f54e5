"""attention: causal flash attention with GQA, a KV-cache-aligned causal mask and a left-padding mask.

    out[b, t, h] = softmax_j(q[b, t, h] . k[b, j, h // G] * scale  over visible j) @ v[b, j, h // G]

q: (B, T, H, D); k, v: (B, S, H_kv, D), G = H / H_kv. Query t is at absolute position S - T + t; with
`causal` it sees keys j <= S - T + t. `kv_start` (B,) hides keys j < kv_start[b] (left padding).
`segment_ids` (B, T) packs several samples in a row (S == T only): query t sees key j only when
segment_ids[b, t] == segment_ids[b, j]. A query that sees no key outputs 0. k and v may be strided views (a slice of a preallocated KV cache).
Forward saves q, k, v, out and the row log-sum-exp (B, H, T) for the backward; no T x S matrix is kept.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import attention as ref

OP = "attention"
backend.register_op(OP, ("triton", "reference"))


@torch.library.custom_op("mmkernels::attention_fwd", mutates_args=())
def attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, kv_start: Optional[Tensor], causal: bool, scale: float, impl: str,
    segment_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """(out (B, T, H, D), lse (B, H, T) float32; lse = +inf for rows that see no key)."""
    if impl == "triton":
        from mmkernels.kernels import attention as kernels

        return kernels.attention_fwd(q, k, v, kv_start, causal, scale, segment_ids)
    out, lse = ref.attention_with_lse(q, k, v, causal, scale, kv_start, segment_ids)
    return out, lse


@torch.library.custom_op("mmkernels::attention_bwd", mutates_args=())
def attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_start: Optional[Tensor],
    causal: bool, scale: float, impl: str, segment_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv); dk and dv are summed over the query heads that share a kv head."""
    if impl == "triton":
        from mmkernels.kernels import attention as kernels

        return kernels.attention_bwd(dout, q, k, v, out, lse, kv_start, causal, scale, segment_ids)
    return ref.attention_backward(dout, q, k, v, causal, scale, kv_start, segment_ids)


@attention_fwd.register_fake
def _(q, k, v, kv_start, causal, scale, impl, segment_ids=None):
    bsz, seq_q, heads, dim = q.shape
    return q.new_empty(bsz, seq_q, heads, dim), q.new_empty(bsz, heads, seq_q, dtype=torch.float32)


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, kv_start, causal, scale, impl, segment_ids=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


def _setup(ctx, inputs, output):
    q, k, v, kv_start, causal, scale, impl, segment_ids = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start, segment_ids)
    ctx.causal, ctx.scale, ctx.impl = causal, scale, impl


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, kv_start, segment_ids = ctx.saved_tensors
    dq, dk, dv = attention_bwd(_unit_last(dout), q, k, v, out, lse, kv_start, ctx.causal, ctx.scale, ctx.impl,
                               segment_ids)
    return dq, dk, dv, None, None, None, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _validate_attention(q, k, v, causal, scale, kv_start, segment_ids=None) -> float:
    """Boundary checks shared by the attention ops; returns the softmax scale."""
    _checks.tensor("q", q, ndim=4)
    _checks.tensor("k", k, ndim=4)
    _checks.tensor("v", v, ndim=4)
    _checks.same_dtype(q=q, k=k, v=v)
    bsz, seq_q, heads, dim = q.shape
    if k.shape[0] != bsz or k.shape[3] != dim:
        raise ValueError(f"k: expected shape ({bsz}, S, H_kv, {dim}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    heads_kv, seq_k = k.shape[2], k.shape[1]
    if heads_kv == 0 or heads % heads_kv:
        raise ValueError(f"k: the number of kv heads ({heads_kv}) must divide the number of query heads ({heads})")
    if causal and seq_k < seq_q:
        raise ValueError(f"k: causal attention needs at least as many keys as queries; got S={seq_k} < T={seq_q}")
    if kv_start is not None:
        _checks.tensor("kv_start", kv_start, ndim=1, dtypes=(torch.int32, torch.int64))
        if kv_start.shape[0] != bsz:
            raise ValueError(f"kv_start: expected shape ({bsz},), got {tuple(kv_start.shape)}")
    if segment_ids is not None:
        _checks.tensor("segment_ids", segment_ids, ndim=2, dtypes=(torch.int32, torch.int64))
        if tuple(segment_ids.shape) != (bsz, seq_q):
            raise ValueError(f"segment_ids: expected shape ({bsz}, {seq_q}), got {tuple(segment_ids.shape)}")
        if seq_k != seq_q:
            raise ValueError(f"segment_ids: packed segments need as many keys as queries (no KV cache); "
                             f"got S={seq_k} != T={seq_q}")
    _checks.same_device(q=q, k=k, v=v, kv_start=kv_start, segment_ids=segment_ids)
    if scale is None:
        scale = 1.0 / math.sqrt(dim)
    _checks.positive_float("scale", scale)
    return scale


def _kernel_kv_start(impl: str, q: Tensor, kv_start: Optional[Tensor]) -> Optional[Tensor]:
    """For the kernel backends: the head-dim check of the triton kernels, and kv_start as the int32 that
    every kernel (triton and cuda) reads."""
    if impl == "reference":
        return kv_start
    if impl == "triton":
        from mmkernels.kernels.attention import check_head_dim

        check_head_dim(q.shape[-1])
    return kv_start.to(torch.int32) if kv_start is not None else None


def _kernel_segment_ids(segment_ids: Optional[Tensor]) -> Optional[Tensor]:
    # Kept in its own integer type: narrowing int64 ids could make different samples compare equal.
    return segment_ids.contiguous() if segment_ids is not None else None


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    kv_start: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """Flash attention over (B, T, H, D) queries and (B, S, H_kv, D) keys/values; returns (B, T, H, D).

    segment_ids (B, T) int32/int64, only with S == T: packed samples; query t and key j of row b interact
    only when segment_ids[b, t] == segment_ids[b, j] (on top of the causal and kv_start masks). Any ids
    are masked correctly; rows with non-decreasing ids (the usual packing) also skip the key blocks of
    other samples.
    """
    scale = _validate_attention(q, k, v, causal, scale, kv_start, segment_ids)

    impl = backend.select(OP, q.device)
    kv_start = _kernel_kv_start(impl, q, kv_start)
    out, _ = attention_fwd(_unit_last(q), _unit_last(k), _unit_last(v), kv_start, bool(causal), float(scale), impl,
                           _kernel_segment_ids(segment_ids))
    return out
