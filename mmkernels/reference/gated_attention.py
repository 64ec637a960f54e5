"""Attention with a gated, separately normalised prompt segment (LLaMA-Adapter; IP-Adapter / MACS).

    out = softmax_main(q K^T s) V + g_h * softmax(q P_K^T s) P_V

The main segment is the usual (causal or not, left-padding and packed-segment aware) attention over the
tokens; the prompt segment has no mask (every query sees it, whatever its segment) and its own softmax. g = tanh(gate) or gate ("raw"), per head (H,) or one scalar (1,).
prompt_k / prompt_v: (1 or B, L_p, H_kv, D); batch 1 is shared by every sample (text prompts).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from mmkernels.reference.attention import attention_with_lse


def gate_values(gate: torch.Tensor, gate_fn: str) -> torch.Tensor:
    return torch.tanh(gate) if gate_fn == "tanh" else gate


def gated_prompt_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompt_k: torch.Tensor,
    prompt_v: torch.Tensor,
    gate: torch.Tensor,
    causal: bool = True,
    gate_fn: str = "tanh",
    scale: Optional[float] = None,
    kv_start: Optional[torch.Tensor] = None,
    segment_ids: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, the main term alone, lse of the main segment, lse of the prompt segment); lse (B, H, T)."""
    bsz = q.shape[0]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q32, k32, v32, pk, pv = (t.to(acc) for t in (q, k, v, prompt_k, prompt_v))
    main, lse = attention_with_lse(q32, k32, v32, causal, scale, kv_start, segment_ids)
    prompt, lse_p = attention_with_lse(q32, pk.expand(bsz, *pk.shape[1:]), pv.expand(bsz, *pv.shape[1:]), False,
                                       scale, None)
    g = gate_values(gate.to(acc), gate_fn).view(1, 1, -1, 1)
    return (main + g * prompt).to(q.dtype), main.to(q.dtype), lse, lse_p


def gated_prompt_attention(q, k, v, prompt_k, prompt_v, gate, causal=True, gate_fn="tanh", scale=None,
                           kv_start=None, segment_ids=None) -> torch.Tensor:
    return gated_prompt_attention_with_lse(q, k, v, prompt_k, prompt_v, gate, causal, gate_fn, scale, kv_start,
                                           segment_ids)[0]
