"""Triton decode attention (flash-decoding): T <= 16 new queries against a KV cache, plus an optional gated
prompt segment with a softmax of its own.

    out[b,t,h] = softmax_j(q[b,t,h] . k[b,j,h/G] s) v[b,j,h/G]  +  g_h softmax_p(q[b,t,h] . pk[p,h/G] s) pv[p,h/G]

q (B, T, H, D); k, v (B, S, H_kv, D) with any strides but a unit last one (views of a preallocated cache);
query t sits at position S - T + t and sees keys kv_start[b] <= j <= S - T + t; prompt_k, prompt_v
(1 or B, L_p, H_kv, D), no mask; g = tanh(gate) or gate, gate (H,) or (1,). G = H / H_kv.

Pass 1 (`_decode_split`), grid (B x H_kv x row blocks, splits [+ 1]): a program stacks the G*T query rows
that read one kv head into one tile (so each key tile is loaded once per group, and tl.dot gets >= 16 rows),
runs the online softmax of attention.py over its chunk of the cache, and writes the normalised partial
output and its base-2 log-sum-exp (-inf for an empty chunk) to float32 workspaces. The extra last split,
when there is a prompt, runs the whole prompt segment. Pass 2 (`_decode_combine`), one program per
(b, h, t) row: merges the cache chunks by their lse (all -inf -> 0), adds g_h times the prompt part and
stores in q's dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device
from mmkernels.kernels.attention import LOG2E, _attn_fwd_segment, _gate, _precision, _strides3, batch_strides


@triton.jit
def _decode_split(
    Q, K, V, PK, PV, KV_START, O_PART, LSE_PART,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_pkb, stride_pkt, stride_pkh,
    stride_pvb, stride_pvt, stride_pvh,
    H_KV, GROUP, seq_q, seq_k, seq_p, row_blocks, chunk, num_splits, n_parts,
    qk_scale,
    HAS_KV_START: tl.constexpr, HAS_PROMPT: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One chunk of keys (split < num_splits) or the prompt (split == num_splits) for BLOCK_R of the G*T
    query rows of one (sample, kv head). Row r is query t = r % T of head kvh * G + r // T, so the rows of
    one (sample, kv head) are consecutive (b, h, t) rows of the workspaces."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rb = pid % row_blocks
    bkv = pid // row_blocks
    b = (bkv // H_KV).to(tl.int64)
    kvh = bkv % H_KV
    n_rows = GROUP * seq_q
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_r < n_rows
    t = offs_r % seq_q
    h = kvh * GROUP + offs_r // seq_q
    # Padding rows see no key (position -1), so they stay at m = -inf without a NaN; they are not stored.
    row_pos = tl.where(row_ok, t + (seq_k - seq_q), -1)
    q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    acc = tl.zeros((BLOCK_R, HEAD_DIM), dtype=tl.float32)
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    is_prompt = False
    if HAS_PROMPT:
        is_prompt = split == num_splits
    if is_prompt:
        acc, m_i, l_i = _attn_fwd_segment(
            acc, m_i, l_i, q,
            PK + b * stride_pkb + kvh * stride_pkh, PV + b * stride_pvb + kvh * stride_pvh, stride_pkt, stride_pvt,
            0, seq_p, seq_p, 0, row_pos, qk_scale, offs_d,
            CAUSAL=False, BLOCK_N=BLOCK_P, PRECISION=PRECISION,
        )
    else:
        kv_lo = 0
        if HAS_KV_START:
            kv_lo = tl.load(KV_START + b).to(tl.int32)
        # chunk is a multiple of BLOCK_N, so key tiles never straddle two splits.
        lo = split * chunk
        hi = tl.minimum(lo + chunk, seq_k)
        lo = tl.maximum(lo, (kv_lo // BLOCK_N) * BLOCK_N)
        acc, m_i, l_i = _attn_fwd_segment(
            acc, m_i, l_i, q,
            K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh, stride_kt, stride_vt,
            lo, hi, seq_k, kv_lo, row_pos, qk_scale, offs_d,
            CAUSAL=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION,
        )
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse2 = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
    parts = ((b * H_KV + kvh) * n_rows + offs_r) * n_parts + split
    tl.store(O_PART + parts[:, None] * HEAD_DIM + offs_d[None, :], out, mask=row_ok[:, None])
    tl.store(LSE_PART + parts, lse2, mask=row_ok)


@triton.jit
def _decode_combine(
    O_PART, LSE_PART, G, O,
    stride_ob, stride_ot, stride_oh,
    H, seq_q, num_splits, n_parts, GATE_STRIDE,
    HAS_PROMPT: tl.constexpr, GATE_TANH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Row (b, h, t): sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse), then + g_h o_prompt."""
    row = tl.program_id(0).to(tl.int64)
    t = row % seq_q
    h = (row // seq_q) % H
    b = row // (seq_q * H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_ok = offs_s < num_splits
    lse2 = tl.load(LSE_PART + row * n_parts + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, 0)
    # Every chunk empty (the row sees no key): all weights 0 and the main term is 0, not NaN.
    w = tl.math.exp2(lse2 - tl.where(m == float("-inf"), 0.0, m))
    denom = tl.sum(w, 0)
    o = tl.load(O_PART + (row * n_parts + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=s_ok[:, None],
                other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    if HAS_PROMPT:
        o_p = tl.load(O_PART + (row * n_parts + num_splits) * HEAD_DIM + offs_d)
        out = out + _gate(G, h, GATE_STRIDE, GATE_TANH) * o_p
    tl.store(O + b * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(O.dtype.element_ty))


# On a GPU the combine tile (BLOCK_S x D floats) and the workspace traffic grow with the splits; beyond this
# many, longer chunks cost less than more of them.
MAX_SPLITS = 64


def _config(rows: int, head_dim: int, device: torch.device) -> Tuple[int, int, int, int, int]:
    """(BLOCK_R, BLOCK_N, BLOCK_P cap, num_warps, num_stages).

    Under the interpreter: tiles of 16 and small chunks (see _splits), so the tests' small shapes span several
    row blocks, splits, partial tiles and empty splits. On a GPU: not yet tuned by measurement.
    """
    if not _device.compiled(device):
        return 16, 16, 16, 1, 1
    block_r = min(max(16, triton.next_power_of_2(rows)), 64 if head_dim > 64 else 128)
    return block_r, 64, 128, 4, 2


def _splits(seq_k: int, programs: int, block_n: int, device: torch.device) -> Tuple[int, int]:
    """(num_splits, chunk): chunk a multiple of block_n, num_splits * chunk >= seq_k.

    On a GPU, enough splits that the programs of pass 1 fill about two waves of the SMs: with few samples
    and kv heads, one program per (sample, kv head) would leave most SMs idle for the whole cache read.
    """
    tiles = max(1, triton.cdiv(seq_k, block_n))
    if not _device.compiled(device):
        per_split = 2
    else:
        sms = _device.sm_count(device)
        want = min(MAX_SPLITS, max(1, triton.cdiv(2 * sms, programs)))
        per_split = triton.cdiv(tiles, want)
    chunk = per_split * block_n
    return triton.cdiv(tiles, per_split), chunk


def decode_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: Optional[torch.Tensor],
    prompt_v: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    kv_start: Optional[torch.Tensor],
    scale: float,
    gate_tanh: bool,
) -> torch.Tensor:
    """Returns out (B, T, H, D) in q's dtype; kv_start int32 (B,) or None; gate float32 when a prompt is given."""
    bsz, seq_q, heads, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    out = torch.empty((bsz, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    has_prompt = prompt_k is not None
    group = heads // heads_kv
    rows = group * seq_q
    block_r, block_n, block_p, warps, stages = _config(rows, dim, q.device)
    row_blocks = triton.cdiv(rows, block_r)
    num_splits, chunk = _splits(seq_k, bsz * heads_kv * row_blocks, block_n, q.device)
    n_parts = num_splits + int(has_prompt)
    o_part = torch.empty((bsz, heads, seq_q, n_parts, dim), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((bsz, heads, seq_q, n_parts), dtype=torch.float32, device=q.device)
    if has_prompt:
        seq_p = prompt_k.shape[1]
        block_p = min(block_p, max(16, triton.next_power_of_2(seq_p)))
        pk_strides, pv_strides = batch_strides(prompt_k, bsz), batch_strides(prompt_v, bsz)
        gate_stride = 0 if gate.numel() == 1 else 1
    else:
        seq_p, gate_stride = 0, 0
        prompt_k, prompt_v, gate = k, v, lse_part  # never read without HAS_PROMPT
        pk_strides, pv_strides = _strides3(k), _strides3(v)
    _decode_split[(bsz * heads_kv * row_blocks, n_parts)](
        q, k, v, prompt_k, prompt_v, kv_start if kv_start is not None else lse_part, o_part, lse_part,
        *_strides3(q), *_strides3(k), *_strides3(v), *pk_strides, *pv_strides,
        heads_kv, group, seq_q, seq_k, seq_p, row_blocks, chunk, num_splits, n_parts,
        scale * LOG2E,
        HAS_KV_START=kv_start is not None, HAS_PROMPT=has_prompt,
        HEAD_DIM=dim, BLOCK_R=block_r, BLOCK_N=block_n, BLOCK_P=block_p, PRECISION=_precision(q.dtype),
        num_warps=warps, num_stages=stages,
    )
    _decode_combine[(bsz * heads * seq_q,)](
        o_part, lse_part, gate, out,
        *_strides3(out),
        heads, seq_q, num_splits, n_parts, gate_stride,
        HAS_PROMPT=has_prompt, GATE_TANH=gate_tanh, HEAD_DIM=dim, BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=warps if _device.compiled(q.device) else 1,
    )
    return out
