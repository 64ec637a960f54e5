"""LLaMA-Adapter V1/V2 (methods/llama_adapter.py): parameter counts, zero-init, PEFT parity, prompt caching,
parameter groups, merge, adapter save/load and a tiny end-to-end training run on both backends."""

import json

import pytest
import torch

import mmkernels
from mmkernels.methods import llama_adapter as la
from mmkernels.models import Llama, LlamaConfig
from mmkernels.models.vision import VisionTower

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
            patch_size=16)


def tiny_model(seed=0, **overrides) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.08))
    return model.eval()


def v2_config(**overrides):
    return la.LlamaAdapterConfig(**{**dict(version=2, prompt_len=6, prompt_layers=2, vision_dim=CLIP["hidden_size"],
                                           visual_width=32, visual_blocks=1, visual_heads=2,
                                           bias_scale_targets=la.BIAS_SCALE_TARGETS), **overrides})


def vision_tower(seed=0):
    torch.manual_seed(seed)
    return VisionTower.from_config(transformers.CLIPVisionConfig(**CLIP)).eval()


def randomize_adapter(model, seed=1):
    """Non-trivial adapter values (nonzero gates, scales != 1), so that every part shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in la.adapter_parameters(model).items():
            if name.endswith(".gate"):
                p.copy_(torch.rand(p.shape, generator=gen) * 0.8 + 0.2)
            elif name.endswith(".scale"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias") or "norm" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32)


def test_parameter_counts_7b(capsys):
    """METHODS.md: V1 on LLaMA-7B (last 30 of 32 layers, L_p=10) trains 1,229,760 parameters. V2 with
    bias/scale on every linear and lm_head plus the norms trains 4,279,744 (litgpt's adapter-v2 count)."""
    counts = {}
    for version, extra in ((1, {}), (2, dict(bias_scale_targets=la.BIAS_SCALE_TARGETS))):
        with torch.device("meta"):
            model = Llama(LlamaConfig(**LLAMA_7B))
        la.apply(model, la.LlamaAdapterConfig(version=version, prompt_len=10, prompt_layers=30, **extra))
        counts[version] = la.count_parameters(model)["total"]
        assert counts[version] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"LLaMA-Adapter V{version} on LLaMA-7B: {counts[version]:,} trainable parameters")
    assert counts == {1: 30 * 10 * 4096 + 30 * 32, 2: 4_279_744}
    assert "1,229,760" in capsys.readouterr().out


def test_zero_init_is_exactly_the_frozen_model():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        frozen = model(ids)
        la.apply(model, v2_config())
        tower = vision_tower()
        adapted = model(ids, visual_prompts=la.encode_images(model, tower, pixels))
    assert torch.equal(adapted, frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in la.adapter_parameters(model))


def test_config_validation():
    with pytest.raises(ValueError, match="version: expected one of"):
        la.LlamaAdapterConfig(version=3)
    with pytest.raises(ValueError, match=r"bias_scale_targets: unknown \['qkv'\]"):
        la.LlamaAdapterConfig(version=2, bias_scale_targets=("qkv",))
    with pytest.raises(ValueError, match="vision_dim: visual fusion is a V2 feature"):
        la.LlamaAdapterConfig(version=1, vision_dim=32)
    with pytest.raises(ValueError, match="prompt_layers: the model has 3 layers, got prompt_layers=4"):
        la.apply(tiny_model(), la.LlamaAdapterConfig(prompt_layers=4))
    model = la.apply(tiny_model(), la.LlamaAdapterConfig())
    with pytest.raises(ValueError, match="already applied"):
        la.apply(model, la.LlamaAdapterConfig())
    with pytest.raises(ValueError, match=r"visual_prompts: expected shape \(1, 6, 64\)"):
        m2 = la.apply(tiny_model(), v2_config())
        with torch.no_grad():
            m2(torch.zeros(1, 3, dtype=torch.long), visual_prompts=torch.zeros(1, 5, 64))


