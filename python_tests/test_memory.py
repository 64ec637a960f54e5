"""`--estimate`'s activations: the training forward traced on the meta device saves, tensor for tensor, what
the same forward saves on real tensors, for every method (memory.saved_activations)."""

import dataclasses

import pytest
import torch

from mmkernels.models import Llama, LlamaConfig
from mmkernels.train import memory, method_specs, trainer
from mmkernels.train.config import TrainConfig

MULTIMODAL = dict(vision="tiny")
CASES = {
    "llama_adapter_v1": ("llama_adapter", {"version": 1}, {}),
    "llama_adapter_v2_images": ("llama_adapter", {}, MULTIMODAL),
    "llama_adapter_v2_input_scales": ("llama_adapter", {"version": 2, "bias_scale_form": "input"}, {}),
    "lora": ("lora", {"rank": 4}, {}),
    "paca": ("paca", {"rank": 4}, {}),
    "qpaca_nf4": ("paca", {"rank": 4, "quantize": "nf4", "block": 16}, {}),
    "compacter": ("compacter", {}, {}),
    "hyperllava_images": ("hyperllava", {"language_layers": 1}, MULTIMODAL),
    "lavin_images": ("lavin", {}, MULTIMODAL),
    "lavin_text_packed": ("lavin", {}, dict(pack=True)),
}


def _cfg(method, options, extra, **kw):
    # data: a path is never read here; without one the config is the demo's, which adds the tiny vision tower
    return TrainConfig(**{"data": "unread.jsonl", "vision": None, "method": method, "method_options": options, "batch_size": 2,
                          "max_len": 24, **extra, **kw})


def _loss_module(cfg, device, dtype):
    """The trainer's LossModule for cfg, built on `device` as Run.build builds it (weights random on CPU)."""
    spec = method_specs.get(cfg.method)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(LlamaConfig.tiny()).to(dtype)
        vision = None
        if cfg.vision is not None:
            from mmkernels.models.vision import VisionTower

            vision = VisionTower.from_config(trainer.tiny_vision_config()).to(dtype).eval()
        spec.apply(model, cfg.method_options, vision)
    trainer.master_weights(model)
    model.gradient_checkpointing = cfg.grad_checkpointing
    return trainer.LossModule(model, spec, vision, cfg.fused_loss, cfg.loss_chunk), spec, vision


def _saved(cfg, device, dtype=torch.float32):
    loss_module, spec, vision = _loss_module(cfg, device, dtype)
    batch = memory.traced_batch(cfg, spec, vision, device)
    if device != "meta":  # token ids and pixels of a real batch (values do not change what is saved)
        batch = batch._replace(input_ids=torch.randint(3, 200, batch.input_ids.shape))
        batch = batch._replace(labels=batch.input_ids.clone())
        if batch.images is not None:
            batch = batch._replace(images=torch.rand_like(batch.images))
    return memory.saved_activations(loss_module, batch)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_meta_trace_saves_what_the_real_forward_saves(case):
    method, options, extra = CASES[case]
    cfg = _cfg(method, options, extra)
    real, traced = _saved(cfg, "cpu"), _saved(cfg, "meta")
    assert traced == real
    assert real.total > real.outside > 0 and len(real.per_block) == LlamaConfig.tiny().num_hidden_layers
    assert real.outside + sum(real.per_block) >= real.total  # a storage saved in two places counts once


# no router, hypernetwork or visual path: the methods whose float32 adapter paths autocast leaves alone
PLAIN_CASES = [c for c in sorted(CASES) if "images" not in c and not c.startswith(("lavin", "hyperllava"))]


@pytest.mark.parametrize("case", PLAIN_CASES)
def test_plain_methods_save_the_traced_bytes_under_autocast(case):
    """The trainer runs a 16-bit base under autocast; the meta trace cannot autocast. For V1, V2 without
    images, LoRA, PaCA, QPaCA and Compacter autocast changes nothing that is saved (CPU autocast here); the
    routers, hypernetworks and visual projections of the others do change (see memory.py)."""
    method, options, extra = CASES[case]
    cfg = _cfg(method, options, extra)
    loss_module, spec, vision = _loss_module(cfg, "cpu", torch.bfloat16)
    batch = memory.traced_batch(cfg, spec, vision, "cpu")
    batch = batch._replace(input_ids=torch.randint(3, 200, batch.input_ids.shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        real = memory.saved_activations(loss_module, batch)
    assert _saved(cfg, "meta", torch.bfloat16) == real


def test_bf16_and_the_unfused_loss():
    cfg = _cfg("llama_adapter", {}, MULTIMODAL, fused_loss=False)
    assert _saved(cfg, "meta", torch.bfloat16) == _saved(cfg, "cpu", torch.bfloat16)
    fused = _saved(dataclasses.replace(cfg, fused_loss=True), "meta", torch.bfloat16)
    vocab, tokens = LlamaConfig.tiny().vocab_size, cfg.batch_size * (cfg.max_len - 1)
    # the unfused loss saves its float32 log-softmax (tokens x vocab); the fused one saves no logits (but the
    # hidden states and a log-sum-exp per token), so the difference exceeds a bf16 (tokens x vocab) tensor
    assert _saved(cfg, "meta", torch.bfloat16).outside - fused.outside > tokens * vocab * 2


def test_checkpointed_blocks_keep_only_their_inputs():
    """With gradient checkpointing a real forward saves, through autograd, the tensors outside the blocks and
    each block's inputs (the recompute's), nothing from inside the blocks: `kept`."""
    cfg = _cfg("llama_adapter", {}, {}, grad_checkpointing=True)
    loss_module, spec, vision = _loss_module(cfg, "cpu", torch.float32)
    batch = memory.traced_batch(cfg, spec, vision, "cpu")
    full = memory.saved_activations(loss_module, batch)
    assert loss_module.model.gradient_checkpointing
    params = {t.untyped_storage().data_ptr() for t in [*loss_module.parameters(), *loss_module.buffers()]}
    seen, alive = {}, []

    def pack(t):
        alive.append(t)
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_module(batch)
    assert sum(seen.values()) == full.kept
    hidden, tokens = LlamaConfig.tiny().hidden_size, cfg.batch_size * cfg.max_len
    # the residual stream and the previous block's output per block (block 0: the embeddings alone)
    assert full.kept - full.outside >= (2 * len(full.per_block) - 1) * hidden * tokens * 4
    assert full.kept < full.total / 2


def test_estimate_takes_the_trace():
    cfg = _cfg("llama_adapter", {}, MULTIMODAL)
    saved = _saved(cfg, "meta")
    assert memory.estimate(cfg)["activations"] == saved.total
    est = memory.estimate(dataclasses.replace(cfg, grad_checkpointing=True))
    assert (est["activations"], est["recompute"]) == (saved.kept, max(saved.per_block))
