"""Compacter / Compacter++ (methods/compacter.py): placement, identity start, parameter counts, training on both
backends, adapter save/load, and logits parity with the `adapters` library's Compacter on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels import backend
from mmkernels.ops import phm as phm_ops
from _tolerance import assert_close_to_reference
from mmkernels.methods import compacter as cp
from mmkernels.models import Llama, LlamaConfig
from mmkernels.nn.phm_adapter import ADAPTERS_NAMES, PHMAdapter

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "phm_adapters_lib.safetensors"
TINY = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(seed=0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.normal_(1.0, 0.3) if "norm" in name else p.normal_(0.0, 0.08))
    return model.eval()


def ids(batch=2, seq=9, seed=7):
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_placement_freezing_and_counts():
    model = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacter", reduction=8, n=4, rank=2))
    base_names = {n for n, _ in tiny_model().named_parameters()}
    names = {n for n, _ in model.named_parameters()}
    assert base_names <= names  # the base weights keep their (HF) names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(cp.adapter_parameters(model)) and not (trainable & base_names)
    for block in model.layers:
        assert isinstance(block.self_attn.compacter, PHMAdapter) and isinstance(block.mlp.compacter, PHMAdapter)
        assert block.mlp.compacter.phm_rule is model.compacter_phm_rule  # one rule for all adapters
    d, k, r, n, layers = 64, 8, 2, 4, 2
    per_adapter = 2 * r * d + 2 * r * k + k + d  # s_down, t_up; t_down, s_up; both biases
    assert cp.count_parameters(model) == {"phm_rule": n ** 3, "layers": 2 * layers * per_adapter,
                                          "total": n ** 3 + 2 * layers * per_adapter}

    pp = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", reduction=8, shared_phm_rule=False))
    assert not hasattr(pp.layers[0].self_attn, "compacter") and isinstance(pp.layers[0].mlp.compacter, PHMAdapter)
    per_adapter = 2 * d + 2 * k + k + d + 2 * n ** 3  # rank 1, own rules for the down and up layers
    assert cp.count_parameters(pp) == {"phm_rule": 2 * layers * n ** 3, "layers": layers * (per_adapter - 2 * n ** 3),
                                       "total": layers * per_adapter}


def test_config_and_apply_errors():
    with pytest.raises(ValueError, match="variant"):
        cp.CompacterConfig(variant="houlsby")
    with pytest.raises(ValueError, match="init"):
        cp.CompacterConfig(init="zeros")
    with pytest.raises(ValueError, match="rank"):
        cp.CompacterConfig(rank=0)
    with pytest.raises(ValueError, match="unknown key"):
        cp.CompacterConfig.from_dict({"n": 4, "alpha": 1})
    with pytest.raises(ValueError, match="multiples of n = 4"):
        cp.apply(tiny_model(), cp.CompacterConfig(reduction=32))  # bottleneck 2 < n
    model = cp.apply(tiny_model(), cp.CompacterConfig(reduction=8))
    with pytest.raises(ValueError, match="already applied"):
        cp.apply(model, cp.CompacterConfig(reduction=8))
    with pytest.raises(TypeError, match="model"):
        cp.apply(torch.nn.Linear(2, 2), cp.CompacterConfig())
    with pytest.raises(ValueError, match="not applied"):
        cp.adapter_parameters(tiny_model())


@pytest.mark.parametrize("variant", ["compacter", "compacterpp"])
def test_identity_init_is_exactly_the_base_model(variant):
    x = ids()
    with torch.no_grad():
        base = tiny_model()(x)
        model = cp.apply(tiny_model(), cp.CompacterConfig(variant=variant, reduction=8, init="identity"))
        assert torch.equal(model(x), base)
        # The library's own initialisation (rule std 1e-4) starts close to, not at, the base model.
        lib_init = cp.apply(tiny_model(), cp.CompacterConfig(variant=variant, reduction=8))(x)
    assert not torch.equal(lib_init, base)
    torch.testing.assert_close(lib_init, base, rtol=0, atol=1e-2)


def _train(phm_backend, monkeypatch, steps=4):
    """AdamW steps on a fixed batch; every op runs its reference backend except phm_adapter (`phm_backend`),
    so the two runs differ only by the fused adapter kernels (the other kernels have their own tests)."""
    model = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacter", reduction=8, rank=2, init="identity"))
    model.train()
    x = ids(2, 12, seed=3)
    opt = torch.optim.AdamW(cp.adapter_parameters(model).values(), lr=2e-2, weight_decay=0.0)
    losses = []
    monkeypatch.setattr(backend, "select", lambda op, device: phm_backend if op == phm_ops.OP else "reference")
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in cp.adapter_parameters(model).items()}


def test_training_lowers_the_loss_alike_on_both_backends(monkeypatch):
    with torch.no_grad(), mmkernels.use_backend("reference"):
        x = ids(2, 12, seed=3)
        frozen = torch.nn.functional.cross_entropy(tiny_model()(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()
    ref_losses, ref_params = _train("reference", monkeypatch)
    tri_losses, tri_params = _train("triton", monkeypatch)
    assert ref_losses[0] == pytest.approx(frozen, rel=1e-6)  # identity init: the frozen model at step 0
    assert ref_losses[-1] < ref_losses[0] - 0.05
    # fp32 on both paths: they differ only by summation order, amplified a little by each AdamW step.
    assert tri_losses == pytest.approx(ref_losses, rel=1e-4)
    for name in ref_params:
        torch.testing.assert_close(tri_params[name], ref_params[name], rtol=1e-3, atol=1e-4, msg=name)


def test_save_and_load_adapter(tmp_path):
    model = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacter", reduction=8, rank=2, seed=3))
    with torch.no_grad():
        for p in cp.adapter_parameters(model).values():
            p.normal_(0.0, 0.3)
    cp.save_adapter(model, str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["method"] == "compacter" and saved["rank"] == 2
    restored = cp.load_adapter(tiny_model(), str(tmp_path))
    x = ids()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    assert restored.compacter_config == model.compacter_config
    assert restored.layers[1].mlp.compacter.phm_rule is restored.compacter_phm_rule  # still shared after loading
    other = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", reduction=8))
    with pytest.raises(ValueError, match="differs"):
        cp.load_adapter(other, str(tmp_path))


def test_logits_match_the_adapters_library():
    """The library's Compacter (CompacterConfig(reduction_factor=8), Houlsby placement, shared rule) on a tiny
    LlamaForCausalLM vs this Compacter on the same base and adapter weights (fixture: make_phm_fixture.py)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(FIXTURE), "pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(FIXTURE))
    lcfg, ccfg = json.loads(meta["llama"]), json.loads(meta["compacter"])
    base = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.") or k == "lm_head.weight"}
    lib_rule = tensors["lib.model.shared_parameters.c.phm_rule"]
    ours = {}
    for dtype in (torch.float32, torch.float64):
        model = Llama(LlamaConfig(**lcfg))
        model.load_state_dict({k: v.to(torch.float32) for k, v in base.items()})
        model = model.to(dtype).eval()
        cp.apply(model, cp.CompacterConfig(variant="compacter", n=ccfg["phm_dim"], reduction=ccfg["reduction_factor"],
                                           rank=ccfg["phm_rank"]))
        for i, block in enumerate(model.layers):
            for where, owner in (("attention", block.self_attn), ("output", block.mlp)):
                prefix = f"lib.model.layers.{i}.{where}_adapters.adapters.c."
                state = {name: tensors[prefix + name] for name in ADAPTERS_NAMES.values() if prefix + name in tensors}
                owner.compacter.load_adapters_state(state, phm_rule=lib_rule)
        with torch.no_grad():
            ours[dtype] = model.lm_head(model(tensors["input_ids"], hidden_only=True))  # logits in the model dtype
    lib32, lib64 = tensors["logits32"], tensors["logits64"]
    # float64: the same math up to the rotary frequencies, which this model keeps in float32 (as HF's float32
    # model does) while HF's float64 run casts them to float64: ~1e-7 of the logits, not a layout error (O(1)).
    scale = lib64.abs().max().item()
    torch.testing.assert_close(ours[torch.float64], lib64, rtol=0, atol=1e-6 * scale)
    assert_close_to_reference(ours[torch.float32], lib32, lib64, "logits", k=3.0)
    with torch.no_grad():  # the adapters matter: without them the logits are far off
        plain = Llama(LlamaConfig(**lcfg))
        plain.load_state_dict({k: v.to(torch.float32) for k, v in base.items()})
        assert (plain(tensors["input_ids"]).double() - lib64).abs().max() > 100 * 1e-6 * scale