def _peft_pair(tmp_path, gqa=True):
    from peft import AdaptionPromptConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**TINY, "num_key_value_heads": 2 if gqa else 4})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, AdaptionPromptConfig(adapter_len=7, adapter_layers=2, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # PEFT zero-inits the gate: give it a value so the prompt path counts
        for name, p in peft_model.named_parameters():
            if "adaption_gate" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif "adaption_prompt" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return peft_model.eval()


@pytest.mark.parametrize("gqa", [True, False])
def test_peft_adaption_prompt_parity(tmp_path, gqa):
    peft_model = _peft_pair(tmp_path, gqa)
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        base = peft_model.get_base_model()
    ours = la.from_peft(Llama.from_pretrained(str(tmp_path / "base")), peft_model).eval()
    assert ours.adapter_config.gate_fn == "raw" and not ours.adapter_config.gate_per_head
    peft_model.save_pretrained(tmp_path / "adapter")
    from_dir = la.from_peft(Llama.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        actual, actual_dir = ours(ids), from_dir(ids)
        with peft_model.disable_adapter():
            plain = base(input_ids=ids).logits
    scale = expected.abs().max().item()
    # The prompt path changes the logits by far more than the tolerance, so a dropped prompt cannot pass.
    assert (expected - plain).abs().max().item() > 1e-2 * scale
    assert (actual - expected).abs().max().item() <= 2e-6 * scale
    assert torch.equal(actual, actual_dir)


def test_peft_parity_on_the_triton_path(tmp_path):
    peft_model = _peft_pair(tmp_path)
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(5))
    ours = la.from_peft(Llama.from_pretrained(str(tmp_path / "base")), peft_model).eval()
    with torch.no_grad(), mmkernels.use_backend("triton"):
        actual = ours(ids)
    expected = peft_model(input_ids=ids).logits.detach()
    assert (actual - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_from_peft_rejects_other_adapters(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="expected a PEFT AdaptionPrompt adapter, got peft_type 'LORA'"):
        la.from_peft(tiny_model(), str(tmp_path))


@pytest.mark.parametrize("fusion", ["early", "all"])
def test_cached_decoding_matches_full_recompute(fusion):
    """Prefill + decode steps (prompt K/V from the KV cache, split-KV decode kernel) give the logits of a
    full forward over the whole sequence, with per-sample visual prompts fused into the prompts."""
    model = la.apply(tiny_model(), v2_config(fusion=fusion))
    randomize_adapter(model)
    tower = vision_tower()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        visual = la.encode_images(model, tower, torch.randn(2, 3, 32, 32))
        full = model(ids, visual_prompts=visual)
        cache = model.new_kv_cache(2, 16)
        steps = [model(ids[:, :8], kv_cache=cache, visual_prompts=visual)]
        steps += [model(ids[:, i:i + 1], kv_cache=cache) for i in range(8, 12)]
    assert set(cache.prompts) == set(la.fusion_layers(model))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_text_prompt_kv_computed_once_and_refreshed_on_update(monkeypatch):
    model = la.apply(tiny_model(), la.LlamaAdapterConfig(prompt_len=4))
    randomize_adapter(model)
    prompt = model.layers[-1].self_attn.prompt
    calls = []
    original = la.AdaptionPrompt._project
    monkeypatch.setattr(la.AdaptionPrompt, "_project", lambda self, *a: calls.append(self) or original(self, *a))
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        first = model(ids)
        model(ids)
        model.generate([[1, 2, 3]], max_new_tokens=4)
    assert calls.count(prompt) == 1  # once per model, whatever the number of forwards and decode steps
    with torch.no_grad():
        prompt.prompt.add_(0.5)  # an optimizer-style in-place update
        changed = model(ids)
    assert calls.count(prompt) == 2
    assert not torch.allclose(first, changed)


def test_parameter_groups_and_set_task():
    model = la.apply(tiny_model(), v2_config(fusion_layers=1))
    groups = la.parameter_groups(model)
    image_text, instruction = set(groups["image_text"]), set(groups["instruction"])
    assert not image_text & instruction
    assert image_text | instruction == {n for n, p in model.named_parameters() if p.requires_grad}
    early = la.fusion_layers(model)[0]
    assert early == 1 and la.adapter_layers(model) == (1, 2)
    assert f"layers.{early}.self_attn.prompt.gate" in image_text and "visual_projection.queries" in image_text
    assert {"layers.2.self_attn.prompt.prompt", "norm.weight", "lm_head.scale", "layers.0.mlp.down_proj.bias"} \
        <= instruction
    randomize_adapter(model)
    tower = vision_tower()
    ids = torch.randint(0, 97, (2, 6))
    for task in la.TASKS:
        la.set_task(model, task)
        model.zero_grad(set_to_none=True)
        model(ids, visual_prompts=la.encode_images(model, tower, torch.randn(2, 3, 32, 32))).square().mean().backward()
        touched = {n for n, p in model.named_parameters() if p.grad is not None}
        assert touched == set(groups[task]), task


@pytest.mark.parametrize("form", ["output", "input"])
def test_merge_keeps_the_function(form):
    model = la.apply(tiny_model(), v2_config(bias_scale_form=form, vision_dim=None))
    randomize_adapter(model)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids)
        la.merge(model)
        after = model(ids)
    assert not any(isinstance(m, mmkernels.nn.ScaleBiasLinear) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="was merged"):
        la.save_adapter(model, "/tmp/unused")


def test_save_and_load_adapter(tmp_path):
    model = la.apply(tiny_model(), v2_config())
    randomize_adapter(model)
    la.save_adapter(model, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    restored = la.load_adapter(tiny_model(), str(tmp_path))  # the same base weights (seed 0)
    assert restored.adapter_config == model.adapter_config
    ids = torch.randint(0, 97, (2, 7))
    visual = torch.randn(2, 6, 64)
    with torch.no_grad():
        assert torch.equal(restored(ids, visual_prompts=visual), model(ids, visual_prompts=visual))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == la.count_parameters(model)["total"]
    tensors["layers.2.self_attn.prompt.gate"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"layers.2.self_attn.prompt.gate has shape \(3,\), expected \(4,\)"):
        la.load_adapter(tiny_model(), str(tmp_path))
    del tensors["layers.2.self_attn.prompt.gate"]
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['layers.2.self_attn.prompt.gate'\]"):
        la.load_adapter(tiny_model(), str(tmp_path))


def _train(backend, steps=4):
    """A few AdamW steps of V2 (visual + text) on a fixed batch; returns the losses and the frozen loss."""
    model = la.apply(tiny_model(), v2_config(bias_scale_targets=None))
    model.train()
    tower = vision_tower()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (2, 12), generator=gen)
    pixels = torch.randn(2, 3, 32, 32, generator=gen)
    params = list(la.adapter_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    losses = []
    with mmkernels.use_backend(backend):
        with torch.no_grad():
            frozen = tiny_model()(ids[:, :-1]).flatten(0, 1)
            frozen_loss = torch.nn.functional.cross_entropy(frozen, ids[:, 1:].flatten()).item()
        for _ in range(steps):
            logits = model(ids[:, :-1], visual_prompts=la.encode_images(model, tower, pixels))
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, frozen_loss


def test_training_v2_lowers_the_loss_alike_on_both_backends():
    ref_losses, ref_frozen = _train("reference")
    tri_losses, tri_frozen = _train("triton")
    assert ref_losses[0] == pytest.approx(ref_frozen, rel=1e-6)  # zero-init gate: the frozen model at step 0
    assert tri_losses[0] == pytest.approx(tri_frozen, rel=1e-6)
    assert ref_losses[-1] < ref_losses[0] - 0.05
    # fp32 on both paths: they differ only by summation order, amplified a little by each AdamW step.
    assert tri_losses == pytest.approx(ref_losses, rel=1e-4)
