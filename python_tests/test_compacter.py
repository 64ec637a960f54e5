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
        assert block.mlp.compacter.rules[0] is model.compacter_phm_rule  # one rule for all adapters
        # held by the model alone (FSDP2 shards each block on its own; a cast cannot split it into copies)
        assert all(p is not model.compacter_phm_rule for p in block.parameters())
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
    assert restored.layers[1].mlp.compacter.rules[0] is restored.compacter_phm_rule  # still shared after loading
    other = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", reduction=8))
    with pytest.raises(ValueError, match="differs"):
        cp.load_adapter(other, str(tmp_path))


def _library_fixture():
    """(tensors, tiny LLaMA config, adapters metadata) of the fixture written by make_phm_fixture.py."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(FIXTURE), "pt") as fh:
        meta = fh.metadata()
    return load_file(str(FIXTURE)), json.loads(meta["llama"]), meta


def _base_model(tensors, lcfg, dtype=torch.float32) -> Llama:
    """The fixture's base LlamaForCausalLM (HF names, stored in float16) as an mmkernels Llama in `dtype`."""
    base = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.") or k == "lm_head.weight"}
    model = Llama(LlamaConfig(**lcfg))
    model.load_state_dict({k: v.to(torch.float32) for k, v in base.items()})
    return model.to(dtype).eval()


def _load_library_adapters(model, tensors, lib, name, places):
    """Copy the library's adapter `name` (fixture keys `lib`<library name>) into the model's Compacter;
    places: (the library's location, our adapted sublayer attribute) per adapter of a block."""
    rule = tensors[f"{lib}model.shared_parameters.{name}.phm_rule"]
    for i, block in enumerate(model.layers):
        for where, attr in places:
            prefix = f"{lib}model.layers.{i}.{where}_adapters.adapters.{name}."
            state = {n: tensors[prefix + n] for n in ADAPTERS_NAMES.values() if prefix + n in tensors}
            getattr(block, attr).compacter.load_adapters_state(state, phm_rule=rule)


def _logits(model, input_ids):
    with torch.no_grad():
        return model.lm_head(model(input_ids, hidden_only=True))  # logits in the model dtype


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_logits_match_the_adapters_library(backend):
    """The library's Compacter (CompacterConfig(reduction_factor=8), Houlsby placement, shared rule) on a tiny
    LlamaForCausalLM vs this Compacter on the same base and adapter weights (fixture: make_phm_fixture.py)."""
    tensors, lcfg, meta = _library_fixture()
    ccfg = json.loads(meta["compacter"])
    ours = {}
    for dtype in (torch.float32, torch.float64):
        model = _base_model(tensors, lcfg, dtype)
        cp.apply(model, cp.CompacterConfig(variant="compacter", n=ccfg["phm_dim"], reduction=ccfg["reduction_factor"],
                                           rank=ccfg["phm_rank"]))
        _load_library_adapters(model, tensors, "lib.", "c", [("attention", "self_attn"), ("output", "mlp")])
        with mmkernels.use_backend(backend):
            ours[dtype] = _logits(model, tensors["input_ids"])
    lib32, lib64 = tensors["logits32"], tensors["logits64"]
    # float64: the same math up to the rotary frequencies, which this model keeps in float32 (as HF's float32
    # model does) while HF's float64 run casts them to float64: ~1e-7 of the logits, not a layout error (O(1)).
    scale = lib64.abs().max().item()
    torch.testing.assert_close(ours[torch.float64], lib64, rtol=0, atol=1e-6 * scale)
    assert_close_to_reference(ours[torch.float32], lib32, lib64, "logits", k=3.0)
    with torch.no_grad():  # the adapters matter: without them the logits are far off
        plain = _base_model(tensors, lcfg)
        assert (plain(tensors["input_ids"]).double() - lib64).abs().max() > 100 * 1e-6 * scale


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_compacterpp_logits_match_the_adapters_library(backend):
    """The library's Compacter++ (CompacterPlusPlusConfig(reduction_factor=8): output adapter only, reading the
    stream after the MLP's add) on the fixture's tiny LlamaForCausalLM vs variant="compacterpp" with its default
    input ("stream") on the same weights; the sublayer placement is far off."""
    tensors, lcfg, meta = _library_fixture()
    pcfg = json.loads(meta["compacterpp"])
    assert pcfg["original_ln_before"] and pcfg["residual_before_ln"] is True and not pcfg["mh_adapter"]

    def run(dtype, **cfg):
        model = _base_model(tensors, lcfg, dtype)
        cp.apply(model, cp.CompacterConfig(variant="compacterpp", n=pcfg["phm_dim"], reduction=pcfg["reduction_factor"],
                                           rank=pcfg["phm_rank"], **cfg))
        _load_library_adapters(model, tensors, "pp.lib.", "cpp", [("output", "mlp")])
        with mmkernels.use_backend(backend):
            return _logits(model, tensors["input_ids"])

    assert cp.CompacterConfig(variant="compacterpp").input == "stream"
    ours32, ours64 = run(torch.float32), run(torch.float64)
    lib32, lib64 = tensors["pp.logits32"], tensors["pp.logits64"]
    scale = lib64.abs().max().item()
    # float64: the same math up to the rotary frequencies (float32 here) and the order of the stream additions.
    torch.testing.assert_close(ours64, lib64, rtol=0, atol=1e-6 * scale)
    assert_close_to_reference(ours32, lib32, lib64, "logits", k=3.0)
    # The placement matters: the adapter on the MLP output alone, or no adapter, is far from the library.
    sublayer = run(torch.float64, input="sublayer")
    assert (sublayer - lib64).abs().max() > 100 * 1e-6 * scale
    assert (_logits(_base_model(tensors, lcfg, torch.float64), tensors["input_ids"]) - lib64).abs().max() > 100 * 1e-6 * scale


