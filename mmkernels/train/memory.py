"""`mmkernels train --estimate`: the expected peak memory of a run, split into weights, gradients, optimizer
state, activations and logits, from the shapes alone (the model is built on the meta device).

    weights      every parameter and buffer at its dtype (frozen base in `dtype`, or QPaCA's quantized base
                 and full-precision columns; trainable parameters in float32; rope tables, column indices)
    gradients    float32, trainable parameters only
    optimizer    AdamW: two float32 moments per trainable parameter
    activations  what the forward and the loss save for the backward, for one micro-batch of batch_size x
                 max_len tokens (images for every sample of a multimodal method with a vision tower): traced,
                 not a formula: the training forward runs on the meta device (shapes, no data) and every
                 tensor that autograd saves is counted once per storage, parameters left out (see
                 saved_activations); with grad_checkpointing, what stays from the forward: the tensors saved
                 outside the blocks and each block's inputs (which the recompute needs)
    recompute    with grad_checkpointing, the largest block's saved tensors while the backward recomputes it
    logits       what the loss adds beyond its saved tensors: fused, one chunk of (chunk x vocab) float32
                 logits; otherwise two float32 (tokens x vocab) gradients in the backward (the log-softmax
                 output it saves is among the activations)
The trace runs the ops' fake (shape) implementations, which return what the CPU and GPU paths return, and
the methods' own modules, so every method's saved tensors are in it (V2's scale inputs, LoRA's x, PaCA's
x_I, LaVIN's and HyperLLaVA's adapters, the vision tower); python_tests/test_memory.py checks it against the
bytes saved by the same forward on real tensors, for every method. Not in it: the backward's transient
tensors beyond the loss chunk and a recomputed block, allocator rounding and fragmentation, CUDA's and
NCCL's own buffers, and autocast: the trace runs the model's dtypes as they are (autocast does not apply to
meta tensors). With a 16-bit base under CPU autocast, V1, V2 without images, LoRA, PaCA, QPaCA and Compacter
save exactly the traced bytes (tested); LaVIN, HyperLLaVA and V2 with images differ on their small float32
paths (routers, hypernetworks, visual projections), where autocast saves 16-bit copies of float32 weights
and 16-bit activations instead of float32 ones: on the test's tiny model -16 bytes (LaVIN, text), +0.3% (V2
with images), +11% (LaVIN with images), +21% (HyperLLaVA with images), none of it in the tensors that grow
with the text.

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

import contextlib
from typing import Dict, Iterable, Iterator, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels.models import Llama, LlamaConfig
from mmkernels.train.config import TrainConfig

DEFAULT_LOSS_CHUNK = 4096  # tokens per chunk when the op chooses (see ops.linear_cross_entropy)


def _dtype(cfg: TrainConfig) -> torch.dtype:
    from mmkernels import _checks
    from mmkernels.train.trainer import resolve_dtype

    return resolve_dtype(cfg.dtype, _checks.device(cfg.device))


class SavedActivations(NamedTuple):
    """Bytes autograd saves in one forward (each storage once, parameters and buffers left out): `total`,
    `outside` the blocks (embeddings, visual path, final norm, loss), each block's own (`per_block`, the
    tensors saved while it runs) and, for gradient checkpointing, `kept`: what stays when the blocks are
    recomputed (`outside` and every block's tensor inputs)."""

    total: int
    outside: int
    per_block: Tuple[int, ...]
    kept: int


@contextlib.contextmanager
def _flash_sdpa_on_meta() -> Iterator[None]:
    """F.scaled_dot_product_attention on meta tensors takes the math path, which saves the (T x T)
    probabilities; on CPU and GPU tensors it takes a flash path, which saves q, k, v, the output and the
    log-sum-exp. Inside this context a meta call without dropout runs the CPU flash op (it has a meta kernel),
    so the trace saves what the real forward saves (the attention of the vision tower and of the visual
    projection, whose nn.MultiheadAttention looks the function up in torch.nn.functional at each call)."""
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if query.device.type == "meta" and dropout_p == 0.0 and not enable_gqa:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)[0]
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_activations(loss_module: nn.Module, batch) -> SavedActivations:
    """Run loss_module(batch) (the trainer's LossModule: the method's inputs, the model, the token loss) and
    count what autograd saves for the backward. On the meta device it costs no memory and no compute, which
    is how estimate() uses it; on real tensors it measures the same thing (the tests compare the two)."""
    model = loss_module.model
    params = {t.untyped_storage()._cdata for t in [*loss_module.parameters(), *loss_module.buffers()]}
    vision = getattr(loss_module, "_vision", [None])[0]
    if vision is not None:
        params |= {t.untyped_storage()._cdata for t in [*vision.parameters(), *vision.buffers()]}
    sizes: Dict[int, int] = {}
    alive = []  # every noted tensor, so that no storage is freed and its address reused during the trace
    outside: set = set()
    per_block: Dict[int, set] = {i: set() for i in range(len(model.layers))}
    inputs: set = set()
    current = [None]

    def note(t: torch.Tensor, into: set) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params:
            sizes[key] = storage.nbytes()
            into.add(key)
            alive.append(t)

    def pack(t):
        note(t, outside if current[0] is None else per_block[current[0]])
        return t

    def enter(i):
        def hook(_module, args):
            current[0] = i
            for a in args:
                if torch.is_tensor(a):
                    note(a, inputs)
        return hook

    def leave(_module, _args, _out):
        current[0] = None

    handles = []
    for i, block in enumerate(model.layers):
        handles += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave)]
    recompute = model.gradient_checkpointing
    model.gradient_checkpointing = False  # the same graph, every block's saved tensors seen
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_sdpa_on_meta():
            loss_module(batch)
    finally:
        model.gradient_checkpointing = recompute
        for h in handles:
            h.remove()

    def total(*sets) -> int:
        return sum(sizes[k] for k in set().union(*sets))

    blocks = list(per_block.values())
    return SavedActivations(total(outside, *blocks), total(outside), tuple(total(b) for b in blocks),
                            total(outside, inputs))


