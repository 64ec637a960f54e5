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

With several processes (`processes`, default torchrun's WORLD_SIZE) the figures are one process's, for the
run's `distributed` mode:
    ddp          every process holds the whole model; gradients count twice (DDP's buckets are a copy)
    fsdp         weights: each process's shard of every parameter (FSDP2 splits dim 0 into `processes`
                 chunks, the last padded), the buffers and the frozen vision tower whole;
                 gathered: what is all-gathered during the forward and backward: the root group (everything
                 outside the blocks: embeddings, final norm, lm_head, LaVIN's and LLaMA-Adapter's visual
                 projections) stays whole from its forward to the end of the backward, beside two blocks
                 (the one computing and the next, prefetched); a model whose parameters are shared across
                 blocks is one root group, gathered whole;
                 gradients and optimizer: the shards of the trainable parameters, plus the unsharded
                 gradients of the root and two blocks before they are reduce-scattered;
                 integer parameters (QPaCA's packed codes) whole on every process before torch 2.13, whose
                 FSDP2 cannot shard them (distributed.fsdp_shard).
python_tests/test_distributed.py checks the shards, the gathered set and the optimizer state against an
FSDP2 run on two processes.
"""

from __future__ import annotations

from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import torch
from torch import nn

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


class FsdpShares(NamedTuple):
    """Bytes one FSDP2 process holds of a set of parameters: `shards` between steps (with the parameters FSDP2
    cannot shard, whole), `gathered` at most during the forward and backward (the root group whole, and
    `blocks_gathered` blocks)."""

    shards: int
    gathered: int


def shard_bytes(p: torch.Tensor, processes: int) -> int:
    """Bytes of the first (largest) of FSDP2's `processes` dim-0 chunks of p: what each process allocates."""
    rows = p.shape[0] if p.dim() else 1
    return -(-rows // processes) * (p.numel() // max(rows, 1)) * p.element_size()


def _whole_bytes(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def fsdp_shares(model: nn.Module, processes: int, blocks_gathered: int = 2,
                which: Optional[Iterable[nn.Parameter]] = None) -> FsdpShares:
    """FsdpShares of `model`'s parameters (or of those in `which`) when each block of model.layers is an FSDP2
    group and the model the root, as distributed.wrap shards it (every block in the root group when a
    parameter is shared across blocks). The all-gathered copy of a group is `processes` padded shards."""
    from mmkernels.train.distributed import fsdp_shardable, shares_parameters_across_blocks

    keep = None if which is None else {id(p) for p in which}

    def counted(p) -> bool:
        return keep is None or id(p) in keep

    def shards(params) -> int:  # of the parameters FSDP2 shards on this torch (distributed.fsdp_shard)
        return sum(shard_bytes(p, processes) for p in params if counted(p) and fsdp_shardable(p))

    blocks = list(model.layers)
    if shares_parameters_across_blocks(model, blocks):
        blocks = []
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = shards(p for p in model.parameters() if id(p) not in in_blocks)
    per_block = sorted((shards(b.parameters()) for b in blocks), reverse=True)
    gathered = processes * (root + sum(per_block[:blocks_gathered]))
    whole = _whole_bytes(p for p in model.parameters() if counted(p) and not fsdp_shardable(p))
    return FsdpShares(shards(model.parameters()) + whole, gathered)


def layout(cfg: TrainConfig, processes: Optional[int] = None) -> Tuple[int, str]:
    """(processes, mode): `processes` (default: WORLD_SIZE, 1 without torchrun) and the mode cfg.distributed
    resolves to for them."""
    from mmkernels.train import distributed

    if processes is None:
        processes, source = distributed.world_size(), "WORLD_SIZE"
    else:
        source = "--processes"
    if processes < 1:
        raise ValueError(f"{source}: expected at least 1 process, got {processes}")
    return processes, distributed.resolve_mode(cfg.distributed, processes, source)


def estimate(cfg: TrainConfig, processes: Optional[int] = None) -> Dict[str, int]:
    """Bytes per category and "total", for one of `processes` processes (default: WORLD_SIZE, 1 without
    torchrun) in the mode cfg.distributed resolves to."""
    from mmkernels.train import method_specs
    from mmkernels.train.trainer import master_weights, tiny_vision_config

    processes, mode = layout(cfg, processes)
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
    master_weights(model)  # trainable parameters in float32, as the trainer holds them
    whole = list(model.buffers()) + ([] if vision is None else [*vision.parameters(), *vision.buffers()])
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "fsdp":
        held, mine = fsdp_shares(model, processes), fsdp_shares(model, processes, which=trainable)
        weights, gathered = held.shards, held.gathered
        gradients, optimizer = mine.shards + mine.gathered, 2 * mine.shards
    else:
        weights, gathered = _whole_bytes(model.parameters()), 0
        grads = _whole_bytes(trainable)
        gradients, optimizer = grads * (2 if mode == "ddp" else 1), 2 * grads
    weights += _whole_bytes(whole)
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
    out = {"weights": weights, "gathered": gathered, "gradients": gradients, "optimizer": optimizer,
           "activations": activations, "recompute": recompute, "logits": logits}
    out["total"] = sum(out.values())
    return out


def format_estimate(est: Dict[str, int], cfg: TrainConfig, processes: Optional[int] = None) -> str:
    processes, mode = layout(cfg, processes)
    where = "" if mode == "none" else f" on each of {processes} processes ({mode})"
    lines = [f"expected peak memory of one training step{where} ({cfg.method}, micro-batch {cfg.batch_size} x "
             f"{cfg.max_len} tokens, grad_checkpointing={cfg.grad_checkpointing}, fused_loss={cfg.fused_loss}):"]
    for key, value in est.items():
        if key != "gathered" or mode == "fsdp":
            lines.append(f"  {key:<12} {value / 2**20:>12,.1f} MiB")
    return "\n".join(lines)
