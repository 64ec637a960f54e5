"""`--estimate`'s activations: the training forward traced on the meta device saves, tensor for tensor, what
the same forward saves on real tensors, for every method (memory.saved_activations), and the peak of the
whole step (forward and backward, memory.step_peak) on the meta device is the peak on real tensors."""

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


def _loss_module(cfg, device, dtype, config=None):
    """The trainer's LossModule for cfg, built on `device` as Run.build builds it (weights random on CPU)."""
    spec = method_specs.get(cfg.method)
    torch.manual_seed(0)
    with torch.device(device):
        model = Llama(config or LlamaConfig.tiny()).to(dtype)
        vision = None
        if cfg.vision is not None:
            from mmkernels.models.vision import VisionTower

            vision = VisionTower.from_config(trainer.tiny_vision_config()).to(dtype).eval()
        spec.apply(model, cfg.method_options, vision)
    trainer.master_weights(model)
    trainer.set_checkpointing(model, cfg)
    return trainer.LossModule(model, spec, vision, cfg.fused_loss, cfg.loss_chunk), spec, vision


def _batch(cfg, spec, vision, device):
    batch = memory.traced_batch(cfg, spec, vision, device)
    if device != "meta":  # token ids and pixels of a real batch (values do not change what is saved)
        batch = batch._replace(input_ids=torch.randint(3, 200, batch.input_ids.shape, device=device))
        batch = batch._replace(labels=batch.input_ids.clone())
        if batch.images is not None:
            batch = batch._replace(images=torch.rand_like(batch.images))
    return batch


def _saved(cfg, device, dtype=torch.float32):
    loss_module, spec, vision = _loss_module(cfg, device, dtype)
    return memory.saved_activations(loss_module, _batch(cfg, spec, vision, device))


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


def _peak(cfg, device, dtype=torch.float32, config=None):
    loss_module, spec, vision = _loss_module(cfg, device, dtype, config)
    return memory.step_peak(loss_module, _batch(cfg, spec, vision, device))


