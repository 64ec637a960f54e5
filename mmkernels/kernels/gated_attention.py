"""Triton gated prompt attention: out = attn_main + g_h * attn_prompt, each with its own softmax.

Forward: ONE kernel, the attention forward `_attn_fwd` with HAS_PROMPT: each program (query block,
batch x head) runs the main-segment online softmax and, with a state of its own, the prompt segment,
adds g_h times the normalised prompt term and writes the output once, with both row log-sum-exps.

Backward: the same three launches as plain attention. `_gated_bwd_preprocess` recomputes the prompt term
from its lse (the prompt is short: one key tile) and writes, per query row, delta_main =
rowsum(dO * O_main), delta_prompt = g rowsum(dO * O_prompt) and rowsum(dO * O_prompt) (for the gate
gradient). Then the attention backward kernels run with the prompt as a second segment: the prompt's key
blocks are extra programs of the dk/dv launch (no mask, dO scaled by g_h), and the dq kernel adds the
prompt term after the main one and writes dq once. A shared prompt (batch 1) is read with batch stride 0
and its gradients summed over the batch. With packed samples (segment_ids) the segment mask applies to
the main segment only; every query still sees the whole prompt.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels.attention import (
    LOG2E,
    _attn_fwd,
    _config,
    _gate,
    _precision,
    _segment_args,
    _strides3,
    PromptGrad,
    backward_kernels,
    batch_strides,
)


@triton.jit
def _gated_bwd_preprocess(
    Q, PK, PV, G, O_MAIN, DO, LSE_P, DELTA, DELTA_P, DGATE_ROWS,
    stride_qb, stride_qt, stride_qh,
    stride_pkb, stride_pkt, stride_pkh,
    stride_pvb, stride_pvt, stride_pvh,
    stride_ob, stride_ot, stride_oh,
    stride_dob, stride_dot, stride_doh,
    H, GROUP, seq_q, seq_p, GATE_STRIDE,
    sm_scale,
    GATE_TANH: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    kvh = h // GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    offs_p = tl.arange(0, BLOCK_P)
    row_ok = offs_m < seq_q
    p_ok = offs_p < seq_p
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    pkt = tl.load(PK + b * stride_pkb + kvh * stride_pkh + offs_p[None, :] * stride_pkt + offs_d[:, None],
                  mask=p_ok[None, :], other=0.0)
    pv = tl.load(PV + b * stride_pvb + kvh * stride_pvh + offs_p[:, None] * stride_pvt + offs_d[None, :],
                 mask=p_ok[:, None], other=0.0)
    lse2 = tl.load(LSE_P + bh.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    s = tl.dot(q, pkt, input_precision=PRECISION) * (sm_scale * 1.4426950408889634)
    p = tl.where(p_ok[None, :], tl.math.exp2(s - lse2[:, None]), 0.0)
    o_p = tl.dot(p.to(pv.dtype), pv, input_precision=PRECISION)
    g = _gate(G, h, GATE_STRIDE, GATE_TANH)
    o = tl.load(O_MAIN + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0).to(tl.float32)
    dot_p = tl.sum(do * o_p, 1)
    rows = bh.to(tl.int64) * seq_q + offs_m
    tl.store(DELTA + rows, tl.sum(do * o, 1), mask=row_ok)
    tl.store(DELTA_P + rows, g * dot_p, mask=row_ok)
    tl.store(DGATE_ROWS + rows, dot_p, mask=row_ok)


def _prompt_block(seq_p: int) -> int:
    return max(16, triton.next_power_of_2(seq_p))


def gated_attention_fwd(
    q, k, v, prompt_k, prompt_v, gate, kv_start: Optional[torch.Tensor], causal: bool, scale: float, gate_tanh: bool,
    segment_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B, T, H, D), out_main (the main term alone), lse (B, H, T), lse_prompt (B, H, T)).
    segment_ids (B, T) (S == T) masks the main segment only: every query sees the whole prompt."""
    bsz, seq_q, heads, dim = q.shape
    seq_k, heads_kv = k.shape[1], k.shape[2]
    seq_p = prompt_k.shape[1]
    out = torch.empty((bsz, seq_q, heads, dim), dtype=q.dtype, device=q.device)
    out_main = torch.empty_like(out)
    lse = torch.empty((bsz, heads, seq_q), dtype=torch.float32, device=q.device)
    lse_p = torch.empty_like(lse)
    if out.numel() == 0:
        return out, out_main, lse, lse_p
    block_m, block_n, warps, stages = _config(dim, q.device)
    grid = (triton.cdiv(seq_q, block_m), bsz * heads)
    _attn_fwd[grid](
        q, k, v, out, lse, kv_start if kv_start is not None else lse, *_segment_args(segment_ids, lse),
        prompt_k, prompt_v, gate, out_main, lse_p,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
        *batch_strides(prompt_k, bsz), *batch_strides(prompt_v, bsz),
        heads, heads // heads_kv, seq_q, seq_k, seq_p, 0 if gate.numel() == 1 else 1,
        scale * LOG2E,
        CAUSAL=causal, HAS_KV_START=kv_start is not None, HAS_SEGMENTS=segment_ids is not None,
        HAS_PROMPT=True, GATE_TANH=gate_tanh,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=_prompt_block(seq_p),
        PRECISION=_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out, out_main, lse, lse_p


def gated_attention_bwd(
    dout, q, k, v, prompt_k, prompt_v, gate, out_main, lse, lse_p, kv_start: Optional[torch.Tensor], causal: bool,
    scale: float, gate_tanh: bool, segment_ids: Optional[torch.Tensor] = None,
):
    """Returns (dq, dk, dv, d_prompt_k, d_prompt_v, d_gate), each shaped like its input."""
    bsz, seq_q, heads, dim = q.shape
    if q.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (q, k, v, prompt_k, prompt_v, gate))
    seq_p, group = prompt_k.shape[1], heads // k.shape[2]
    block_m, _, warps, _ = _config(dim, q.device)
    delta, delta_p, dgate_rows = (torch.empty_like(lse) for _ in range(3))
    gate_stride = 0 if gate.numel() == 1 else 1
    _gated_bwd_preprocess[(triton.cdiv(seq_q, block_m), bsz * heads)](
        q, prompt_k, prompt_v, gate, out_main, dout, lse_p, delta, delta_p, dgate_rows,
        *_strides3(q), *batch_strides(prompt_k, bsz), *batch_strides(prompt_v, bsz), *_strides3(out_main),
        *_strides3(dout),
        heads, group, seq_q, seq_p, gate_stride, scale,
        GATE_TANH=gate_tanh, HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_P=_prompt_block(seq_p), PRECISION=_precision(q.dtype),
        num_warps=warps,
    )
    prompt = PromptGrad(prompt_k, prompt_v, lse_p, delta_p, gate, gate_tanh)
    dq, dk, dv, dpk, dpv = backward_kernels(q, k, v, dout, lse, delta, kv_start, causal, scale, prompt, segment_ids)
    if prompt_k.shape[0] == 1 and bsz > 1:
        dpk, dpv = dpk.float().sum(0, keepdim=True), dpv.float().sum(0, keepdim=True)
    dgate = dgate_rows.sum(dim=(0, 2))  # (H,)
    if gate_tanh:
        dgate = dgate * (1 - torch.tanh(gate.float()) ** 2)
    if gate.numel() == 1:
        dgate = dgate.sum().view(gate.shape)
    return (dq, dk, dv, dpk.to(prompt_k.dtype), dpv.to(prompt_v.dtype),
            dgate.to(gate.dtype))
