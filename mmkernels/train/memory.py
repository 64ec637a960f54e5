"""`mmkernels train --estimate`: the expected peak memory of a run, split into weights, gradients, optimizer
state, activations, logits and the backward's tensors, from the shapes alone (the model is built on the meta device).

    weights      every parameter and buffer at its dtype (frozen base in `dtype`, or QPaCA's quantized base
                 and full-precision columns; trainable parameters in float32; rope tables, column indices)
    gradients    float32, trainable parameters only
    optimizer    AdamW: two float32 moments per trainable parameter
    activations  }  the peak of one training step's forward and backward, for one micro-batch of batch_size x
    logits       }  max_len tokens (images for every sample of a multimodal method with a vision tower), split by
    backward     }  where the bytes live then were allocated (step_peak): by the forward of the method's inputs
                 and the model (activations: what autograd saved for the backward and still holds; with
                 grad_checkpointing only the tensors outside the recomputed blocks and their inputs; with
                 recompute_attention not the attention's q, k, v and output), by the loss (its tensors and
                 gradients; the fused loss's chunk of logits while its op runs; the unfused loss's float32
                 tokens x vocab tensors), by the model's backward (activation gradients, a recomputed block)
The step is traced, not a formula: it runs on the meta device (shapes, no data), every storage an op allocates
is an event, every storage's death (a weak reference) another, and the peak is the largest sum of the live
ones; parameters, buffers, the batch and the parameters' gradients (counted whole above) are left out. The
ops' fake (shape) implementations return what the CPU and GPU paths return, so every method's tensors are in
it (V2's scale inputs, LoRA's x, PaCA's x_I, LaVIN's and HyperLLaVA's adapters, the vision tower);
python_tests/test_memory.py checks, for every method with and without gradient checkpointing, that the meta
step peaks where the same step on real tensors peaks, at the same bytes. Not in it: the ops' own scratch
other than the fused loss's chunk of logits (per-tile partial sums, cuBLAS's workspace), allocator rounding
and fragmentation, CUDA's and NCCL's own buffers, the optimizer step's temporaries (after the backward has
freed the activations), and autocast: the trace runs the model's dtypes as they are (autocast does not
apply to meta tensors). What the forward saves (saved_activations) under CPU autocast with a 16-bit base is
exactly the traced bytes for V1, V2 without images, LoRA, PaCA, QPaCA and Compacter (tested); LaVIN,
HyperLLaVA and V2 with images differ on their small float32 paths (routers, hypernetworks, visual
projections), where autocast saves 16-bit copies of float32 weights and 16-bit activations instead of float32
ones: on the test's tiny model -16 bytes (LaVIN, text), +0.3% (V2 with images), +11% (LaVIN with images),
+21% (HyperLLaVA with images), none of it in the tensors that grow with the text.

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
import dataclasses
import re
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mmkernels.models import Llama, LlamaConfig
from mmkernels.train.config import TrainConfig

def _dtype(cfg: TrainConfig) -> torch.dtype:
    from mmkernels import _checks
    from mmkernels.train.trainer import resolve_dtype

    return resolve_dtype(cfg.dtype, _checks.device(cfg.device))


class SavedActivations(NamedTuple):
    """Bytes autograd saves in one forward (each storage once, parameters and buffers left out): `total`,
    `outside` the blocks (embeddings, visual path, final norm, loss), each block's own (`per_block`, the
    tensors saved while it runs) and, for gradient checkpointing, `kept`: what stays when every block is
    recomputed (`outside` and every block's tensor inputs). The forward runs without recomputation whatever the
    model is set to (its gradient_checkpointing, checkpoint_blocks, recompute_attention): step_peak traces those."""

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
        # the CPU flash op takes fewer kv heads as they are (with enable_gqa; without it a real call refuses them)
        if query.device.type == "meta" and dropout_p == 0.0 and (enable_gqa or key.shape[-3] == query.shape[-3]):
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
    recompute, attention = model.gradient_checkpointing, model.recompute_attention
    model.gradient_checkpointing = model.recompute_attention = False  # every block's saved tensors seen
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_sdpa_on_meta():
            loss_module(batch)
    finally:
        model.gradient_checkpointing, model.recompute_attention = recompute, attention
        for h in handles:
            h.remove()

    def total(*sets) -> int:
        return sum(sizes[k] for k in set().union(*sets))

    blocks = list(per_block.values())
    return SavedActivations(total(outside, *blocks), total(outside), tuple(total(b) for b in blocks),
                            total(outside, inputs))


class StepPeak(NamedTuple):
    """The peak of one training step's forward and backward (step_peak): `total` bytes live then, split by
    where they were allocated: `activations` by the forward of the method's inputs and the model (what it
    left for the backward, and the tensors Python still holds), `logits` by the loss (its forward's tensors, its
    gradients, and the fused loss's chunk of logits while that runs), `backward` by the model's backward
    (activation gradients, a recomputed block's tensors); `phase` ("forward", "loss" or "backward") says when
    it falls. Each storage counts once; parameters, buffers, the batch and the parameters' gradients are left
    out (estimate() counts those whole)."""

    total: int
    activations: int
    logits: int
    backward: int
    phase: str


def _loss_chunk_logits(x: torch.Tensor, weight: torch.Tensor, chunk: int) -> int:
    """The fused loss's one chunk of logits (x's dtype, reused by every chunk), which its op allocates inside
    and frees before it returns."""
    return min(chunk, x.shape[0]) * weight.shape[0] * x.element_size()


def _workspaces() -> Dict[object, Callable[[tuple], int]]:
    """Ops whose scratch memory is large enough to count: the bytes each allocates inside, from its args."""
    import importlib

    importlib.import_module("mmkernels.ops.linear_cross_entropy")  # registers the ops
    lce = torch.ops.mmkernels
    # linear_cross_entropy_fwd(x, weight, target, bias, ignore_index, label_smoothing, reduction, chunk_size, ...)
    # linear_cross_entropy_rows_bwd(dloss, x, weight, target, bias, ignore_index, label_smoothing, chunk_size, ...)
    return {lce.linear_cross_entropy_fwd.default: lambda a: _loss_chunk_logits(a[0], a[1], a[7]),
            lce.linear_cross_entropy_rows_bwd.default: lambda a: _loss_chunk_logits(a[1], a[2], a[7])}


class _Timeline(TorchDispatchMode):
    """Every storage an op allocates (its outputs' storages not seen before), with the phase it was allocated in,
    and every free (a weak reference's callback when the storage dies), in order: events (serial, bytes, phase),
    bytes negative for a free. Storages alive when the timeline starts (parameters, buffers, the batch) are not
    events. An op's scratch (_workspaces) is an allocation and a free around its outputs."""

    def __init__(self, known: Iterable[torch.Tensor]) -> None:
        super().__init__()
        self.known = {t.untyped_storage()._cdata for t in known}
        self.live: Dict[int, int] = {}  # storage key -> serial
        self.refs: Dict[int, weakref.ref] = {}
        self.events: List[Tuple[int, int, str]] = []
        self.phase = "forward"
        self.workspaces = _workspaces()

    def _note(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.known or key in self.live:
            return
        serial, size, phase = len(self.events), storage.nbytes(), self.phase
        self.live[key] = serial

        def freed(_ref, key=key, serial=serial, size=size, phase=phase):
            self.events.append((serial, -size, phase))
            self.live.pop(key, None)
            self.refs.pop(serial, None)

        self.refs[serial] = weakref.ref(storage, freed)
        self.events.append((serial, size, phase))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._note(t)
        scratch = self.workspaces.get(func)
        if scratch is not None:
            serial, size = len(self.events), scratch(args)
            self.events += [(serial, size, self.phase), (serial, -size, self.phase)]
        return out

    def serial(self, t: torch.Tensor) -> Optional[int]:
        return self.live.get(t.untyped_storage()._cdata)


def _peak(events: List[Tuple[int, int, str]], left_out: set) -> StepPeak:
    category = {"forward": "activations", "loss": "logits", "backward": "backward"}
    live = {"activations": 0, "logits": 0, "backward": 0}
    best, phase = dict(live), "forward"
    now = "forward"
    for serial, size, at in events:
        if serial in left_out:
            continue
        live[category[at]] += size
        if size > 0:
            now = at
        if sum(live.values()) > sum(best.values()):
            best, phase = dict(live), now
    return StepPeak(sum(best.values()), best["activations"], best["logits"], best["backward"], phase)


def trace_step(step: Callable[[], torch.Tensor], module: nn.Module, known: Iterable[torch.Tensor] = (),
               model: Optional[nn.Module] = None) -> StepPeak:
    """The peak of the memory that step().backward() allocates (StepPeak), for a step that trains `module`'s
    parameters. known: other tensors alive before the step (its inputs), left out with the parameters, the
    buffers and the parameters' gradients. model: the module whose output is the hidden states the loss reads
    (its forward hook starts the "loss" phase, the gradient of its output the "backward" phase); without it
    every byte counts as activations. Gradients the parameters hold are put aside for the trace (which traces a
    step after zero_grad(set_to_none=True), as the trainer runs it) and put back after."""
    params = list(module.parameters())
    held = [p.grad for p in params]
    for p in params:
        p.grad = None
    timeline = _Timeline([*params, *module.buffers(), *known])

    def model_done(_module, _args, hidden):
        timeline.phase = "loss"
        if torch.is_tensor(hidden) and hidden.requires_grad:
            hidden.register_hook(lambda grad: setattr(timeline, "phase", "backward"))

    handle = None if model is None else model.register_forward_hook(model_done)
    try:
        with timeline, _flash_sdpa_on_meta():
            step().backward()
            grads = {timeline.serial(p.grad) for p in params if p.grad is not None}
    finally:
        if handle is not None:
            handle.remove()
        for p, grad in zip(params, held):
            p.grad = grad
    return _peak(timeline.events, grads - {None})


def step_peak(loss_module: nn.Module, batch) -> StepPeak:
    """The peak of one training step's forward and backward, loss_module(batch).backward() (the trainer's
    LossModule; gradient checkpointing as its model has it): trace_step. On the meta device it costs no memory
    and no compute, which is how estimate() uses it; on real tensors it follows the same ops (the tests compare
    the two)."""
    vision = getattr(loss_module, "_vision", [None])[0]
    known = _pytree.tree_leaves(tuple(batch))
    if vision is not None:  # not a submodule of the loss module
        known += [*vision.parameters(), *vision.buffers()]
    return trace_step(lambda: loss_module(batch), loss_module, [t for t in known if torch.is_tensor(t)],
                      loss_module.model)


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
    from mmkernels.train.trainer import LossModule, master_weights, set_checkpointing, tiny_vision_config

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
    set_checkpointing(model, cfg)
    peak = step_peak(loss_module, traced_batch(cfg, spec, vision, "meta"))
    out = {"weights": weights, "gathered": gathered, "gradients": gradients, "optimizer": optimizer,
           "activations": peak.activations, "logits": peak.logits, "backward": peak.backward}
    out["total"] = sum(out.values())
    return out


def format_estimate(est: Dict[str, int], cfg: TrainConfig, processes: Optional[int] = None) -> str:
    processes, mode = layout(cfg, processes)
    where = "" if mode == "none" else f" on each of {processes} processes ({mode})"
    blocks = "" if cfg.checkpoint_blocks is None else f" (the first {cfg.checkpoint_blocks} blocks)"
    attention = ", recompute_attention=True" if cfg.recompute_attention else ""
    lines = [f"expected peak memory of one training step{where} ({cfg.method}, micro-batch {cfg.batch_size} x "
             f"{cfg.max_len} tokens, grad_checkpointing={cfg.grad_checkpointing}{blocks}{attention}, "
             f"fused_loss={cfg.fused_loss}):"]
    for key, value in est.items():
        if key != "gathered" or mode == "fsdp":
            lines.append(f"  {key:<12} {value / 2**20:>12,.1f} MiB")
    return "\n".join(lines)


_UNITS = {"": 2**30, "gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}


def parse_size(text: str, name: str = "size") -> int:
    """'24GiB', '24G', '24 GB', '20000MiB', '20000MB' or a bare number of GiB -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"{name}: expected a positive size such as 24GiB, 24GB or 20000MiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def with_recompute(cfg: TrainConfig, blocks: int, layers: int, attention: bool) -> TrainConfig:
    """cfg recomputing its first `blocks` of `layers` blocks whole (0: none) and, when attention, the other
    blocks' attention cores."""
    return dataclasses.replace(cfg, grad_checkpointing=blocks > 0,
                               checkpoint_blocks=None if blocks in (0, layers) else blocks,
                               recompute_attention=attention)


def fit(cfg: TrainConfig, budget: int, processes: Optional[int] = None
        ) -> Dict[bool, Optional[Tuple[int, TrainConfig, Dict[str, int]]]]:
    """Per recompute_attention (False, True): (N, config, estimate) with the fewest blocks N recomputed whole
    (the first N) whose estimated total fits `budget` bytes, or None when none does. Every N from 0 up is
    traced until one fits (the peak need not fall with every block: on a small model a recomputed block's
    transient tensors can outweigh what it stops saving), so this costs up to 2 x (layers + 1) traces."""
    config = LlamaConfig.tiny() if cfg.model is None else LlamaConfig.from_json(cfg.model)
    layers = config.num_hidden_layers
    out: Dict[bool, Optional[Tuple[int, TrainConfig, Dict[str, int]]]] = {}
    for attention in (False, True):
        out[attention] = None
        for n in range(layers + 1):
            variant = with_recompute(cfg, n, layers, attention)
            est = estimate(variant, processes)
            if est["total"] <= budget:
                out[attention] = (n, variant, est)
                break
    return out


def _recompute_flags(cfg: TrainConfig) -> str:
    flags = []
    if cfg.grad_checkpointing:
        flags.append("--grad-checkpointing")
        if cfg.checkpoint_blocks is not None:
            flags.append(f"--checkpoint-blocks {cfg.checkpoint_blocks}")
    if cfg.recompute_attention:
        flags.append("--recompute-attention")
    return " ".join(flags) or "(no recomputation)"


def format_fit(found: Dict[bool, Optional[Tuple[int, TrainConfig, Dict[str, int]]]], budget: int) -> str:
    lines = [f"to fit {budget / 2**30:,.2f} GiB (the fewest blocks recomputed whole):"]
    for attention, hit in found.items():
        if hit is None:
            lines.append(f"  {'with' if attention else 'without'} --recompute-attention: does not fit with any "
                         f"number of blocks recomputed")
        else:
            _, variant, est = hit
            lines.append(f"  {_recompute_flags(variant):<64} {est['total'] / 2**30:>8,.2f} GiB")
    return "\n".join(lines)
