"""Scaled dot-product attention with GQA and the masks the engine uses: the executable spec.

q: (B, T, H, D); k, v: (B, S, H_kv, D); query head h reads kv head h // (H / H_kv).
Query t sits at absolute position S - T + t (bottom-right aligned, as with a KV cache). It sees key j when
    j >= kv_start[b]                  (left padding: keys before the first real token are hidden)
    and, if causal, j <= S - T + t
    and, with segment_ids (B, T) (packed samples; only when S == T), segment_ids[b, t] == segment_ids[b, j].
A query that sees no key at all gets an output of exactly 0 and passes no gradient.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def visible_keys(
    t: int, s: int, causal: bool, kv_start: Optional[torch.Tensor], device: torch.device,
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, S): True where a query may attend to a key."""
    cols = torch.arange(s, device=device)
    mask = torch.ones(1, 1, t, s, dtype=torch.bool, device=device)
    if causal:
        rows = torch.arange(t, device=device) + (s - t)
        mask = mask & (cols[None, :] <= rows[:, None])[None, None]
    if kv_start is not None:
        mask = mask & (cols[None, None, None, :] >= kv_start.to(device).long()[:, None, None, None])
    if segment_ids is not None:
        if segment_ids.shape[-1] != s or t != s:
            raise ValueError(f"segment_ids: needs as many keys as queries (no KV cache); got S={s}, T={t}")
        seg = segment_ids.to(device)
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])
    return mask


def _probs(q, k, v, causal, scale, kv_start, segment_ids=None):
    """Softmax probabilities (B, H, T, S), the repeated values (B, H, S, D) and the visibility of rows."""
    bsz, t, h, d = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc).transpose(1, 2)
    kf = k.to(acc).repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    vf = v.to(acc).repeat_interleave(h // h_kv, dim=2).transpose(1, 2)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    mask = visible_keys(t, s, causal, kv_start, q.device, segment_ids)
    any_visible = mask.any(-1, keepdim=True)
    # Rows that see nothing get finite scores (so softmax and its gradient stay finite) and are zeroed.
    scores = torch.where(mask, scores, torch.where(any_visible, float("-inf"), 0.0))
    probs = torch.softmax(scores, dim=-1) * any_visible
    return qf, kf, vf, scores, probs, any_visible


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    kv_start: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out (B, T, H, D) in q's dtype, lse (B, H, T) float32 natural-log; +inf for rows seeing no key)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    _, _, vf, scores, probs, any_visible = _probs(q, k, v, causal, scale, kv_start, segment_ids)
    out = (probs @ vf).transpose(1, 2).to(q.dtype).contiguous()
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(any_visible.squeeze(-1), lse, float("inf")).to(torch.float32)
    return out, lse


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    kv_start: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return attention_with_lse(q, k, v, causal, scale, kv_start, segment_ids)[0]


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: Optional[float] = None,
    kv_start: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention`, with dk and dv summed over the query heads sharing a kv head.

    With P the probabilities: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dP P)), dQ = s dS K, dK = s dS^T Q.
    """
    bsz, t, h, d = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf, vf, _, probs, _ = _probs(q, k, v, causal, scale, kv_start, segment_ids)
    do = dout.to(qf.dtype).transpose(1, 2)
    dv = probs.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale

    def per_kv_head(x):  # (B, H, S, D) -> (B, S, H_kv, D), summed over each group
        return x.view(bsz, h_kv, h // h_kv, s, d).sum(2).transpose(1, 2).contiguous()

    return dq.transpose(1, 2).to(q.dtype).contiguous(), per_kv_head(dk).to(k.dtype), per_kv_head(dv).to(v.dtype)
