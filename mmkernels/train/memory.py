"""`mmkernels train --estimate`: the expected peak memory of a run, split into weights, gradients, optimizer
state, activations and logits, from the shapes alone (the model is built on the meta device).

    weights      every parameter and buffer at its dtype (frozen base in `dtype`, or QPaCA's quantized base
                 and full-precision columns; trainable parameters in float32; rope tables, column indices)
    gradients    float32, trainable parameters only
    optimizer    AdamW: two float32 moments per trainable parameter
    activations  what the forward saves for the backward, for one micro-batch of batch_size x max_len
                 tokens: per block the tensors the LLaMA block saves (see _saved_per_token); with
                 grad_checkpointing only each block's inputs (the hidden state and the residual stream)
    recompute    with grad_checkpointing, one block's saved tensors while the backward recomputes it
    logits       fused loss: one chunk of (chunk x vocab) float32 logits; otherwise the full (tokens x vocab)
                 logits in float32, their gradient, and the cross-entropy's softmax
The activation count is an estimate of what the ops save (the attention keeps no (T x T) matrix; prompt
and adapter terms are small and left out); python_tests/test_train.py checks it against the bytes the
autograd graph actually saves on a tiny model.
"""

from __future__ import annotations

from typing import Dict

import torch

from mmkernels.models import Llama, LlamaConfig
from mmkernels.train.config import TrainConfig

DEFAULT_LOSS_CHUNK = 4096  # tokens per chunk when the op chooses (see ops.linear_cross_entropy)


def _dtype(cfg: TrainConfig) -> torch.dtype:
    from mmkernels import _checks
    from mmkernels.train.trainer import resolve_dtype

    return resolve_dtype(cfg.dtype, _checks.device(cfg.device))


def _saved_per_token(c: LlamaConfig, act_bytes: int) -> int:
    """Bytes one block saves per token: the norm inputs (x, residual stream) and their rstd, q/k/v and the
    attention output + lse, the o_proj input, gate/up (swiglu inputs) and the down_proj input."""
    d, kv, inter, heads = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size, c.num_attention_heads
    tensors = 2 * d + (d + 2 * kv) + d + d + 2 * d + 2 * inter + inter
    return tensors * act_bytes + (2 + heads) * 4  # + fp32 rstd of two norms and the lse of every head


def estimate(cfg: TrainConfig) -> Dict[str, int]:
    """Bytes per category and "total"."""
    from mmkernels.train import method_specs
    from mmkernels.train.trainer import tiny_vision_config

    dtype = _dtype(cfg)
    config = LlamaConfig.tiny() if cfg.model is None else LlamaConfig.from_json(cfg.model)
    with torch.device("meta"):
        model = Llama(config).to(dtype)
        vision = None
        if cfg.vision is not None:
            from mmkernels.models.vision import VisionTower

            if cfg.vision == "tiny":
                vision_config = tiny_vision_config()
            else:
                from transformers import CLIPVisionConfig

                vision_config = CLIPVisionConfig.from_pretrained(cfg.vision, local_files_only=True)
            vision = VisionTower.from_config(vision_config).to(dtype)
        method_specs.get(cfg.method).apply(model, cfg.method_options, vision)
    params = list(model.parameters()) + ([] if vision is None else list(vision.parameters()))
    buffers = list(model.buffers()) + ([] if vision is None else list(vision.buffers()))
    weights = sum(t.numel() * t.element_size() for t in params + buffers)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    act_bytes = torch.empty(0, dtype=dtype).element_size()
    tokens = cfg.batch_size * cfg.max_len
    per_block = _saved_per_token(config, act_bytes) * tokens
    layers = config.num_hidden_layers
    if cfg.grad_checkpointing:
        activations, recompute = layers * 2 * config.hidden_size * act_bytes * tokens, per_block
    else:
        activations, recompute = layers * per_block, 0
    activations += 2 * config.hidden_size * act_bytes * tokens  # embeddings and the final norm
    vocab = config.vocab_size
    if cfg.fused_loss:
        logits = min(tokens, cfg.loss_chunk or DEFAULT_LOSS_CHUNK) * vocab * 4
    else:
        logits = tokens * vocab * (4 + 4 + 4)
    out = {"weights": weights, "gradients": 4 * trainable, "optimizer": 8 * trainable, "activations": activations,
           "recompute": recompute, "logits": logits}
    out["total"] = sum(out.values())
    return out


def format_estimate(est: Dict[str, int], cfg: TrainConfig) -> str:
    lines = [f"expected peak memory of one training step ({cfg.method}, micro-batch {cfg.batch_size} x "
             f"{cfg.max_len} tokens, grad_checkpointing={cfg.grad_checkpointing}, fused_loss={cfg.fused_loss}):"]
    for key, value in est.items():
        lines.append(f"  {key:<12} {value / 2**20:>12,.1f} MiB")
    return "\n".join(lines)