@pytest.mark.parametrize("recompute", ["saved", "checkpointed", "attention"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_meta_step_peaks_where_the_real_step_peaks(case, recompute):
    """One training step's forward and backward allocate and free on the meta device what they do on real
    tensors: the same peak, split the same way. With checkpointed blocks the forward keeps less and the backward
    (which recomputes a block) holds more. Recomputing the attention's core keeps less; with LLaMA-Adapter's
    frozen o_proj at least its output and log-sum-exps per layer less, and with V2's output-form scales the
    scaled and rotated q, k and v too."""
    method, options, extra = CASES[case]
    cfg = _cfg(method, options, extra, grad_checkpointing=recompute == "checkpointed",
               recompute_attention=recompute == "attention")
    real, traced = _peak(cfg, "cpu"), _peak(cfg, "meta")
    assert traced == real
    assert real.total == real.activations + real.logits + real.backward
    saved = _saved(cfg, "meta")
    full = _peak(_cfg(method, options, extra), "meta")
    if recompute == "checkpointed":
        assert real.activations <= saved.kept and real.phase == "backward"
        assert real.activations < full.activations and real.backward > full.backward
    elif recompute == "attention":
        assert real.activations < full.activations
        if method != "llama_adapter":  # LoRA's, PaCA's, ... o_proj keeps the attention output as its input
            return
        config = LlamaConfig.tiny()
        tokens, heads, kv_heads = cfg.batch_size * cfg.max_len, config.num_attention_heads, config.num_key_value_heads
        out, lse = tokens * config.hidden_size * 4, tokens * heads * 4
        freed = out + lse
        if options.get("version", 2) == 2 and method == "llama_adapter" and "bias_scale_form" not in options:
            freed = out + 2 * lse + tokens * (heads + 2 * kv_heads) * config.head_dim * 4  # q, k, v, both segments
        assert full.activations - real.activations >= config.num_hidden_layers * freed
    else:  # the peak is in the backward, when the last blocks have freed some of what they saved
        assert saved.total / 2 < real.activations <= saved.total + _forward_outputs(cfg)


@pytest.mark.parametrize("case", ["lavin_images", "qpaca_nf4"])
def test_checkpointing_the_first_blocks(case, monkeypatch):
    """checkpoint_blocks=N recomputes the first N blocks only: with none the step is the one that saves
    everything; with one (of the tiny model's two) block 0 alone is checkpointed, and the step's peak differs
    from both ends (on the tiny model it need not lie between them: where the peak falls moves), on meta as on
    real tensors."""
    from mmkernels.models import llama

    method, options, extra = CASES[case]
    steps = {n: _cfg(method, options, extra, grad_checkpointing=True, checkpoint_blocks=n) for n in (0, 1, None)}
    saved = _peak(_cfg(method, options, extra), "meta")
    checkpointed = []
    checkpoint = llama.checkpoint

    def counted(block, *args, **kw):
        checkpointed.append(block.layer)
        return checkpoint(block, *args, **kw)

    monkeypatch.setattr(llama, "checkpoint", counted)
    none, one, every = (_peak(cfg, "meta") for cfg in steps.values())
    assert checkpointed == [0, 0, 1]
    assert none == saved and one not in (saved, every)
    assert _peak(steps[1], "cpu") == one
    with pytest.raises(ValueError, match="checkpoint_blocks: expected at most the model's 2 blocks, got 3"):
        memory.estimate(dataclasses.replace(steps[1], checkpoint_blocks=3))


@pytest.mark.parametrize("case", ["llama_adapter_v2_images", "lavin_images"])
def test_a_block_recomputed_whole_does_not_recompute_its_attention_again(case, monkeypatch):
    """recompute_attention checkpoints the attention's core in the blocks that gradient checkpointing does not
    recompute whole: the core runs twice there (forward, backward) and not at all in the others, whose whole
    recomputation already keeps nothing inside (a second checkpoint would run the attention a third time)."""
    from mmkernels.models import llama

    calls = []
    core = llama.Attention._core

    def counted(self, *args):
        calls.append(torch.is_grad_enabled())
        return core(self, *args)

    monkeypatch.setattr(llama.Attention, "_core", counted)
    method, options, extra = CASES[case]
    layers = LlamaConfig.tiny().num_hidden_layers
    for blocks, expected in ((None, 0), (1, 2 * (layers - 1)), (0, 2 * layers)):
        calls.clear()
        cfg = _cfg(method, options, extra, grad_checkpointing=True, checkpoint_blocks=blocks, recompute_attention=True)
        _peak(cfg, "meta")
        assert len(calls) == expected, (blocks, calls)


def test_trace_step_puts_the_gradients_back():
    """A traced step starts without gradients, as the trainer's after zero_grad(set_to_none=True); gradients
    the parameters held before are theirs again after, and the step's own are not left behind."""
    layer = torch.nn.Linear(8, 4)
    before = torch.ones(4, 8)
    layer.weight.grad = before
    x = torch.randn(3, 8)
    peak = memory.trace_step(lambda: layer(x).square().sum(), layer, [x])
    assert layer.weight.grad is before and layer.bias.grad is None
    other = torch.nn.Linear(8, 4)
    assert peak == memory.trace_step(lambda: other(x).square().sum(), other, [x])  # no accumulation into `before`



def test_fit_finds_the_fewest_blocks_to_recompute(capsys):
    """--estimate --fit SIZE: per recompute_attention, the fewest blocks recomputed whole whose estimate fits
    (every smaller count does not; on the tiny model the peak does not fall with every block, so the search
    cannot bisect), or none."""
    from mmkernels.cli import main

    cfg = _cfg("llama_adapter", {}, MULTIMODAL)
    layers = LlamaConfig.tiny().num_hidden_layers
    totals = {(n, a): memory.estimate(memory.with_recompute(cfg, n, layers, a))["total"]
              for n in range(layers + 1) for a in (False, True)}
    budget = min(totals.values()) + 1
    found = memory.fit(cfg, budget)
    for attention, hit in found.items():
        fits = [n for n in range(layers + 1) if totals[n, attention] <= budget]
        if not fits:
            assert hit is None
            continue
        n, variant, est = hit
        assert n == fits[0] and est["total"] == totals[n, attention] and variant.recompute_attention == attention
        assert (variant.grad_checkpointing, variant.checkpoint_blocks) == (n > 0, None if n in (0, layers) else n)
    assert any(hit is not None for hit in found.values())
    assert memory.fit(cfg, 1) == {False: None, True: None}
    assert main(["train", "--estimate", "--vision", "tiny", "--fit", "1MiB"]) == 0
    assert "does not fit with any number of blocks recomputed" in capsys.readouterr().out


def test_sizes_and_fit_errors():
    assert memory.parse_size("24GiB") == memory.parse_size("24") == memory.parse_size("24 g") == 24 * 2**30
    assert memory.parse_size("1.5GB") == 1_500_000_000 and memory.parse_size("20000MiB") == 20000 * 2**20
    for bad in ("", "0", "-3GiB", "24TB", "GiB", "2e3"):
        expected = f"--fit: expected a positive size such as 24GiB, 24GB or 20000MiB, got {bad!r}"
        with pytest.raises(ValueError, match=expected):
            memory.parse_size(bad, "--fit")
    from mmkernels.cli import main

    with pytest.raises(ValueError, match="--fit: only with --estimate, got --fit 24GiB without it"):
        main(["train", "--fit", "24GiB"])


def _forward_outputs(cfg):
    """Bytes of the tensors the forward returns or the loss module still holds (hidden states in float32)."""
    config = LlamaConfig.tiny()
    return 2 * cfg.batch_size * cfg.max_len * config.hidden_size * 4


def test_the_timeline_counts_each_storage_from_its_op_to_its_death():
    """memory._Timeline by hand: a view shares its base's storage; a storage dies with its last view; the
    tensors alive before the timeline are not counted."""
    x = torch.zeros(1000)
    timeline = memory._Timeline([x])
    with timeline:
        a = x * 2  # 4000
        b = a[:500]  # a view: nothing new
        c = a + 1  # 4000: peak 8000
        del a
        d = c * 3  # a still alive through b: 12000
        del b
        e = d - 1  # a freed: 12000 again
        del c, d, e
        f = x.sum()  # 4
    assert memory._peak(timeline.events, set()) == memory.StepPeak(12000, 12000, 0, 0, "forward")
    assert memory._peak(timeline.events, {2}) == memory.StepPeak(8000, 8000, 0, 0, "forward")  # leave out d
    assert sum(size for _, size, _ in timeline.events) == f.nbytes


def test_the_loss_peak_holds_its_logits():
    """With a vocabulary large against the model the step peaks in the loss: the unfused loss holds three
    float32 (tokens x vocab) tensors (the log-softmax it saved, its gradient and the logits' gradient); the fused
    one a chunk of logits (x's dtype), which its op allocates inside (memory._workspaces)."""
    config = dataclasses.replace(LlamaConfig.tiny(), vocab_size=4096, num_hidden_layers=1)
    cfg = _cfg("llama_adapter", {}, {})
    tokens, vocab = cfg.batch_size * (cfg.max_len - 1), config.vocab_size
    unfused = _peak(dataclasses.replace(cfg, fused_loss=False), "meta", config=config)
    whole = _peak(cfg, "meta", config=config)
    chunked = _peak(dataclasses.replace(cfg, loss_chunk=8), "meta", config=config)
    assert unfused.phase == whole.phase == chunked.phase == "loss"
    assert 3 * tokens * vocab * 4 <= unfused.logits < 3 * tokens * vocab * 4 + 4 * tokens * config.hidden_size
    assert whole.logits - chunked.logits == (tokens - 8) * vocab * 4
    assert chunked.logits < whole.logits < unfused.logits / 2
    assert _peak(dataclasses.replace(cfg, loss_chunk=8), "cpu", config=config) == chunked


def test_estimate_takes_the_trace():
    cfg = _cfg("llama_adapter", {}, MULTIMODAL)
    for recompute in (False, True):
        cfg = dataclasses.replace(cfg, grad_checkpointing=recompute)
        peak, est = _peak(cfg, "meta"), memory.estimate(cfg)
        assert (est["activations"], est["logits"], est["backward"]) == peak[1:4]
        assert est["total"] == sum(v for k, v in est.items() if k != "total")


@pytest.mark.gpu
@pytest.mark.parametrize("recompute", ["saved", "checkpointed", "attention"])
def test_the_traced_peak_is_the_gpu_peak(recompute):
    """On a GPU (the Triton kernels, bf16) one V2 step allocates at its peak what the meta trace says plus the
    parameters' gradients, within 3% and 1 MiB (the kernels' scratch, the allocator's 512-byte blocks):
    torch.cuda.max_memory_allocated over a step after a warm-up step (cuBLAS's workspace, compiled kernels)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    config = dataclasses.replace(LlamaConfig.tiny(), vocab_size=8192, hidden_size=512, intermediate_size=1376,
                                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
    cfg = _cfg("llama_adapter", {"version": 2}, {}, max_len=512, grad_checkpointing=recompute == "checkpointed",
               recompute_attention=recompute == "attention")
    loss_module, spec, vision = _loss_module(cfg, "cuda", torch.bfloat16, config)
    batch = _batch(cfg, spec, vision, "cuda")
    trainable = [p for p in loss_module.parameters() if p.requires_grad]
    for _ in range(2):
        for p in trainable:
            p.grad = None
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_module(batch).backward()
        torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - before
    predicted = _peak(cfg, "meta", torch.bfloat16, config).total + sum(p.grad.nbytes for p in trainable)
    assert abs(measured - predicted) <= 0.03 * predicted + 2**20, (measured, predicted)
