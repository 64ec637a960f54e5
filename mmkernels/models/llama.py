"""A thin LLaMA on mmkernels.ops: readable, one module per concept, an explicit KV cache.

Parameter names are the HF names without the leading "model." so HF checkpoints load by name.
Attention and the MLP run through the fused ops (rope, attention, swiglu), the norms through rms_norm with
the residual add fused into it: the residual stream h is carried from one norm to the next.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, ContextManager, List, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import checkpoint as _checkpoint  # the attention core's (not patched with the blocks' below)
from torch.utils.checkpoint import checkpoint

from mmkernels import ops
from mmkernels.models.config import LlamaConfig
from mmkernels.models.kv_cache import KVCache
from mmkernels.nn import RMSNorm, ScaleBiasLinear


class PromptSegment(NamedTuple):
    """A gated prompt segment for one attention layer: keys/values (1 or B, L_p, H_kv, D) attended with
    their own softmax and added as gate_fn(gate) * attention (see ops.gated_prompt_attention)."""

    k: torch.Tensor
    v: torch.Tensor
    gate: torch.Tensor
    gate_fn: str


class _Checkpointing(threading.local):
    block = False  # inside a block that gradient checkpointing recomputes whole (forward or recompute)


_checkpointing = _Checkpointing()


@contextlib.contextmanager
def _whole_block_recomputed():
    before = _checkpointing.block
    _checkpointing.block = True
    try:
        yield
    finally:
        _checkpointing.block = before


class Attention(nn.Module):
    """Self-attention. `prompt`, when set (by a method such as LLaMA-Adapter), is a module called as
    prompt(attn, batch, dtype, visual_prompts, kv_cache, layer) -> PromptSegment: its segment is attended
    in the same fused kernel as the tokens.

    `recompute` (Llama.recompute_attention): in training, the attention's core, from the projections' outputs
    to the attention output (the epilogues of output-form ScaleBiasLinear projections, rope, the attention), is
    checkpointed: the backward recomputes it instead of keeping the rotated q and k, v and the output (and, with
    V2's scales, the scaled q, k, v: only the GEMM outputs W x, which the scales' gradients need anyway, stay).
    Gradients are bit-identical; the cost is the core's forward once more (its attention FLOPs). Not in a block
    that gradient checkpointing recomputes whole (Llama.checkpoint_blocks): that block keeps nothing inside, and
    a second checkpoint would run the attention a third time."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.prompt: Optional[nn.Module] = None
        self.recompute = False

    def _projections(self):
        return self.q_proj, self.k_proj, self.v_proj

    def _split_epilogues(self) -> bool:
        """Whether q, k and v are all output-form ScaleBiasLinear (V2): their epilogues go in the recomputed core."""
        return all(isinstance(p, ScaleBiasLinear) and p.form == "output" for p in self._projections())

    def _core(self, yq, yk, yv, cos, sin, pk, pv, gate, gate_fn, kv_start, segment_ids,
              epilogues: Optional[torch.dtype]):
        """The checkpointed part of a training forward: projection outputs to attention output (B, T, H, D);
        epilogues: the dtype of the projections' outputs (x's) when yq, yk, yv are W x before their epilogues."""
        if epilogues is not None:
            yq, yk, yv = (p.epilogue(y, epilogues) for p, y in zip(self._projections(), (yq, yk, yv)))
        bsz, seq = yq.shape[:2]
        q = yq.view(bsz, seq, self.n_heads, self.head_dim)
        k = yk.view(bsz, seq, self.n_kv_heads, self.head_dim)
        v = yv.view(bsz, seq, self.n_kv_heads, self.head_dim)
        q, k = ops.rope(q, k, cos, sin)
        if pk is None:
            return ops.attention(q, k, v, causal=True, kv_start=kv_start, segment_ids=segment_ids)
        return ops.gated_prompt_attention(q, k, v, pk, pv, gate, causal=True, gate_fn=gate_fn, kv_start=kv_start,
                                          segment_ids=segment_ids)

    def _recomputed(self, x, cos, sin, layer, visual_prompts, kv_start, segment_ids):
        bsz, seq, _ = x.shape
        if self._split_epilogues():
            ys, epilogues = [F.linear(x, p.weight) for p in self._projections()], x.dtype
        else:
            ys, epilogues = [p(x) for p in self._projections()], None
        dtype = ys[0].dtype if epilogues is None else epilogues  # q's, as forward() has it
        seg = None if self.prompt is None else self.prompt(self, bsz, dtype, visual_prompts, None, layer)
        prompt = (None, None, None, None) if seg is None else (seg.k, seg.v, seg.gate, seg.gate_fn)
        out = _checkpoint.checkpoint(self._core, *ys, cos, sin, *prompt, kv_start, segment_ids, epilogues,
                                     use_reentrant=False)
        return self.o_proj(out.reshape(bsz, seq, self.n_heads * self.head_dim))

    def forward(self, x, cos, sin, layer: int, kv_cache: Optional[KVCache], kv_start: Optional[torch.Tensor],
                visual_prompts: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None):
        if self.recompute and kv_cache is None and torch.is_grad_enabled() and not _checkpointing.block:
            return self._recomputed(x, cos, sin, layer, visual_prompts, kv_start, segment_ids)
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(bsz, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(bsz, seq, self.n_kv_heads, self.head_dim)
        q, k = ops.rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        seg = None if self.prompt is None else self.prompt(self, bsz, q.dtype, visual_prompts, kv_cache, layer)
        if kv_cache is not None and seq <= ops.MAX_DECODE_QUERIES and not torch.is_grad_enabled():
            # Generation steps: split-KV decoding over the cache, the prompt segment in the same kernel.
            prompt = {} if seg is None else dict(prompt_k=seg.k, prompt_v=seg.v, gate=seg.gate, gate_fn=seg.gate_fn)
            out = ops.decode_attention(q, k, v, kv_start=kv_start, **prompt)
        elif seg is None:
            out = ops.attention(q, k, v, causal=True, kv_start=kv_start, segment_ids=segment_ids)
        else:
            out = ops.gated_prompt_attention(q, k, v, seg.k, seg.v, seg.gate, causal=True, gate_fn=seg.gate_fn,
                                             kv_start=kv_start, segment_ids=segment_ids)
        return self.o_proj(out.reshape(bsz, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_proj, self.up_proj
        if all(isinstance(m, ScaleBiasLinear) and m.form == "output" for m in (gate, up)):
            # LLaMA-Adapter V2's bias/scale on both: the epilogues inside the swiglu kernel
            return self.down_proj(ScaleBiasLinear.fused_swiglu(gate, up, x))
        return self.down_proj(ops.swiglu(gate(x), up(x)))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, residual, cos, sin, kv_cache, kv_start, visual_prompts=None, segment_ids=None):
        """x: the previous sublayer's output (not yet added); residual: the stream before it, or None when x is
        the whole stream (the embeddings; a method's hook may return it too). Returns this block's MLP output
        and the stream before it, for the next fused add + norm."""
        if residual is None:
            h, normed = x, self.input_layernorm(x)
        else:
            normed, h = self.input_layernorm(x, residual)
        attn = self.self_attn(normed, cos, sin, self.layer, kv_cache, kv_start, visual_prompts, segment_ids)
        normed, h = self.post_attention_layernorm(attn, h)
        return self.mlp(normed), h


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False
        self.checkpoint_blocks: Optional[int] = None  # with gradient_checkpointing: the first N blocks; None: all
        # Functions f(model) -> context manager, for methods that keep per-forward state outside the blocks'
        # arguments (LaVIN's routing weights, HyperLLaVA's guidance). With gradient checkpointing each is called
        # as a block's forward is checkpointed, and what it returns is entered around that block's
        # recomputation in the backward: the state the forward saw is there again.
        self.recompute_contexts: List[Callable[["Llama"], ContextManager]] = []
        # Not a buffer: model.to(bfloat16) must not round the rotary frequencies.
        with torch.device("cpu"):  # also when the model is built on the meta device for loading
            self._inv_freq = ops.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        *,
        inputs_embeds: Optional[torch.Tensor] = None,
        positions: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        kv_start: Optional[torch.Tensor] = None,
        visual_prompts: Optional[torch.Tensor] = None,
        hidden_only: bool = False,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> float32 logits (B, T, vocab).

        inputs_embeds (B, T, hidden): instead of input_ids, embeddings to run (e.g. visual tokens
        concatenated with embedded text, as LLaVA-style methods feed images); exactly one of the two.

        positions (T,) or (B, T): rotary positions (default: continuing after the cache's length).
        kv_cache: keys/values of earlier positions; this call appends T positions to it.
        kv_start (B,): cache index of each sample's first real token (left padding is masked).
        visual_prompts (B, L_p, hidden): per-sample tokens that a method's attention prompts fuse (LLaMA-Adapter
        V2); with a KV cache, give them at the prefill only: the prompt keys/values are kept in the cache.
        hidden_only: return the final normed hidden states (B, T, hidden) in the model dtype instead of the
        logits (a trainer applies lm_head inside a chunked fused loss, never materialising all logits).
        segment_ids (B, T) int32/int64: several samples packed in a row (no KV cache); a token attends only to
        earlier tokens with its id, and (when positions is not given) each sample's rotary positions restart at 0.

        With `gradient_checkpointing` set (and grad enabled) each block's activations are recomputed in the
        backward instead of saved; with `checkpoint_blocks` = N as well, only the first N blocks' (the others
        save theirs: memory traded for the recomputation, block by block).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("input_ids, inputs_embeds: expected exactly one of them, got "
                             f"{'both' if input_ids is not None else 'neither'}")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
            x = self.embed_tokens(input_ids)
        else:
            hidden = self.config.hidden_size
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden:
                raise ValueError(f"inputs_embeds: expected shape (B, T, {hidden}), got {tuple(inputs_embeds.shape)}")
            x = inputs_embeds
        seq = x.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids: packed samples need a forward without kv_cache, got a kv_cache")
            if positions is None:
                # Each packed sample starts at rotary position 0, as when it runs alone.
                idx = torch.arange(seq, device=x.device).expand(segment_ids.shape[0], seq)
                new = torch.ones_like(segment_ids, dtype=torch.bool)
                new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
                positions = idx - torch.where(new, idx, 0).cummax(1).values
        if positions is None:
            positions = torch.arange(past, past + seq, device=x.device)
        if positions.dim() not in (1, 2) or positions.shape[-1] != seq:
            raise ValueError(f"positions: expected shape ({seq},) or (B, {seq}), got {tuple(positions.shape)}")
        cos, sin = ops.rope_cos_sin(positions, self._inv_freq)
        residual = None
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is None
        for i, block in enumerate(self.layers):
            if recompute and (self.checkpoint_blocks is None or i < self.checkpoint_blocks):
                x, residual = checkpoint(block, x, residual, cos, sin, None, kv_start, visual_prompts, segment_ids,
                                         use_reentrant=False, context_fn=self._checkpoint_contexts)
            else:
                x, residual = block(x, residual, cos, sin, kv_cache, kv_start, visual_prompts, segment_ids)
        if kv_cache is not None:
            kv_cache.advance(seq)
        x = self.norm(x) if residual is None else self.norm(x, residual)[0]
        return x if hidden_only else self.lm_head(x).float()

    @property
    def recompute_attention(self) -> bool:
        """Every Attention's recompute (also inside a method's wrapper, e.g. LaVIN's): the attention's core
        recomputed in the backward (selective recomputation: the part of a block with the most saved bytes per
        FLOP)."""
        return any(m.recompute for m in self.modules() if isinstance(m, Attention))

    @recompute_attention.setter
    def recompute_attention(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.recompute = bool(on)

    def _checkpoint_contexts(self):
        """checkpoint's context_fn: around the forward, the mark of a block recomputed whole (its attention is not
        checkpointed again); around the recompute, the mark and the methods' saved state."""
        restores = [make(self) for make in self.recompute_contexts]

        @contextlib.contextmanager
        def recompute():
            with contextlib.ExitStack() as stack:
                for ctx in restores:
                    stack.enter_context(ctx)
                stack.enter_context(_whole_block_recomputed())
                yield

        return _whole_block_recomputed(), recompute()

    def _apply(self, fn, recurse=True):
        # .to(device) / .cuda() move the rotary frequencies too; dtype casts leave them in float32.
        super()._apply(fn, recurse)
        device = fn(torch.empty(0, device=self._inv_freq.device)).device
        if device.type != "meta":
            self._inv_freq = self._inv_freq.to(device)
        return self

    def new_kv_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed_tokens.weight
        c = self.config
        return KVCache(c.num_hidden_layers, batch, max_len, c.num_key_value_heads, c.head_dim, p.dtype, p.device)

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None, device=None) -> "Llama":
        from mmkernels.models.loading import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path: str) -> None:
        from mmkernels.models.loading import save_pretrained

        save_pretrained(self, path)

    def generate(self, prompts, **kwargs):
        from mmkernels.models.generation import generate

        return generate(self, prompts, **kwargs)
