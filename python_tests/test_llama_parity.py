"""The thin LLaMA reproduces transformers' LlamaForCausalLM on the same weights."""

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
    "odd": dict(hidden_size=96, intermediate_size=200, num_attention_heads=6, num_key_value_heads=3),
}


def make_hf(tmp_path, overrides, seed=0, shard=None):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**BASE, **overrides})
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
    # fp32 on both sides; the only differences are summation orders (~1e-7 relative per op).
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= 2e-6 * scale

    prompt = ids[0, :7].tolist()
    hf_new = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                         pad_token_id=0)[0, 7:].tolist()
    assert ours.generate([prompt], max_new_tokens=8, eos_id=2)[0] == hf_new


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


def test_loader_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf(tmp_path, CONFIGS["mha"])
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    good = dict(state)

    del state["model.norm.weight"]
    save_file(state, path)
    with pytest.raises(KeyError, match="missing tensor 'norm.weight'"):
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