def test_input_option_defaults_and_errors():
    assert cp.CompacterConfig().input == "sublayer"
    assert cp.CompacterConfig(variant="compacterpp").input == "stream"
    assert cp.CompacterConfig(variant="compacterpp", input="sublayer").input == "sublayer"
    # The trainer's method options: a dict without "input" gets the variant's default.
    assert cp.CompacterConfig.from_dict({"variant": "compacterpp"}).input == "stream"
    assert cp.CompacterConfig.from_dict({"variant": "compacterpp"}).to_dict()["input"] == "stream"
    with pytest.raises(ValueError, match="input: expected one of"):
        cp.CompacterConfig(variant="compacterpp", input="residual")
    with pytest.raises(ValueError, match="variant='compacter' with input='stream'"):
        cp.CompacterConfig(variant="compacter", input="stream")


def test_stream_input_is_the_adapter_on_the_stream_after_the_mlp_add():
    """stream' = Ad(o + r) after each block: the same model computed by hand from the base blocks."""
    cfg = cp.CompacterConfig(variant="compacterpp", reduction=8, seed=5)
    model = cp.apply(tiny_model(), cfg)
    with torch.no_grad():
        for p in cp.adapter_parameters(model).values():
            p.normal_(0.0, 0.3)
    assert model.layers[0]._forward_hooks and not model.layers[0].mlp._forward_hooks  # hooked on the block
    x = ids()
    with torch.no_grad():
        got = model(x)
        plain = tiny_model()
        for block, theirs in zip(plain.layers, model.layers):
            block.mlp.compacter = theirs.mlp.compacter  # the same adapter, not hooked
        cos, sin = mmkernels.ops.rope_cos_sin(torch.arange(x.shape[1]), plain._inv_freq)
        stream = plain.embed_tokens(x)
        for block in plain.layers:
            o, r = block(stream, None, cos, sin, None, None)
            stream = block.mlp.compacter(o + r)
        want = plain.lm_head(plain.norm(stream)).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():  # not the sublayer placement
        sub = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", input="sublayer", reduction=8, seed=5))
        for n, p in cp.adapter_parameters(sub).items():
            p.copy_(cp.adapter_parameters(model)[n])
        assert (sub(x) - got).abs().max() > 1e-2


def test_stream_input_trains_with_gradient_checkpointing():
    """The block hook also runs when a checkpointed block is recomputed: same gradients as without."""
    grads = []
    for checkpointing in (False, True):
        model = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", reduction=8, seed=2))
        model.train()
        model.gradient_checkpointing = checkpointing
        x = ids(2, 10, seed=4)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in cp.adapter_parameters(model).items()})
    assert all(g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_adapter_saved_without_input_loads_as_sublayer(tmp_path):
    """An adapter_config.json from before the `input` option (no "input" key): both variants then read the
    sublayer output, so a "compacterpp" one loads with input="sublayer", not its new default."""
    model = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", input="sublayer", reduction=8, seed=1))
    with torch.no_grad():
        for p in cp.adapter_parameters(model).values():
            p.normal_(0.0, 0.3)
    cp.save_adapter(model, str(tmp_path))
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    assert saved["input"] == "sublayer"
    del saved["input"]  # the file as the earlier version wrote it
    config_file.write_text(json.dumps(saved))
    restored = cp.load_adapter(tiny_model(), str(tmp_path))
    assert restored.compacter_config.input == "sublayer"
    x = ids()
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))
    # A current file keeps its input; a "stream" adapter round-trips too.
    stream = cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", reduction=8, seed=1))
    cp.save_adapter(stream, str(tmp_path / "new"))
    again = cp.load_adapter(tiny_model(), str(tmp_path / "new"))
    assert again.compacter_config.input == "stream" and again.compacter_config == stream.compacter_config
    with torch.no_grad():
        assert torch.equal(again(x), stream(x))
    with pytest.raises(ValueError, match="differs"):
        cp.load_adapter(cp.apply(tiny_model(), cp.CompacterConfig(variant="compacterpp", reduction=8, seed=1)),
                        str(tmp_path))
