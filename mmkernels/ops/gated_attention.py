"""gated_prompt_attention: attention plus a gated, separately normalised prompt segment.

    out = softmax_main(q K^T s) V  +  g_h * softmax(q P_K^T s) P_V,    g = tanh(gate) | gate

The zero-init gated attention of LLaMA-Adapter (gate per head (H,) or one scalar (1,); gate_fn "tanh",
the default of the official training code, or "raw" as in PEFT's AdaptionPrompt and litgpt), and, with a
float gate and causal=False, the decoupled cross-attention of IP-Adapter / MACS (fixed scale lambda).
q (B, T, H, D); k, v (B, S, H_kv, D); prompt_k, prompt_v (1 or B, L_p, H_kv, D), batch 1 shared by all
samples. segment_ids (B, T) (packed samples, S == T) masks the main segment as in `attention`; the prompt
stays visible to every query. A zero gate gives exactly the base attention. Gradients: q, k, v, prompt_k, prompt_v (summed over
the batch when shared) and gate.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.ops.attention import _kernel_kv_start, _kernel_segment_ids, _unit_last, _validate_attention
from mmkernels.reference import attention as attn_ref
from mmkernels.reference import gated_attention as ref

OP = "gated_prompt_attention"
MAX_PROMPT_LEN = 128
backend.register_op(OP, ("triton", "reference"))


def _expand(t: Tensor, bsz: int) -> Tensor:
    return t.expand(bsz, *t.shape[1:])


@torch.library.custom_op("mmkernels::gated_prompt_attention_fwd", mutates_args=())
def gated_prompt_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor, gate: Tensor, kv_start: Optional[Tensor],
    causal: bool, scale: float, gate_fn: str, impl: str, segment_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out, the main term alone, lse of the main segment, lse of the prompt segment); lse: (B, H, T) float32.
    The backward saves the main term rather than out: the same memory as plain attention."""
    if impl == "triton":
        from mmkernels.kernels import gated_attention as kernels

        return kernels.gated_attention_fwd(q, k, v, prompt_k, prompt_v, gate, kv_start, causal, scale,
                                           gate_fn == "tanh", segment_ids)
    return ref.gated_prompt_attention_with_lse(q, k, v, prompt_k, prompt_v, gate, causal, gate_fn, scale, kv_start,
                                               segment_ids)


@torch.library.custom_op("mmkernels::gated_prompt_attention_bwd", mutates_args=())
def gated_prompt_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, prompt_k: Tensor, prompt_v: Tensor, gate: Tensor, out_main: Tensor,
    lse: Tensor, lse_p: Tensor, kv_start: Optional[Tensor], causal: bool, scale: float, gate_fn: str, impl: str,
    segment_ids: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    if impl == "triton":
        from mmkernels.kernels import gated_attention as kernels

        return kernels.gated_attention_bwd(dout, q, k, v, prompt_k, prompt_v, gate, out_main, lse, lse_p, kv_start,
                                           causal, scale, gate_fn == "tanh", segment_ids)
    bsz = q.shape[0]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    g = ref.gate_values(gate.to(acc), gate_fn)
    dq, dk, dv = attn_ref.attention_backward(dout.to(acc), q.to(acc), k.to(acc), v.to(acc), causal, scale, kv_start,
                                             segment_ids)
    pk, pv = _expand(prompt_k.to(acc), bsz), _expand(prompt_v.to(acc), bsz)
    dout_p = dout.to(acc) * g.view(1, 1, -1, 1)
    dq_p, dpk, dpv = attn_ref.attention_backward(dout_p, q.to(acc), pk, pv, False, scale, None)
    if prompt_k.shape[0] == 1 and bsz > 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    o_p = attn_ref.attention(q.to(acc), pk, pv, False, scale, None)
    dg = (dout.to(acc) * o_p).sum(dim=(0, 1, 3))  # (H,)
    if gate_fn == "tanh":
        dg = dg * (1 - g * g)
    if gate.numel() == 1:
        dg = dg.sum().view(gate.shape)
    return ((dq + dq_p).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(prompt_k.dtype),
            dpv.to(prompt_v.dtype), dg.to(gate.dtype))


@gated_prompt_attention_fwd.register_fake
def _(q, k, v, prompt_k, prompt_v, gate, kv_start, causal, scale, gate_fn, impl, segment_ids=None):
    bsz, seq_q, heads, _ = q.shape
    lse = q.new_empty(bsz, heads, seq_q, dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), lse, torch.empty_like(lse)


