"""HyperLLaVA (methods/hyperllava.py): zero-init, per-sample experts, guidance position, cached decoding vs
full recompute, training on both backends, adapter save/load, configuration errors and parameter counts."""

import contextlib

import pytest
import torch

from mmkernels import backend
from mmkernels.methods import hyperllava as hl
from mmkernels.models import Llama, LlamaConfig

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
VISION_DIM = 24


@contextlib.contextmanager
def expert_backend(name):
    """Run the dynamic_expert op on `name` and every other op on its automatic backend. The other ops'
    kernels are tested in their own files; in the Triton interpreter they (rope, attention) would dominate
    the runtime here."""
    original = backend.select
    backend.select = lambda op, device: name if op == "dynamic_expert" else original(op, device)
    try:
        yield
    finally:
        backend.select = original


def tiny_model(seed=0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.08))
    return model.eval()


def config(**overrides):
    return hl.HyperLLaVAConfig(**{**dict(language_layers=2, guidance_layer=0, bottleneck=8, embed_dim=16, rank=4,
                                         vision_dim=VISION_DIM), **overrides})


def randomize_experts(model, seed=1, scale=0.5):
    """Non-zero dynamic parts and up weights: the experts then change the output and depend on guidance."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hl.adapter_parameters(model).items():
            if name.endswith(("w2", "b2", "up.static")):
                p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[-1] ** 0.5)


def inputs(seed=2, batch=2, text=6, visual=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 97, (batch, text), generator=gen), torch.randn(batch, visual, VISION_DIM, generator=gen)


def base_logits(model, ids, features):
    """The base model fed by the plain LLaVA projector (L1, GELU, L2 without expert) of `model`."""
    plain = hl.HyperProjector(VISION_DIM, TINY["hidden_size"], expert=False)
    plain.load_state_dict({k: v for k, v in model.visual_projector.state_dict().items() if not k.startswith("expert.")})
    base = tiny_model()
    return base(inputs_embeds=torch.cat([plain(features), base.embed_tokens(ids)], 1))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_zero_init_is_exactly_the_base_model(backend_name):
    ids, features = inputs()
    with torch.no_grad(), expert_backend(backend_name):
        text_before = tiny_model()(ids)
        model = hl.apply(tiny_model(), config())
        assert torch.equal(model(ids), text_before)
        embeds = hl.embed_multimodal(model, ids, features)
        assert embeds.shape == (2, 3 + 6, TINY["hidden_size"])
        assert torch.equal(model(inputs_embeds=embeds), base_logits(model, ids, features))


def test_only_the_adapter_trains_and_counts():
    model = hl.apply(tiny_model(), config())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(hl.adapter_parameters(model))
    assert all(".mlp.expert." in n or n.startswith("visual_projector.") for n in trainable)
    assert {int(n.split(".")[1]) for n in trainable if n.startswith("layers.")} == {1, 2} == set(hl.expert_layers(model))
    counts = hl.count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["projector"] == VISION_DIM * 64 + 64 + 64 * 64 + 64
    assert counts["visual_expert"] > 0 and counts["language_experts"] > 0


def test_parameter_count_7b(capsys):
    """LLaMA-7B, 16 expert layers (h=16, swiglu), CLIP ViT-L (1024) projector: counted on the meta device."""
    with torch.device("meta"):
        model = Llama(LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                  num_attention_heads=32))
    hl.apply(model, hl.HyperLLaVAConfig(vision_dim=1024))
    counts = hl.count_parameters(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096  # LLaVA-1.5's mlp2x_gelu
    # per hypernetwork: E (guidance -> 64), W1 and B1 (small side x rank 8), W2 and B2 (large side), static
    down = 4096 * 64 + 64 + 32 * 8 * 65 + 8 * 4096 + 4096 + 4096 * 32
    up = 4096 * 64 + 64 + 16 * 8 * 65 + 8 * 4096 + 4096 + 16 * 4096
    assert counts["language_experts"] == 16 * (down + up)
    assert hl.guidance_layer(model) == 15 and hl.expert_layers(model) == tuple(range(16, 32))
    print(f"HyperLLaVA on LLaMA-7B: {counts}")


def test_config_and_apply_errors():
    with pytest.raises(ValueError, match="guidance_layer: expected a block before the first expert block 1"):
        hl.apply(tiny_model(), config(guidance_layer=1))
    with pytest.raises(ValueError, match="language_layers: the model has 3 layers, got language_layers=4"):
        hl.apply(tiny_model(), config(language_layers=4))
    with pytest.raises(ValueError, match="guidance_layer: expected a block before the first expert block 0"):
        hl.apply(tiny_model(), config(language_layers=3))
    with pytest.raises(ValueError, match="activation: expected one of"):
        config(activation="tanh")
    with pytest.raises(ValueError, match="bottleneck: expected a positive integer"):
        config(bottleneck=0)
    with pytest.raises(TypeError, match="cfg: expected a HyperLLaVAConfig"):
        hl.apply(tiny_model(), {"language_layers": 2})
    model = hl.apply(tiny_model(), config(vision_dim=None))
    with pytest.raises(ValueError, match="already applied"):
        hl.apply(model, config())
    with pytest.raises(ValueError, match="has no projector"):
        hl.embed_multimodal(model, *inputs())
    with pytest.raises(NotImplementedError, match="differ per sample"):
        hl.merge(model)
    with pytest.raises(ValueError, match="not applied"):
        hl.count_parameters(tiny_model())
    assert hl.guidance_layer(hl.apply(tiny_model(), config(guidance_layer=None, language_layers=1))) == 0


def _expert_weights(model, ids, features):
    cache = model.new_kv_cache(ids.shape[0], features.shape[1] + ids.shape[1])
    with torch.no_grad():
        model(inputs_embeds=hl.embed_multimodal(model, ids, features), kv_cache=cache)
    return cache.prompts[hl.CACHE_KEY]


def test_experts_are_per_sample():
    """Different guidance gives different expert weights and outputs; a sample's result does not depend on
    the other samples of its batch."""
    model = hl.apply(tiny_model(), config())
    randomize_experts(model)
    ids, features = inputs(batch=2)
    weights = _expert_weights(model, ids, features)
    assert set(weights) == {1, 2}
    w_down, w_up = weights[2]
    expert = model.layers[2].mlp.expert
    x = torch.randn(1, 4, 64).expand(2, -1, -1)
    with torch.no_grad():
        y = expert(x, weights=(w_down, w_up))
    assert not torch.allclose(y[0], y[1], atol=1e-4)
    with torch.no_grad():
        both = model(inputs_embeds=hl.embed_multimodal(model, ids, features))
        alone = model(inputs_embeds=hl.embed_multimodal(model, ids[1:], features[1:]))
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_guidance_position():
    """guidance_at(p): the experts of a longer sequence use the hidden state at p, so the first p + 1
    positions equal a forward of that prefix alone (no position sees a later token through the experts)."""
    model = hl.apply(tiny_model(), config(vision_dim=None))
    randomize_experts(model)
    ids, _ = inputs(text=9)
    with torch.no_grad():
        prefix = model(ids[:, :5])
        with hl.guidance_at(model, 4):
            pinned = model(ids)
        with hl.guidance_at(model, torch.tensor([4, 4])):
            per_sample = model(ids)
        last = model(ids)
    torch.testing.assert_close(pinned[:, :5], prefix, rtol=1e-5, atol=1e-5)
    assert torch.equal(per_sample, pinned)
    assert not torch.allclose(last[:, :5], prefix, atol=1e-4)  # the default (last token) differs: not vacuous
    with pytest.raises(ValueError, match=r"guidance position: expected an index in \[-9, 9\), got 9"):
        with torch.no_grad(), hl.guidance_at(model, 9):
            model(ids)
    with pytest.raises(ValueError, match=r"guidance position: expected shape \(2,\)"):
        with torch.no_grad(), hl.guidance_at(model, torch.tensor([1, 2, 3])):
            model(ids)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_cached_greedy_decode_matches_full_recompute(backend_name):
    """Prefill (visual tokens + text, expert weights generated once and kept in the KV cache) then greedy
    decode steps equal recomputing the whole sequence without a cache, with the guidance pinned to the
    prompt's last position: the same token ids and close logits."""
    model = hl.apply(tiny_model(), config())
    randomize_experts(model)
    ids, features = inputs(batch=2, text=5)
    steps = 5
    with torch.no_grad(), expert_backend(backend_name):
        prompt = hl.embed_multimodal(model, ids, features)
        length = prompt.shape[1]
        cache = model.new_kv_cache(2, length + steps)
        logits = [model(inputs_embeds=prompt, kv_cache=cache)[:, -1]]
        tokens = [logits[-1].argmax(-1)]
        for _ in range(steps - 1):
            logits.append(model(tokens[-1][:, None], kv_cache=cache)[:, -1])
            tokens.append(logits[-1].argmax(-1))
        assert set(cache.prompts[hl.CACHE_KEY]) == set(hl.expert_layers(model))
        full_logits, full_tokens = [], []
        for k in range(steps):
            generated = torch.stack(tokens[:k], 1) if k else ids[:, :0]
            embeds = torch.cat([prompt, model.embed_tokens(generated)], 1)
            with hl.guidance_at(model, length - 1):
                full_logits.append(model(inputs_embeds=embeds)[:, -1])
            full_tokens.append(full_logits[-1].argmax(-1))
        unpinned = model(inputs_embeds=torch.cat([prompt, model.embed_tokens(torch.stack(tokens[:-1], 1))], 1))
    assert torch.equal(torch.stack(tokens, 1), torch.stack(full_tokens, 1))
    torch.testing.assert_close(torch.stack(logits, 1), torch.stack(full_logits, 1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unpinned[:, -1], full_logits[-1], atol=1e-4)  # the cached weights matter


def test_decode_step_without_prefill_is_an_error():
    model = hl.apply(tiny_model(), config(vision_dim=None))
    cache = model.new_kv_cache(1, 8)
    cache.advance(3)
    with torch.no_grad(), pytest.raises(ValueError, match="holds no HyperLLaVA expert weights"):
        model(torch.tensor([[5]]), kv_cache=cache)


def test_generate_runs_with_experts():
    """models.generation.generate (text prompts, left padding) goes through the cached path."""
    model = hl.apply(tiny_model(), config(vision_dim=None))
    randomize_experts(model)
    out = model.generate([[1, 2, 3], [4, 5]], max_new_tokens=3)
    assert [len(o) for o in out] == [3, 3]


def _train(backend_name, steps=4):
    """A few AdamW steps on a fixed multimodal batch; returns the losses and the base model's loss."""
    model = hl.apply(tiny_model(), config())
    model.train()
    ids, features = inputs(seed=7, batch=2, text=8)
    params = list(hl.adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    n_visual = features.shape[1]

    def loss_of(logits):  # next-token loss on the text positions
        return torch.nn.functional.cross_entropy(logits[:, n_visual:-1].flatten(0, 1), ids[:, 1:].flatten())

    losses = []
    with expert_backend(backend_name):
        with torch.no_grad():
            base_loss = loss_of(base_logits(model, ids, features)).item()
        for _ in range(steps):
            loss = loss_of(model(inputs_embeds=hl.embed_multimodal(model, ids, features)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, base_loss


def test_training_lowers_the_loss_alike_on_both_backends():
    ref_losses, ref_base = _train("reference")
    tri_losses, tri_base = _train("triton")
    assert ref_losses[0] == pytest.approx(ref_base, rel=1e-6)  # zero-init: the base model at step 0
    assert tri_losses[0] == pytest.approx(tri_base, rel=1e-6)
    assert ref_losses[-1] < ref_losses[0] - 0.05
    # fp32 on both paths: they differ only by summation order, amplified a little by each AdamW step.
    assert tri_losses == pytest.approx(ref_losses, rel=1e-4)


def test_save_and_load_adapter(tmp_path):
    model = hl.apply(tiny_model(), config())
    randomize_experts(model)
    hl.save_adapter(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    restored = hl.load_adapter(tiny_model(), str(tmp_path))
    assert restored.hyperllava_config == model.hyperllava_config
    ids, features = inputs()
    with torch.no_grad():
        want = model(inputs_embeds=hl.embed_multimodal(model, ids, features))
        got = restored(inputs_embeds=hl.embed_multimodal(restored, ids, features))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="differs from the saved"):
        hl.load_adapter(hl.apply(tiny_model(), config(bottleneck=4)), str(tmp_path))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == hl.count_parameters(model)["total"]
    del tensors["layers.2.mlp.expert.up.static"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['layers.2.mlp.expert.up.static'\]"):
        hl.load_adapter(tiny_model(), str(tmp_path))


def test_projector_under_bf16_autocast_with_float32_masters():
    """The trainer's GPU setup on the projector: float32 parameters (AdamW masters) under bf16 autocast. The
    expert runs in the autocast dtype beside L1(f); the result is the float64 projector's within what the
    projector computed wholly in bf16 achieves."""
    import copy

    from _tolerance import assert_close_to_reference

    gen = torch.Generator().manual_seed(5)
    proj = hl.HyperProjector(VISION_DIM, TINY["hidden_size"], generator=gen)
    with torch.no_grad():  # a nonzero expert
        for p in proj.expert.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    feats = torch.randn(2, 5, VISION_DIM, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = proj(feats.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    want = copy.deepcopy(proj).double()(feats.double())
    low = copy.deepcopy(proj).to(torch.bfloat16)(feats.to(torch.bfloat16))
    assert_close_to_reference(got, low, want, "projector under autocast")
