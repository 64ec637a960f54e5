"""decode_attention: a few new query tokens against a KV cache, with an optional gated prompt segment.

    out = softmax_causal(q K^T s) V  [+ g_h * softmax(q P_K^T s) P_V],   g = tanh(gate) | gate

The inference step of generation (LLaMA-Adapter's gated prompt included): q (B, T, H, D) with
T <= MAX_DECODE_QUERIES are the last T positions of the S keys (causal, bottom-right aligned, as in
`attention`); k, v (B, S, H_kv, D) may be strided views of a preallocated cache; kv_start (B,) hides left
padding; prompt_k, prompt_v (1 or B, L_p, H_kv, D) are computed once per model (batch 1, text prompts) or
once per request at prefill (batch B, visual prompts), never per step. Forward only: training goes through
`attention` / `gated_prompt_attention`, which have backward kernels.

The kernels split the cache into chunks processed in parallel (flash-decoding), each with its own online
softmax, and merge the chunks' partial results by their log-sum-exps; the prompt segment is one more chunk
with a separate softmax, added with its gate at the merge. A row that sees no key gets 0 from the main term.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from mmkernels import backend
from mmkernels.ops.attention import _kernel_kv_start, _unit_last, _validate_attention
from mmkernels.ops.gated_attention import validate_prompt
from mmkernels.reference import attention as attn_ref
from mmkernels.reference import gated_attention as gated_ref

OP = "decode_attention"
MAX_DECODE_QUERIES = 16
backend.register_op(OP, ("cuda", "triton", "reference"))


@torch.library.custom_op("mmkernels::decode_attention", mutates_args=())
def decode_attention_op(
    q: Tensor, k: Tensor, v: Tensor, prompt_k: Optional[Tensor], prompt_v: Optional[Tensor], gate: Optional[Tensor],
    kv_start: Optional[Tensor], scale: float, gate_fn: str, impl: str,
) -> Tensor:
    if impl == "cuda":
        return backend.cuda_ops().decode_attention(q, k, v, prompt_k, prompt_v, gate, kv_start, scale, gate_fn == "tanh")
    if impl == "triton":
        from mmkernels.kernels import decode_attention as kernels

        return kernels.decode_attention_fwd(q, k, v, prompt_k, prompt_v, gate, kv_start, scale, gate_fn == "tanh")
    if prompt_k is None:
        return attn_ref.attention_with_lse(q, k, v, True, scale, kv_start)[0]
    return gated_ref.gated_prompt_attention_with_lse(q, k, v, prompt_k, prompt_v, gate, True, gate_fn, scale,
                                                     kv_start)[0]


@decode_attention_op.register_fake
def _(q, k, v, prompt_k, prompt_v, gate, kv_start, scale, gate_fn, impl):
    return q.new_empty(q.shape)


CUDA_HEAD_DIMS = (64, 128)


def _cuda_kernel_serves(q: Tensor) -> bool:
    """Shapes the csrc kernel takes; the automatic choice sends others to Triton (a forced `cuda` raises)."""
    return q.shape[-1] in CUDA_HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    prompt_k: Optional[Tensor] = None,
    prompt_v: Optional[Tensor] = None,
    gate: Union[Tensor, float, None] = None,
    gate_fn: str = "tanh",
    scale: Optional[float] = None,
    kv_start: Optional[Tensor] = None,
) -> Tensor:
    """Causal attention of T <= 16 new queries over the cache, plus the gated prompt segment when
    prompt_k/prompt_v/gate are given; (B, T, H, D). Inference only (raises if a gradient is requested)."""
    scale = _validate_attention(q, k, v, True, scale, kv_start)
    bsz, seq_q, heads, dim = q.shape
    if seq_q > MAX_DECODE_QUERIES:
        raise ValueError(f"q: decode_attention takes at most {MAX_DECODE_QUERIES} new queries, got T={seq_q}; "
                         f"use ops.attention for a prefill")
    if torch.is_grad_enabled() and any(t is not None and isinstance(t, Tensor) and t.requires_grad
                                       for t in (q, k, v, prompt_k, prompt_v, gate)):
        raise ValueError("decode_attention: it has no backward; call it under torch.no_grad() / inference_mode, "
                         "or use ops.attention / ops.gated_prompt_attention for training")
    given = [name for name, t in (("prompt_k", prompt_k), ("prompt_v", prompt_v), ("gate", gate)) if t is not None]
    if given and len(given) != 3:
        raise ValueError(f"prompt_k, prompt_v, gate: give all three or none, got only {given}")
    if prompt_k is not None:
        gate = validate_prompt(q, k, prompt_k, prompt_v, gate, gate_fn)
        prompt_k, prompt_v, gate = _unit_last(prompt_k), _unit_last(prompt_v), gate.float().contiguous()

    impl = backend.select(OP, q.device)
    if impl == "cuda" and backend.forced_backend() is None and not _cuda_kernel_serves(q):
        impl = "triton"
    if impl == "cuda" and not _cuda_kernel_serves(q):
        raise ValueError(f"q: head dim {dim} / dtype {q.dtype} is not supported by the cuda decode_attention "
                         f"kernel; expected head dim in {CUDA_HEAD_DIMS}")
    kv_start = _kernel_kv_start(impl, q, kv_start)
    return decode_attention_op(_unit_last(q), _unit_last(k), _unit_last(v), prompt_k, prompt_v, gate, kv_start,
                               float(scale), gate_fn, impl)
