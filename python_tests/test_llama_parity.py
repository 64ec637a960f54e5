"""The thin LLaMA reproduces transformers' LlamaForCausalLM on the same weights."""

import copy

import pytest
import torch

import mmkernels
from mmkernels.models import Llama

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8}
CONFIGS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "llama3": dict(rope_scaling=LLAMA3, num_key_value_heads=1),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}, rope_theta=500000.0),
    "odd": dict(hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=3),
}


def make_hf(tmp_path, overrides, seed=0, shard=None):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**copy.deepcopy({**BASE, **overrides}))  # it edits rope dicts in place
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so a norm bug cannot hide
                p.normal_(1.0, 0.3)
    kwargs = {} if shard is None else {"max_shard_size": shard}
    hf.save_pretrained(tmp_path, **kwargs)
    return hf


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_generation_match(tmp_path, name):
    hf = make_hf(tmp_path, CONFIGS[name])
    ours = Llama.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(3, 97, (2, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        actual = ours(ids)
    # fp32 on both sides, the same math; only summation orders differ (~1 ulp per op). Measured: <= 3.2e-7
    # of the largest logit over these configs; 2e-6 leaves ~6x headroom, while real bugs on these weights
    # measured ~1e-2 (GQA head mapping 1.9e-2, interleaved rope pairs 9e-3, rms eps 1e-5 for 1e-6 9e-3).
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 2e-6 * scale

    # Greedy: our left-padded batch against HF on each prompt alone (no padding on its side).
    prompts = [ids[0, :7].tolist(), ids[1, :4].tolist()]
    hf_new = [hf.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                          pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert ours.generate(prompts, max_new_tokens=8, eos_id=2) == hf_new


def test_rope_scaling_configs_change_the_frequencies():
    """The scaled-rope parity cases are only meaningful if the scaling moves the frequencies."""
    from mmkernels import ops

    plain = ops.rope_inv_freq(16, 10000.0)
    for name in ("llama3", "linear"):
        scaling = CONFIGS[name]["rope_scaling"]
        theta = CONFIGS[name].get("rope_theta", 10000.0)
        scaled = ops.rope_inv_freq(16, theta, scaling)
        unscaled = ops.rope_inv_freq(16, theta)
        changed = ~torch.isclose(scaled, unscaled)
        assert changed.sum() >= 4, name
    # llama3 blends: the fastest rotations are divided by less than the factor, the slow ones by all of it.
    llama3 = ops.rope_inv_freq(16, 10000.0, LLAMA3)
    assert llama3[0] > plain[0] / 8 and torch.isclose(llama3[-1], plain[-1] / 8)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf(tmp_path, CONFIGS["gqa"], shard="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = Llama.from_pretrained(str(tmp_path))
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=2e-5, atol=2e-6)


def test_save_pretrained_round_trip_through_transformers(tmp_path):
    make_hf(tmp_path / "a", CONFIGS["tied"])
    ours = Llama.from_pretrained(str(tmp_path / "a"))
    ours.save_pretrained(str(tmp_path / "b"))
    back = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "b")).eval()
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), rtol=2e-5, atol=2e-6)


def test_triton_backend_parity(tmp_path):
    """The whole model on the Triton kernels (interpreter on CPU) matches transformers."""
    hf = make_hf(tmp_path, dict(num_hidden_layers=1, num_key_value_heads=2))
    ours = Llama.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(3, 97, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), mmkernels.use_backend("triton"):
        actual = ours(ids)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (actual - expected).abs().max().item() <= 2e-6 * expected.abs().max().item()
    # Left padding (kv_start) and KV-cache views through the Triton attention kernel.
    prompts = [ids[0, :5].tolist(), ids[0, 5:7].tolist()]
    with mmkernels.use_backend("triton"):
        on_triton = ours.generate(prompts, max_new_tokens=3)
    assert on_triton == ours.generate(prompts, max_new_tokens=3)


