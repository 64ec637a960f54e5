"""Batched generation with left padding, a KV cache, greedy or top-p sampling, and per-step streaming.

Prompts of different lengths are left-padded to one length L. Sample b's real tokens start at
kv_start[b] = L - len(prompt_b); its rotary positions count from 0 there, and ops.attention hides the
padded keys. One prefill forward, then one token per step for the whole batch.

Multimodal methods add what their training forward had: prefix_embeds (visual tokens placed before each
prompt's text, after its padding: [pad..., prefix, text], positions from 0 at the prefix), visual_prompts
(LLaMA-Adapter V2's per-sample prompt tokens) and a context that every forward runs in (LaVIN's routing).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, List, Optional, Sequence, Union

import torch


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches top_p; -inf the rest.

    logits: (B, V). The most likely token is always kept.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p}")
    if top_p == 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(top_p_filter(logits / temperature, top_p), dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: Optional[Union[int, Sequence[int]]] = None,
    pad_id: int = 0,
    seed: int = 0,
    on_step: Optional[Callable[[List[Optional[int]]], None]] = None,
    visual_prompts: Optional[torch.Tensor] = None,
    prefix_embeds: Optional[torch.Tensor] = None,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> List[List[int]]:
    """New tokens for each prompt (up to and including eos). on_step receives, after every step, the new
    token of each sample, or None for samples that have finished.

    eos_id: one id or several (a config's eos_token_id may be a list); None never stops early.
    temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the top-p nucleus,
    sampled with a CPU torch.Generator seeded with `seed` (the same tokens on any device).
    visual_prompts (B, L_p, hidden): per-sample visual prompt tokens (LLaMA-Adapter V2), given to the prefill;
    the decode steps reuse the prompt keys/values it stored in the KV cache.
    prefix_embeds (B, N, hidden): embedded tokens before each prompt's text (visual tokens); they count as
    the first N positions of the sample. context: entered once around the prefill and every decode step
    (e.g. methods.lavin.routed(model, modality)).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty token lists")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected a positive integer, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p}")
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"prompts: token ids must be in [0, {vocab}), got {bad[0]}")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id: expected an id in [0, {vocab}), got {pad_id}")
    stop = set() if eos_id is None else {eos_id} if isinstance(eos_id, int) else set(eos_id)
    device = next(model.parameters()).device
    bsz, width = len(prompts), max(len(p) for p in prompts)
    n_prefix = 0
    if prefix_embeds is not None:
        hidden = model.config.hidden_size
        if prefix_embeds.dim() != 3 or prefix_embeds.shape[0] != bsz or prefix_embeds.shape[2] != hidden:
            raise ValueError(f"prefix_embeds: expected shape ({bsz}, N, {hidden}) (prompts, tokens, hidden), "
                             f"got {tuple(prefix_embeds.shape)}")
        n_prefix = prefix_embeds.shape[1]
    pads = [width - len(p) for p in prompts]
    starts = torch.tensor(pads, dtype=torch.int32, device=device)
    ids = torch.tensor([[pad_id] * pad + list(p) for pad, p in zip(pads, prompts)], dtype=torch.long).to(device)
    length = n_prefix + width
    positions = (torch.arange(length, device=device)[None, :] - starts[:, None].long()).clamp_min(0)
    inputs = {"input_ids": ids}
    if prefix_embeds is not None:
        text = model.embed_tokens(ids)
        prefix = prefix_embeds.to(device=device, dtype=text.dtype)
        inputs = {"inputs_embeds": torch.stack([torch.cat([text[b, :pad], prefix[b], text[b, pad:]])
                                                for b, pad in enumerate(pads)])}

    cache = model.new_kv_cache(bsz, length + max_new_tokens)
    gen = torch.Generator().manual_seed(seed)
    out: List[List[int]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    with context():
        logits = model(**inputs, positions=positions, kv_cache=cache, kv_start=starts,
                       visual_prompts=visual_prompts)[:, -1]
        next_pos = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            tokens = _next_tokens(logits, temperature, top_p, gen)
            emitted: List[Optional[int]] = []
            for b, tok in enumerate(tokens.tolist()):  # one device sync per step
                if done[b]:
                    emitted.append(None)
                    continue
                out[b].append(tok)
                emitted.append(tok)
                done[b] = tok in stop
            if on_step is not None:
                on_step(emitted)
            if all(done) or step == max_new_tokens - 1:
                break
            logits = model(tokens[:, None], positions=next_pos, kv_cache=cache, kv_start=starts)[:, -1]
            next_pos = next_pos + 1
    return out
