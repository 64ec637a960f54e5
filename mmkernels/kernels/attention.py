"""Triton flash attention, forward and backward, with GQA, a bottom-right-aligned causal mask and a
left-padding mask (kv_start). Layout (batch, seq, heads, head_dim), any strides with a unit last stride.

Forward (FlashAttention-2): one program per (query block, batch x query head) runs an online softmax over
the key blocks it can see, in base 2 (log2(e) folded into the scale), and stores the output once together
with the row log-sum-exp. The key loop is `_attn_fwd_segment`, which updates an (acc, m, l) state for one
key/value segment. With HAS_PROMPT the same kernel runs it a second time, on the prompt keys and values
with a state of its own, and adds the gated, separately normalised prompt term (gated_attention.py).

Backward: `_attn_bwd_preprocess` computes delta = rowsum(dO * O); `_attn_bwd_dkdv` runs one program per
(key block, batch x kv head) and loops over the query heads of its GQA group and their query blocks, so
dk and dv are reduced over the group in registers and written once (no atomics, no second pass);
`_attn_bwd_dq` runs one program per (query block, batch x query head) over the key blocks. Both take an
optional prompt segment (HAS_PROMPT, gated attention): extra dk/dv programs for its key blocks, and a
second key loop in dq, so the gated backward costs the same launches as the plain one.

Packed samples (HAS_SEGMENTS, S == T): query t and key j of a row interact only when their segment ids
are equal. The ids are compared as loaded (int32 or int64), so the mask is right for any ids. On top of
the mask, key (query) blocks outside the span of the block's segments are skipped: `segment_ranges` gives
each position the [lo, hi) run of its id when the row's ids are non-decreasing (then every id is one
contiguous run), and [0, T) otherwise, so rows that break that order are only masked, never skipped wrongly.

A query that sees no key keeps m = -inf and l = 0: its output is 0 and its lse is +inf, which makes every
probability recomputed in the backward exp(s - inf) = 0.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device

LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _attn_fwd_segment(
    acc, m_i, l_i, q,
    K, V, stride_kn, stride_vn,
    lo, hi, seq_k, kv_lo, row_pos,
    qk_scale,
    offs_d,
    CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    SEG_K=None, seg_m=None, HAS_SEGMENTS: tl.constexpr = False,
):
    """Online-softmax accumulation of q against keys [lo, hi) of one segment (K, V point at its row 0).

    Key j is visible when kv_lo <= j < seq_k, if CAUSAL, j <= row_pos (the query's absolute position) and,
    if HAS_SEGMENTS, SEG_K[j] == seg_m (the queries' segment ids; SEG_K at the sample's position 0).
    Scores are in base-2 units: qk_scale includes log2(e).
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_k
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        visible = in_seq[None, :] & (offs_n[None, :] >= kv_lo)
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= row_pos[:, None])
        if HAS_SEGMENTS:
            seg_n = tl.load(SEG_K + offs_n, mask=in_seq, other=0)
            visible = visible & (seg_n[None, :] == seg_m[:, None])
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Rows with nothing visible yet keep m = -inf; shift them by 0 so no inf - inf appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :], mask=in_seq[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_range(KV_START, b, start_m, seq_q, seq_k,
               CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SEG_LO=None, SEG_HI=None, HAS_SEGMENTS: tl.constexpr = False):
    """(kv_lo, lo, hi): the first visible key of sample b, and the key-block range a query block scans.
    With HAS_SEGMENTS, SEG_LO / SEG_HI (at sample b) bound the keys each query's segment may hold."""
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.load(KV_START + b).to(tl.int32)
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    hi = seq_k
    if CAUSAL:
        hi = tl.minimum(seq_k, start_m + BLOCK_M + (seq_k - seq_q))
    if HAS_SEGMENTS:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_q
        seg_lo = tl.min(tl.load(SEG_LO + offs_m, mask=row_ok, other=seq_k), 0)
        seg_hi = tl.max(tl.load(SEG_HI + offs_m, mask=row_ok, other=0), 0)
        lo = tl.maximum(lo, (seg_lo // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(hi, seg_hi)
    return kv_lo, lo, hi


@triton.jit
def _gate(G, h, GATE_STRIDE, GATE_TANH: tl.constexpr):
    """The prompt gate of head h: G[h] (or G[0] with GATE_STRIDE 0), through tanh when GATE_TANH."""
    g = tl.load(G + h * GATE_STRIDE).to(tl.float32)
    if GATE_TANH:
        g = 2.0 * tl.sigmoid(2.0 * g) - 1.0
    return g


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, KV_START, SEG, SEG_RANGE,
    PK, PV, G, O_MAIN, LSE_P,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_pkb, stride_pkt, stride_pkh,
    stride_pvb, stride_pvt, stride_pvh,
    H, GROUP, seq_q, seq_k, seq_p, GATE_STRIDE,
    qk_scale,
    CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_PROMPT: tl.constexpr, GATE_TANH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Attention of one query block; with HAS_PROMPT, plus g_h times the separately normalised attention
    over the prompt keys/values (PK, PV: no mask), and the main term alone stored to O_MAIN."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    row_pos = offs_m + (seq_k - seq_q)
    o_offs = b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    # Segment ids (B, T) and their key spans (B, 2, T), contiguous; S == T when HAS_SEGMENTS.
    seg_b = SEG + b * seq_q
    seg_m = tl.load(seg_b + offs_m, mask=row_ok, other=0) if HAS_SEGMENTS else None
    span = SEG_RANGE + b * 2 * seq_q
    kv_lo, lo, hi = _key_range(KV_START, b, start_m, seq_q, seq_k, CAUSAL, HAS_KV_START, BLOCK_M, BLOCK_N,
                               span, span + seq_q, HAS_SEGMENTS)

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _attn_fwd_segment(
        acc, m_i, l_i, q,
        K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, stride_kt, stride_vt,
        lo, hi, seq_k, kv_lo, row_pos, qk_scale, offs_d,
        CAUSAL=CAUSAL, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
        SEG_K=seg_b, seg_m=seg_m, HAS_SEGMENTS=HAS_SEGMENTS,
    )
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("inf"))
    if HAS_PROMPT:
        # The main term alone is what the main segment's backward needs (delta = rowsum(dO * O_main));
        # recovering it as out - g * O_prompt from the rounded output would cost precision.
        tl.store(O_MAIN + o_offs, out.to(O_MAIN.dtype.element_ty), mask=row_ok[:, None])
        acc_p = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        m_p = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_p = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc_p, m_p, l_p = _attn_fwd_segment(
            acc_p, m_p, l_p, q,
            PK + b * stride_pkb + kvh * stride_pkh, PV + b * stride_pvb + kvh * stride_pvh, stride_pkt, stride_pvt,
            0, seq_p, seq_p, 0, row_pos, qk_scale, offs_d,
            CAUSAL=False, BLOCK_N=BLOCK_P, PRECISION=PRECISION,
        )
        out = out + _gate(G, h, GATE_STRIDE, GATE_TANH) * (acc_p / l_p[:, None])
        tl.store(LSE_P + bh.to(tl.int64) * seq_q + offs_m, (m_p + tl.math.log2(l_p)) / 1.4426950408889634,
                 mask=row_ok)
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + bh.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    H, seq_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_segment(
    Q, DO, LSE, DELTA, K, V, DK, DV, G,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_kt, stride_vt, stride_dkt, stride_dvt,
    kvh, GROUP, seq_q, seq_k, start_n, kv_lo, sm_scale, GATE_STRIDE,
    CAUSAL: tl.constexpr, GATED: tl.constexpr, GATE_TANH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    SEG=None, SEG_LO=None, SEG_HI=None, HAS_SEGMENTS: tl.constexpr = False,
):
    """dk, dv of keys [start_n, start_n + BLOCK_N) of one segment, summed over the GROUP query heads of kv
    head kvh. Q, DO: at the sample's row 0; LSE, DELTA: at the sample's (h=0, t=0); K, V, DK, DV: at the
    segment's (sample, kvh) row 0. GATED: the segment enters the output as g_h * softmax(.) V, so its dO is
    g_h dO (DELTA then already holds g_h rowsum(dO * O_segment)). HAS_SEGMENTS (S == T): query t sees key j
    only when SEG[t] == SEG[j]; SEG_LO / SEG_HI bound the queries that share a key's segment."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seq_k
    col_visible = col_ok & (offs_n >= kv_lo)
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    lo = 0
    hi = seq_q
    if CAUSAL:
        # Query t sees key j when t >= j - (seq_k - seq_q); earlier query blocks see none of this block.
        first = tl.maximum(start_n - (seq_k - seq_q), 0)
        lo = (first // BLOCK_M) * BLOCK_M
    if HAS_SEGMENTS:
        seg_n = tl.load(SEG + offs_n, mask=col_ok, other=0)
        seg_lo = tl.min(tl.load(SEG_LO + offs_n, mask=col_ok, other=seq_q), 0)
        lo = tl.maximum(lo, (seg_lo // BLOCK_M) * BLOCK_M)
        hi = tl.minimum(hi, tl.max(tl.load(SEG_HI + offs_n, mask=col_ok, other=0), 0))
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        gh = 1.0
        if GATED:
            gh = _gate(G, h, GATE_STRIDE, GATE_TANH)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < seq_q
            q = tl.load(Q + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None],
                        other=0.0)
            do = tl.load(DO + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None],
                         other=0.0)
            lse2 = tl.load(LSE + h * seq_q + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + h * seq_q + offs_m, mask=row_ok, other=0.0)
            # Transposed scores: rows are keys, columns are queries.
            qkt = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            visible = col_visible[:, None] & row_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= (offs_m + (seq_k - seq_q))[None, :])
            if HAS_SEGMENTS:
                seg_m = tl.load(SEG + offs_m, mask=row_ok, other=0)
                visible = visible & (seg_n[:, None] == seg_m[None, :])
            pt = tl.where(visible, tl.math.exp2(qkt - lse2[None, :]), 0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if GATED:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION) * gh
                dpt = dpt * gh
            else:
                dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KV_START, SEG, SEG_RANGE,
    PK, PV, DPK, DPV, LSE_P, DELTA_P, G,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dkb, stride_dkt, stride_dkh,
    stride_dvb, stride_dvt, stride_dvh,
    stride_pkb, stride_pkt, stride_pkh,
    stride_pvb, stride_pvt, stride_pvh,
    stride_dpkb, stride_dpkt, stride_dpkh,
    stride_dpvb, stride_dpvt, stride_dpvh,
    H, H_KV, GROUP, seq_q, seq_k, seq_p, main_blocks, GATE_STRIDE,
    sm_scale,
    CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_PROMPT: tl.constexpr, GATE_TANH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Programs [0, main_blocks) take the key blocks of the main segment; with HAS_PROMPT the programs after
    them take the prompt's key blocks (no mask, gated dO) in the same launch."""
    pid = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // H_KV).to(tl.int64)
    kvh = bkv % H_KV
    q_b = Q + b * stride_qb
    do_b = DO + b * stride_dob
    row0 = b * H * seq_q
    is_prompt = False
    if HAS_PROMPT:
        is_prompt = pid >= main_blocks
    if is_prompt:
        _dkdv_segment(
            q_b, do_b, LSE_P + row0, DELTA_P + row0,
            PK + b * stride_pkb + kvh * stride_pkh, PV + b * stride_pvb + kvh * stride_pvh,
            DPK + b * stride_dpkb + kvh * stride_dpkh, DPV + b * stride_dpvb + kvh * stride_dpvh, G,
            stride_qt, stride_qh, stride_dot, stride_doh, stride_pkt, stride_pvt, stride_dpkt, stride_dpvt,
            kvh, GROUP, seq_q, seq_p, (pid - main_blocks) * BLOCK_N, 0, sm_scale, GATE_STRIDE,
            CAUSAL=False, GATED=True, GATE_TANH=GATE_TANH,
            HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
        )
    else:
        kv_lo = 0
        if HAS_KV_START:
            kv_lo = tl.load(KV_START + b).to(tl.int32)
        _dkdv_segment(
            q_b, do_b, LSE + row0, DELTA + row0,
            K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh,
            DK + b * stride_dkb + kvh * stride_dkh, DV + b * stride_dvb + kvh * stride_dvh, G,
            stride_qt, stride_qh, stride_dot, stride_doh, stride_kt, stride_vt, stride_dkt, stride_dvt,
            kvh, GROUP, seq_q, seq_k, pid * BLOCK_N, kv_lo, sm_scale, GATE_STRIDE,
            CAUSAL=CAUSAL, GATED=False, GATE_TANH=GATE_TANH,
            HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
            SEG=SEG + b * seq_q, SEG_LO=SEG_RANGE + b * 2 * seq_q, SEG_HI=SEG_RANGE + (b * 2 + 1) * seq_q,
            HAS_SEGMENTS=HAS_SEGMENTS,
        )


@triton.jit
def _dq_segment(
    dq, q, do, lse2, delta, K, V, stride_kt, stride_vt,
    lo, hi, seq_k, kv_lo, row_pos, row_ok, qk_scale, gh, offs_d,
    CAUSAL: tl.constexpr, GATED: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
    SEG_K=None, seg_m=None, HAS_SEGMENTS: tl.constexpr = False,
):
    """Adds to dq the gradient through keys [lo, hi) of one segment (K, V at its row 0); lse2 in base 2.
    GATED: the segment's dO is gh * do (delta already includes gh). HAS_SEGMENTS: as in _attn_fwd_segment."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_seq = offs_n < seq_k
        kt = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=in_seq[None, :], other=0.0)
        qk = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        visible = in_seq[None, :] & (offs_n[None, :] >= kv_lo) & row_ok[:, None]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= row_pos[:, None])
        if HAS_SEGMENTS:
            seg_n = tl.load(SEG_K + offs_n, mask=in_seq, other=0)
            visible = visible & (seg_n[None, :] == seg_m[:, None])
        p = tl.where(visible, tl.math.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if GATED:
            dp = dp * gh
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KV_START, SEG, SEG_RANGE,
    PK, PV, LSE_P, DELTA_P, G,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_dob, stride_dot, stride_doh,
    stride_dqb, stride_dqt, stride_dqh,
    stride_pkb, stride_pkt, stride_pkh,
    stride_pvb, stride_pvt, stride_pvh,
    H, GROUP, seq_q, seq_k, seq_p, GATE_STRIDE,
    sm_scale,
    CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_PROMPT: tl.constexpr, GATE_TANH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq of one query block: the main segment, then (HAS_PROMPT) the prompt segment; written once."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_q
    row_pos = offs_m + (seq_k - seq_q)
    rows = bh.to(tl.int64) * seq_q + offs_m
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    seg_b = SEG + b * seq_q
    seg_m = tl.load(seg_b + offs_m, mask=row_ok, other=0) if HAS_SEGMENTS else None
    span = SEG_RANGE + b * 2 * seq_q
    kv_lo, lo, hi = _key_range(KV_START, b, start_m, seq_q, seq_k, CAUSAL, HAS_KV_START, BLOCK_M, BLOCK_N,
                               span, span + seq_q, HAS_SEGMENTS)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dq = _dq_segment(
        dq, q, do, lse2, delta, K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh,
        stride_kt, stride_vt, lo, hi, seq_k, kv_lo, row_pos, row_ok, qk_scale, 1.0, offs_d,
        CAUSAL=CAUSAL, GATED=False, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
        SEG_K=seg_b, seg_m=seg_m, HAS_SEGMENTS=HAS_SEGMENTS,
    )
    if HAS_PROMPT:
        lse2_p = tl.load(LSE_P + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta_p = tl.load(DELTA_P + rows, mask=row_ok, other=0.0)
        dq = _dq_segment(
            dq, q, do, lse2_p, delta_p, PK + b * stride_pkb + kvh * stride_pkh, PV + b * stride_pvb + kvh * stride_pvh,
            stride_pkt, stride_pvt, 0, seq_p, seq_p, 0, row_pos, row_ok, qk_scale,
            _gate(G, h, GATE_STRIDE, GATE_TANH), offs_d,
            CAUSAL=False, GATED=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
        )
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _config(head_dim: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    On a GPU: FlashAttention-2-like tiles for Hopper/Ampere, not yet tuned by measurement on this code.
    Under the interpreter: small tiles, so that small odd test shapes span several partial blocks.
    """
    if not _device.compiled(device):
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


class BwdConfig(NamedTuple):
    """A backward kernel's tiles: block_m queries by block_n keys per step, warps and pipeline stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int


BWD_TILES_ENV = "MMK_ATTN_BWD_TILES"


def parse_bwd_tiles(text: str) -> Tuple[BwdConfig, BwdConfig]:
    """'M,N,WARPS,STAGES/M,N,WARPS,STAGES' (dk/dv kernel / dq kernel) -> the two BwdConfigs."""
    expected = (f"{BWD_TILES_ENV}: expected 'block_m,block_n,warps,stages/block_m,block_n,warps,stages' (dk/dv "
                "kernel / dq kernel; blocks powers of two >= 16, warps 1-16 a power of two, stages >= 1), got ")
    parts = text.split("/")
    if len(parts) != 2:
        raise ValueError(expected + repr(text))
    out = []
    for part in parts:
        try:
            cfg = BwdConfig(*(int(v) for v in part.split(",")))
        except (TypeError, ValueError):
            raise ValueError(expected + repr(text)) from None
        pow2 = [v for v in (cfg.block_m, cfg.block_n, cfg.warps) if v & (v - 1) == 0]
        if len(pow2) < 3 or min(cfg.block_m, cfg.block_n) < 16 or not 1 <= cfg.warps <= 16 or cfg.stages < 1:
            raise ValueError(expected + repr(text))
        out.append(cfg)
    return out[0], out[1]


def _bwd_configs(head_dim: int, device: torch.device) -> Tuple[BwdConfig, BwdConfig]:
    """(dk/dv kernel, dq kernel). The dk/dv kernel holds k, v, dk and dv for its block_n keys and steps over
    block_m queries; the dq kernel holds q, dO and dq for its block_m queries and steps over block_n keys.

    On a GPU: tiles with which ptxas needs no stack (no register spills) on sm_90 for every variant (plain,
    kv_start, packed segments, the gated prompt segment) with Triton 3.6 and 3.9, per tools/compile_check.py;
    at head_dim 128 the 64-query x 64-key dk/dv tile of 8 warps spilled 104-184 B per thread; at head_dim 64
    Triton 3.6 spilled 744 B per thread with a 64 x 64 dk/dv tile of 4 warps (and 512 B with 8), none with 32
    queries x 64 keys. Not yet chosen by measurement: the
    environment variable MMK_ATTN_BWD_TILES ('m,n,warps,stages/m,n,warps,stages', see parse_bwd_tiles)
    replaces them, so that a benchmark can compare tiles on the GPU.
    """
    if not _device.compiled(device):  # the interpreter's small tiles (see _config)
        block_m, block_n, warps, stages = _config(head_dim, device)
        return BwdConfig(block_m, block_n, warps, stages), BwdConfig(block_n, block_m, warps, stages)
    override = os.environ.get(BWD_TILES_ENV)
    if override:
        return parse_bwd_tiles(override)
    if head_dim <= 64:
        return BwdConfig(32, 64, 4, 3), BwdConfig(64, 64, 4, 3)
    return BwdConfig(64, 32, 8, 3), BwdConfig(32, 64, 8, 3)


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (no TF32) so they agree with the float32 reference.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _strides3(t: torch.Tensor):
    return t.stride(0), t.stride(1), t.stride(2)


def segment_ranges(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 2, T) int32: [:, 0] / [:, 1] = the start / end (exclusive) of the run of equal ids that holds each
    position, for rows whose ids are non-decreasing (each id is then one contiguous run, so no position
    outside the run can share it); [0, T) in every other row. Sync-free: no host check of the order."""
    bsz, seq = segment_ids.shape
    idx = torch.arange(seq, dtype=torch.int32, device=segment_ids.device).expand(bsz, seq)
    differs = segment_ids[:, 1:] != segment_ids[:, :-1]
    edge = torch.ones((bsz, 1), dtype=torch.bool, device=segment_ids.device)
    starts = torch.cat((edge, differs), 1)
    ends = torch.cat((differs, edge), 1)
    lo = torch.where(starts, idx, 0).cummax(1).values
    hi = torch.where(ends, idx + 1, seq).flip(1).cummin(1).values.flip(1)
    ordered = (segment_ids[:, 1:] >= segment_ids[:, :-1]).all(1, keepdim=True)
    lo = torch.where(ordered, lo, 0)
    hi = torch.where(ordered, hi, seq)
    return torch.stack((lo, hi), 1).to(torch.int32).contiguous()


def _segment_args(segment_ids: Optional[torch.Tensor], dummy: torch.Tensor):
    """(SEG, SEG_RANGE) kernel arguments; the dummy is never read without HAS_SEGMENTS."""
    if segment_ids is None:
        return dummy, dummy
    return segment_ids.contiguous(), segment_ranges(segment_ids)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: Optional[torch.Tensor], causal: bool, scale: float,
    segment_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out (B, T, H, D), lse (B, H, T) float32). segment_ids (B, T) int32/int64 needs S == T."""
    bsz, seq_q, heads, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    out = torch.empty((bsz, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((bsz, heads, seq_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_m, block_n, warps, stages = _config(dim, q.device)
    grid = (triton.cdiv(seq_q, block_m), bsz * heads)
    no_prompt = (k, v, lse, out, lse)  # PK, PV, G, O_MAIN, LSE_P: never read without HAS_PROMPT
    _attn_fwd[grid](
        q, k, v, out, lse, kv_start if kv_start is not None else lse, *_segment_args(segment_ids, lse), *no_prompt,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(k), *_strides3(v),
        heads, heads // heads_kv, seq_q, seq_k, 0, 0,
        scale * LOG2E,
        CAUSAL=causal, HAS_KV_START=kv_start is not None, HAS_SEGMENTS=segment_ids is not None,
        HAS_PROMPT=False, GATE_TANH=False,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=16, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_start: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    segment_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dq, dk, dv) in the shapes and dtypes of q, k, v."""
    bsz, seq_q, heads, dim = q.shape
    if q.numel() == 0 or k.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    block_m, _, warps, _ = _config(dim, q.device)
    delta = torch.empty_like(lse)
    _attn_bwd_preprocess[(triton.cdiv(seq_q, block_m), bsz * heads)](
        out, dout, delta, *_strides3(out), *_strides3(dout), heads, seq_q,
        HEAD_DIM=dim, BLOCK_M=block_m, num_warps=warps,
    )
    return backward_kernels(q, k, v, dout, lse, delta, kv_start, causal, scale, segment_ids=segment_ids)


def batch_strides(t: torch.Tensor, bsz: int):
    """Strides of a (1 or B, L, H, D) tensor read by B programs: batch stride 0 when shared."""
    return (0 if t.shape[0] == 1 and bsz > 1 else t.stride(0)), t.stride(1), t.stride(2)


class PromptGrad(NamedTuple):
    """The prompt segment of a gated backward: its keys/values (1 or B, L_p, H_kv, D), row lse and
    delta = g_h rowsum(dO * O_prompt) (B, H, T), and the gate (H,) or (1,) (tanh applied when gate_tanh)."""

    k: torch.Tensor
    v: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor
    gate: torch.Tensor
    gate_tanh: bool


def backward_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dout: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_start: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    prompt: Optional[PromptGrad] = None,
    segment_ids: Optional[torch.Tensor] = None,
):
    """The two backward launches (dk/dv, then dq), given lse and delta = rowsum(dO * O_main).
    segment_ids (B, T), S == T: packed samples, masking the main segment only.

    Returns (dq, dk, dv) or, with a prompt, (dq, dk, dv, d_prompt_k, d_prompt_v): the prompt's key blocks
    are extra programs of the dk/dv launch, and its dq term a second segment of the dq kernel. Prompt
    gradients are per sample (B, L_p, H_kv, D), to be summed by the caller when the prompt is shared.
    """
    bsz, seq_q, heads, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    dq = torch.empty((bsz, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dkdv_cfg, dq_cfg = _bwd_configs(dim, q.device)
    bwd_m, bwd_n = dkdv_cfg.block_m, dkdv_cfg.block_n
    main_blocks = triton.cdiv(seq_k, bwd_n)
    if prompt is None:
        seq_p, prompt_blocks, gate_stride = 0, 0, 0
        pk = pv = dpk = dpv = k  # never read without HAS_PROMPT
        lse_p = delta_p = gate = lse
        pk_strides = pv_strides = dpk_strides = dpv_strides = _strides3(k)
    else:
        seq_p = prompt.k.shape[1]
        prompt_blocks = triton.cdiv(seq_p, bwd_n)
        pk, pv, lse_p, delta_p, gate = prompt.k, prompt.v, prompt.lse, prompt.delta, prompt.gate
        gate_stride = 0 if gate.numel() == 1 else 1
        dpk = torch.empty((bsz, seq_p, heads_kv, dim), dtype=pk.dtype, device=q.device)
        dpv = torch.empty((bsz, seq_p, heads_kv, dim), dtype=pv.dtype, device=q.device)
        pk_strides, pv_strides = batch_strides(pk, bsz), batch_strides(pv, bsz)
        dpk_strides, dpv_strides = _strides3(dpk), _strides3(dpv)
    ks = kv_start if kv_start is not None else lse
    seg, seg_range = _segment_args(segment_ids, lse)
    common = dict(CAUSAL=causal, HAS_KV_START=kv_start is not None, HAS_SEGMENTS=segment_ids is not None,
                  HAS_PROMPT=prompt is not None,
                  GATE_TANH=prompt is not None and prompt.gate_tanh, HEAD_DIM=dim, PRECISION=_precision(q.dtype))
    _attn_bwd_dkdv[(main_blocks + prompt_blocks, bsz * heads_kv)](
        q, k, v, dout, lse, delta, dk, dv, ks, seg, seg_range, pk, pv, dpk, dpv, lse_p, delta_p, gate,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dk), *_strides3(dv),
        *pk_strides, *pv_strides, *dpk_strides, *dpv_strides,
        heads, heads_kv, heads // heads_kv, seq_q, seq_k, seq_p, main_blocks, gate_stride, scale,
        BLOCK_M=bwd_m, BLOCK_N=bwd_n, num_warps=dkdv_cfg.warps, num_stages=dkdv_cfg.stages, **common,
    )
    _attn_bwd_dq[(triton.cdiv(seq_q, dq_cfg.block_m), bsz * heads)](
        q, k, v, dout, lse, delta, dq, ks, seg, seg_range, pk, pv, lse_p, delta_p, gate,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq), *pk_strides, *pv_strides,
        heads, heads // heads_kv, seq_q, seq_k, seq_p, gate_stride, scale,
        BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n, num_warps=dq_cfg.warps, num_stages=dq_cfg.stages, **common,
    )
    if prompt is None:
        return dq, dk, dv
    return dq, dk, dv, dpk, dpv


def check_head_dim(dim: int) -> None:
    if dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {dim} is not supported by the triton attention kernel; "
                         f"expected one of {SUPPORTED_HEAD_DIMS}")