def traced_batch(cfg: TrainConfig, spec, vision: Optional[nn.Module], device):
    """A data Batch of batch_size x max_len tokens on `device`, every token trained, an image per sample when
    the method is multimodal and has a vision tower (unless packed: packing takes text samples only); packed
    rows give positions and segment ids."""
    from mmkernels.train.data import Batch
    from mmkernels.train.trainer import image_size

    shape = (cfg.batch_size, cfg.max_len)
    ids = torch.zeros(shape, dtype=torch.long, device=device)
    images = None
    if vision is not None and spec.multimodal and not cfg.pack:
        size = image_size(vision)
        images = torch.zeros(cfg.batch_size, 3, size, size, device=device)
    has_image = torch.full((cfg.batch_size,), images is not None, dtype=torch.bool, device=device)
    packed = dict(positions=ids.clone(), segment_ids=ids.clone()) if cfg.pack else {}
    return Batch(ids, ids.clone(), torch.ones(shape, dtype=torch.bool, device=device), images, has_image, **packed)


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
    from mmkernels.train.trainer import LossModule, master_weights, tiny_vision_config

    processes, mode = layout(cfg, processes)
    spec = method_specs.get(cfg.method)
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
            vision = VisionTower.from_config(vision_config).to(dtype).eval()  # as the trainer's
        spec.apply(model, cfg.method_options, vision)
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
    loss_module = LossModule(model, spec, vision, cfg.fused_loss, cfg.loss_chunk)
    saved = saved_activations(loss_module, traced_batch(cfg, spec, vision, "meta"))
    if cfg.grad_checkpointing:
        activations, recompute = saved.kept, max(saved.per_block, default=0)
    else:
        activations, recompute = saved.total, 0
    tokens = cfg.batch_size * cfg.max_len
    vocab = config.vocab_size
    if cfg.fused_loss:
        logits = min(tokens, cfg.loss_chunk or DEFAULT_LOSS_CHUNK) * vocab * 4
    else:
        logits = tokens * vocab * (4 + 4)  # the gradients through log_softmax (its saved output is traced)
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