@gated_prompt_attention_bwd.register_fake
def _(dout, q, k, v, prompt_k, prompt_v, gate, out_main, lse, lse_p, kv_start, causal, scale, gate_fn, impl,
      segment_ids=None):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, prompt_k, prompt_v, gate))


def _setup(ctx, inputs, output):
    q, k, v, prompt_k, prompt_v, gate, kv_start, causal, scale, gate_fn, impl, segment_ids = inputs
    _out, out_main, lse, lse_p = output
    ctx.save_for_backward(q, k, v, prompt_k, prompt_v, gate, out_main, lse, lse_p, kv_start, segment_ids)
    ctx.causal, ctx.scale, ctx.gate_fn, ctx.impl = causal, scale, gate_fn, impl


def _backward(ctx, dout, _dout_main, _dlse, _dlse_p):
    q, k, v, prompt_k, prompt_v, gate, out_main, lse, lse_p, kv_start, segment_ids = ctx.saved_tensors
    grads = gated_prompt_attention_bwd(_unit_last(dout), q, k, v, prompt_k, prompt_v, gate, out_main, lse, lse_p,
                                       kv_start, ctx.causal, ctx.scale, ctx.gate_fn, ctx.impl, segment_ids)
    return (*grads, None, None, None, None, None, None)


gated_prompt_attention_fwd.register_autograd(_backward, setup_context=_setup)


def validate_prompt(q: Tensor, k: Tensor, prompt_k: Tensor, prompt_v: Tensor, gate: Union[Tensor, float],
                    gate_fn: str) -> Tensor:
    """Boundary checks of the prompt segment shared by the gated ops; returns the gate as a tensor."""
    bsz, _, heads, dim = q.shape
    heads_kv = k.shape[2]
    for name, t in (("prompt_k", prompt_k), ("prompt_v", prompt_v)):
        _checks.tensor(name, t, ndim=4)
        if t.shape[0] not in (1, bsz) or t.shape[2] != heads_kv or t.shape[3] != dim or t.shape[1] < 1:
            raise ValueError(f"{name}: expected shape (1 or {bsz}, L_p >= 1, {heads_kv}, {dim}), got {tuple(t.shape)}")
    if prompt_v.shape != prompt_k.shape:
        raise ValueError(f"prompt_v: expected the shape of prompt_k {tuple(prompt_k.shape)}, got {tuple(prompt_v.shape)}")
    if prompt_k.shape[1] > MAX_PROMPT_LEN:
        raise ValueError(f"prompt_k: prompt length {prompt_k.shape[1]} exceeds the supported {MAX_PROMPT_LEN}")
    _checks.same_dtype(q=q, prompt_k=prompt_k, prompt_v=prompt_v)
    _checks.one_of("gate_fn", gate_fn, ("tanh", "raw"))
    if not isinstance(gate, Tensor):
        if isinstance(gate, bool) or not isinstance(gate, (int, float)):
            raise TypeError(f"gate: expected a tensor of shape ({heads},) or (1,), or a float; got {type(gate).__name__}")
        gate = torch.full((1,), float(gate), dtype=torch.float32, device=q.device)
    _checks.tensor("gate", gate, ndim=1)
    if gate.shape[0] not in (1, heads):
        raise ValueError(f"gate: expected shape ({heads},) or (1,), got {tuple(gate.shape)}")
    _checks.same_device(q=q, prompt_k=prompt_k, prompt_v=prompt_v, gate=gate)
    return gate


def gated_prompt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prompt_k: Tensor,
    prompt_v: Tensor,
    gate: Union[Tensor, float],
    *,
    causal: bool = True,
    gate_fn: str = "tanh",
    scale: Optional[float] = None,
    kv_start: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """Attention over (k, v) plus g * attention over (prompt_k, prompt_v), one fused kernel; (B, T, H, D).

    gate: a tensor of shape (H,) or (1,) (learned), or a float (a fixed scale, no gradient).
    segment_ids (B, T), S == T: packed samples; masks the (k, v) segment only, the prompt is seen by all.
    """
    scale = _validate_attention(q, k, v, causal, scale, kv_start, segment_ids)
    gate = validate_prompt(q, k, prompt_k, prompt_v, gate, gate_fn)

    impl = backend.select(OP, q.device)
    kv_start = _kernel_kv_start(impl, q, kv_start)
    out, _, _, _ = gated_prompt_attention_fwd(
        _unit_last(q), _unit_last(k), _unit_last(v), _unit_last(prompt_k), _unit_last(prompt_v),
        gate.contiguous(), kv_start, bool(causal), float(scale), gate_fn, impl, _kernel_segment_ids(segment_ids),
    )
    return out