def test_loader_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf(tmp_path, CONFIGS["mha"])
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    good = dict(state)

    del state["model.norm.weight"]
    save_file(state, path)
    with pytest.raises(KeyError, match=r"missing tensor 'model.norm.weight' of shape \(64,\)"):
        Llama.from_pretrained(str(tmp_path))

    save_file({**good, "model.extra.weight": torch.zeros(2)}, path)
    with pytest.raises(KeyError, match="unexpected tensor 'model.extra.weight'"):
        Llama.from_pretrained(str(tmp_path))

    save_file({**good, "model.norm.weight": torch.zeros(63)}, path)
    with pytest.raises(ValueError, match=r"'model.norm.weight' .* has shape \(63,\), expected \(64,\)"):
        Llama.from_pretrained(str(tmp_path))

    path.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        Llama.from_pretrained(str(tmp_path))


def test_config_errors(tmp_path):
    from mmkernels.models import LlamaConfig

    with pytest.raises(ValueError, match="num_key_value_heads: expected a divisor of num_attention_heads"):
        LlamaConfig(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="rope_scaling: rope_type 'yarn' is not supported"):
        LlamaConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="attention_bias: biases in the projections are not supported"):
        LlamaConfig.from_dict({**BASE, "attention_bias": True})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LlamaConfig.from_json(str(tmp_path))
    with pytest.raises(ValueError, match=r"config: missing required key\(s\) \['hidden_size'\]"):
        LlamaConfig.from_dict({k: v for k, v in BASE.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="hidden_size: expected a multiple of num_attention_heads"):
        LlamaConfig.from_dict({**BASE, "hidden_size": 66})
    with pytest.raises(ValueError, match="mlp_bias: biases in the projections are not supported"):
        LlamaConfig.from_dict({**BASE, "mlp_bias": True})


def test_loader_tolerates_a_saved_tied_head_and_casts(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = make_hf(tmp_path, CONFIGS["tied"])
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    assert "lm_head.weight" not in state
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}, path)
    ours = Llama.from_pretrained(str(tmp_path), dtype=torch.float16, device="cpu")
    assert ours.lm_head.weight is ours.embed_tokens.weight
    assert {p.dtype for p in ours.parameters()} == {torch.float16}
    assert {p.device.type for p in ours.parameters()} == {"cpu"}
    ids = torch.arange(3, 12)[None]
    with torch.no_grad():
        actual, expected = ours(ids), hf(ids).logits
    assert actual.dtype == torch.float32  # logits are float32 whatever the weights
    assert (actual - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()  # fp16 weights


def test_save_over_a_sharded_checkpoint_and_missing_shard(tmp_path):
    import json

    make_hf(tmp_path, CONFIGS["gqa"], shard="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    ours = Llama.from_pretrained(str(tmp_path))
    (tmp_path / shards[-1]).rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match=f"shard .*{shards[-1]} listed in"):
        Llama.from_pretrained(str(tmp_path))
    with torch.no_grad():
        ours.norm.weight.mul_(2)
    ours.save_pretrained(str(tmp_path))  # the stale index and its shards must not shadow the new file
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert not any((tmp_path / s).exists() for s in shards)
    back = Llama.from_pretrained(str(tmp_path))
    torch.testing.assert_close(back.norm.weight, ours.norm.weight, rtol=0, atol=0)


def test_config_reads_transformers_4_and_5_layouts():
    from mmkernels.models import LlamaConfig

    v4 = LlamaConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    v5 = LlamaConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 500000.0, **LLAMA3}})
    assert v4 == v5 and v4.rope_theta == 500000.0 and v4.rope_scaling["rope_type"] == "llama3"
    plain = LlamaConfig.from_dict({**BASE, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.head_dim == 16 and plain.num_key_value_heads == 4
    assert LlamaConfig.from_dict({**BASE, "eos_token_id": [2, 5]}).eos_ids == [2, 5]
    tiny = LlamaConfig.tiny()
    assert (tiny.vocab_size, tiny.num_key_value_heads, tiny.tie_word_embeddings) == (259, 2, False)
    # A config we write is read back the same, by us and by transformers.
    assert LlamaConfig.from_dict(v5.to_hf_dict()) == v5
    hf = transformers.LlamaConfig.from_dict(v5.to_hf_dict())
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["rope_theta"] == 500000.0
