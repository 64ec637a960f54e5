"""LaVIN (methods/lavin.py): the routing pass against the literal modality-token formulation (logits and
gradients), cached decoding, merge, parameter counts, adapter save/load, errors, and a tiny multimodal
training run (fused kernel vs reference)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import mmkernels
import mmkernels.nn.mom_adapter as mom_nn
from mmkernels.methods import lavin
from mmkernels.models import Llama, LlamaConfig
from mmkernels.nn.mom_adapter import MoMAdapter
from _tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread

TINY = dict(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
# 4 layers, stride 2: 2 visual tokens; 28 / 14 = 2 x 2 patches + [CLS]
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=28,
            patch_size=14)


def base_parts(seed=0, vision=True):
    """(tiny Llama with random weights, tiny random CLIP or None); the same seed gives the same values."""
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            (p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.1))
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP)) if vision else None
    return model, clip


def build(seed=0, vision=True, randomize=True, **cfg):
    model, clip = base_parts(seed, vision)
    lavin.apply(model, lavin.LaVINConfig(**{"visual_layer_stride": 2, **cfg}), vision=clip)
    if randomize:  # a trained-looking adapter: every part shows in the output
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in lavin.adapter_parameters(model).items():
                if "adapter" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def images(batch, seed=0):
    return torch.randn(batch, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------
# The literal formulation: the modality token prepended at position 0, masked from every other token
# ----------------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _adapter(ad: MoMAdapter, x):
    """LaVIN's adapter on x (B, S, d), routed by x[:, 0]; grouped up-projections written per group."""
    w = torch.softmax((x[:, 0] @ ad.router.weight.t() + ad.router.bias) / ad.tau, -1)
    u = x @ ad.weight_a.t() + ad.bias_a
    hg, dg = ad.hidden // ad.groups, ad.d // ad.groups
    ups = []
    for weight, bias in ((ad.weight_b, ad.bias_b), (ad.weight_d, ad.bias_d)):
        parts = [u[..., g * hg:(g + 1) * hg] @ weight[g * dg:(g + 1) * dg].t() for g in range(ad.groups)]
        ups.append(torch.cat(parts, -1) + bias)
    return x + ad.scale * (w[:, None, :1] * ups[0] + w[:, None, 1:] * ups[1])


def _rope(x, cos, sin):
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def literal_forward(model: Llama, embeds, modality):
    """Logits of the tokens after the modality token, from [m, embeds] with an explicit attention mask."""
    c = model.config
    eps, heads, kv_heads, hd = c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    h = torch.cat([model.modality_embedding.weight[modality][:, None], embeds], 1)
    bsz, seq, _ = h.shape
    angles = torch.arange(seq).float()[:, None] * model._inv_freq[None]
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    allowed[1:, 0] = False  # no token attends to the modality token
    for block in model.layers:
        attn, adapter = block.self_attn.attn, block.self_attn.adapter
        x = _adapter(adapter, _rms(h, block.input_layernorm.weight, eps))
        q = _rope((x @ attn.q_proj.weight.t()).view(bsz, seq, heads, hd), cos, sin)
        k = _rope((x @ attn.k_proj.weight.t()).view(bsz, seq, kv_heads, hd), cos, sin)
        v = (x @ attn.v_proj.weight.t()).view(bsz, seq, kv_heads, hd)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=2) for t in (k, v))
        scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(hd)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        out = torch.einsum("bhst,bthd->bshd", probs, v).reshape(bsz, seq, heads * hd)
        h = h + out @ attn.o_proj.weight.t()
        x = _rms(h, block.post_attention_layernorm.weight, eps)
        mlp = block.mlp
        h = h + (torch.nn.functional.silu(x @ mlp.gate_proj.weight.t()) * (x @ mlp.up_proj.weight.t())) @ \
            mlp.down_proj.weight.t()
    return (_rms(h, model.norm.weight, eps) @ model.lm_head.weight.t())[:, 1:]


def test_routing_pass_equals_literal_modality_token():
    model = build()
    ids = torch.randint(0, TINY["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(2))
    px = images(3)
    modality = torch.tensor([1, 0, 1])  # image, text-only, image: per-sample routing in one batch
    grads_out = torch.randn(3, 2 + 6, TINY["vocab_size"], generator=torch.Generator().manual_seed(3))
    params = lavin.adapter_parameters(model)
    trained = [p for p in params.values()]
    results = []
    for literal in (True, False):
        for p in trained:
            p.grad = None
        with mmkernels.use_backend("reference"):
            embeds = torch.cat([lavin.encode_images(model, px), model.embed_tokens(ids)], 1)
            if literal:
                logits = literal_forward(model, embeds, modality)
            else:
                logits = lavin.forward(model, inputs_embeds=embeds, modality=modality)
            (logits * grads_out).sum().backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in params.items()}))
    (want, want_g), (got, got_g) = results
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert set(got_g) == set(want_g)
    for name in want_g:
        scale = want_g[name].abs().max().item() + 1e-3
        torch.testing.assert_close(got_g[name] / scale, want_g[name] / scale, rtol=1e-4, atol=1e-4, msg=name)
    assert want_g["modality_embedding.weight"].abs().sum() > 0
    assert want_g["layers.1.self_attn.adapter.router.weight"].abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("rows", ["plain", "packed", "hidden_prefix"])
def test_one_pass_equals_the_routing_pass(backend, rows):
    """The trainer's one-pass forward (each row's modality token appended in a segment of its own, routed by
    the last position) gives the routing pass's logits and gradients: on plain rows, on packed rows (segment
    ids, positions restarting per sample) and on rows whose visual prefix is hidden (kv_start + positions,
    the text-only samples of a mixed batch)."""
    model = build()
    ids = torch.randint(0, TINY["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(2))
    modality = torch.tensor([1, 0, 1])
    extra = {}
    if rows == "packed":
        extra["segment_ids"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 3)
    elif rows == "hidden_prefix":
        extra["kv_start"] = torch.tensor([0, 2, 0], dtype=torch.int32)
        extra["positions"] = (torch.arange(8)[None] - extra["kv_start"][:, None].long()).clamp_min(0)
    grads_out = torch.randn(3, 2 + 6, TINY["vocab_size"], generator=torch.Generator().manual_seed(3))
    results = []
    # the routing pass and the one pass in float32, and the routing pass in float64 (the oracle)
    for one_pass, dtype in ((False, torch.float32), (True, torch.float32), (False, torch.float64)):
        model = model.to(dtype)
        params = lavin.adapter_parameters(model)
        for p in params.values():
            p.grad = None
        with mmkernels.use_backend(backend if dtype == torch.float32 else "reference"):
            embeds = torch.cat([lavin.encode_images(model, images(3).to(dtype)), model.embed_tokens(ids)], 1)
            if one_pass:
                kw = lavin.append_modality_token(model, embeds, modality, positions=extra.get("positions"),
                                                 segment_ids=extra.get("segment_ids"))
                assert kw["inputs_embeds"].shape[1] == 9 and kw["segment_ids"][:, -1].tolist() == [
                    1 + int(rows == "packed")] * 3
                with lavin.routed_by_token(model):
                    logits = model(**{**extra, **kw})[:, :-1]
            else:
                with lavin.routed(model, modality):
                    logits = model(inputs_embeds=embeds, **extra)
            (logits * grads_out.to(dtype)).sum().backward()
        results.append((logits.detach().double(), {n: p.grad.double() for n, p in params.items()}))
    (want, want_g), (got, got_g), (exact, exact_g) = results
    # Both float32 passes sum in their own orders. A router's gradient is a small difference of large terms, so
    # its float32 rounding, which depends on the CPU's kernels, reaches ~1e-4 of its size (7e-5 seen on an
    # AVX-512 CPU, 1e-5 on AVX2). The one pass must be as close to float64 as the routing pass (3x its error,
    # the rule of _tolerance.py) plus 1e-4 of the gradient's largest element; a wrongly routed row is off by O(1).
    assert_close_to_reference(got.float(), want.float(), exact, "logits")
    for name in want_g:
        floor = 1e-4 * (exact_g[name].abs().max().item() + 1e-3)
        err = (got_g[name] - exact_g[name]).abs().max().item()
        ref_err = (want_g[name] - exact_g[name]).abs().max().item()
        assert err <= 3 * ref_err + floor, f"{name}: one pass off by {err:.3e}, routing pass by {ref_err:.3e}"
    assert want_g["modality_embedding.weight"].abs().sum() > 0


def test_cached_greedy_decode_equals_recomputation():
    model = build(seed=4)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(5))
    for px in (images(2, seed=6), None):
        with mmkernels.use_backend("reference"):
            got = torch.tensor(lavin.generate(model, ids.tolist(), pixel_values=px, max_new_tokens=5))
            vt = None if px is None else lavin.encode_images(model, px)
            seq, want = ids, []
            with torch.no_grad():
                for _ in range(5):
                    tok = lavin.forward(model, seq, visual_tokens=vt)[:, -1].argmax(-1)
                    want.append(tok)
                    seq = torch.cat([seq, tok[:, None]], 1)
        assert torch.equal(got, torch.stack(want, 1)), (px is None, got, want)


def test_decode_steps_reuse_prefill_weights():
    model = build(seed=7)
    ids = torch.randint(0, TINY["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(8))
    cache = model.new_kv_cache(2, 16)
    with torch.no_grad(), mmkernels.use_backend("reference"):
        lavin.forward(model, ids, pixel_values=images(2), kv_cache=cache)
        stored = cache.prompts[lavin.ROUTER_CACHE_KEY]
        assert sorted(stored) == [0, 1] and stored[0].shape == (2, 2)
        want = lavin.route(model, torch.tensor([1, 1]))
        for layer in stored:
            torch.testing.assert_close(stored[layer], want[layer])
        model(ids[:, :1], kv_cache=cache)  # a decode step: plain model call, weights from the cache
        with pytest.raises(ValueError, match="routing weights"):
            model(ids)  # no lavin.forward, no cache: refuses instead of guessing a modality


@pytest.mark.parametrize("modality", [lavin.TEXT, lavin.IMAGE])
def test_merge_is_exact(modality):
    model = build(seed=9)
    ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(10))
    with torch.no_grad(), mmkernels.use_backend("reference"):
        vt = lavin.encode_images(model, images(2)) if modality == lavin.IMAGE else None
        want = lavin.forward(model, ids, visual_tokens=vt, modality=modality)
        merged = lavin.merge(copy.deepcopy(model), modality)
        embeds = model.embed_tokens(ids) if vt is None else torch.cat([vt, model.embed_tokens(ids)], 1)
        got = merged(inputs_embeds=embeds)
    assert not any(isinstance(b.self_attn, lavin.MoMAttention) for b in merged.layers)
    assert merged.layers[0].self_attn.q_proj.bias is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="merged"):
        lavin.save_adapter(merged, "unused")


# Metadata-only ops (no kernel): views, transposes, detaches.
_NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "expand", "unsqueeze", "squeeze", "slice", "select",
              "permute", "detach", "alias", "as_strided", "reshape", "split", "split_with_sizes", "unbind"}


def _dispatched(run):
    """The ops run() dispatches, counted by name, a GEMM with a bias (addmm) counted as one without (mm)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    counts = Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in _NO_KERNEL:
                counts["mm" if name == "addmm" else name] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Count():
        run()
    return counts


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merged_model_runs_the_base_models_ops(backend):
    """METHODS.md's re-parameterisation: with LaVIN merged, a forward dispatches exactly the base model's ops
    (the q/k/v biases ride in the same GEMMs), no adapter op per layer; unmerged, it dispatches more."""
    model, base = build(seed=9), base_parts(seed=9, vision=False)[0].eval()
    embeds = torch.randn(2, 5, TINY["hidden_size"], generator=torch.Generator().manual_seed(10))
    with mmkernels.use_backend(backend):
        merged = lavin.merge(copy.deepcopy(model), lavin.TEXT)
        want = _dispatched(lambda: base(inputs_embeds=embeds))
        assert _dispatched(lambda: merged(inputs_embeds=embeds)) == want
        ids = torch.randint(0, TINY["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(10))
        unmerged = _dispatched(lambda: lavin.forward(model, ids, modality=lavin.TEXT))
    assert sum(unmerged.values()) > sum(want.values())


def test_parameter_count_llama7b_clip_l14():
    """METHODS.md: LaVIN-7B with CLIP-L/14 trains 3,781,296 parameters."""
    llama = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32)
    clip_l = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, image_size=224, patch_size=14)
    with torch.device("meta"):
        model = Llama(LlamaConfig(**llama))
        clip = transformers.CLIPVisionModel(clip_l)
    lavin.apply(model, lavin.LaVINConfig(), vision=clip)
    counts = lavin.count_parameters(model)
    assert counts == {"llm_adapters": 32 * 81930, "vision_adapters": 24 * 20490,
                      "visual_projection": 1024 * 128 + 128 + 128 * 4096 + 4096, "modality_embedding": 2 * 4096,
                      "total": 3_781_296}
    assert model.lavin_vision.num_tokens == 6
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 3_781_296


def test_vision_adapter_options():
    """Adapters before the CLIP MLP too (LaVIN's "router_block"), or none in the CLIP; both run end to end."""
    per = 8 * 32 + 8 + 2 * (32 * 4 + 32) + 32 * 2 + 2  # A, a, B, b, D, d_b, router at width 32
    for kwargs, adapters in ((dict(vision_adapter_before_mlp=True), 2 * CLIP["num_hidden_layers"]),
                             (dict(vision_adapters=False), 0)):
        model = build(seed=15, **kwargs)
        assert lavin.count_parameters(model)["vision_adapters"] == adapters * per
        ids = torch.randint(0, TINY["vocab_size"], (2, 3), generator=torch.Generator().manual_seed(16))
        with mmkernels.use_backend("reference"):
            logits = lavin.forward(model, ids, pixel_values=images(2))
            logits.sum().backward()
        assert logits.shape == (2, 2 + 3, TINY["vocab_size"])
        assert model.visual_projection.fc1.weight.grad is not None
        if adapters:
            norm2 = model.lavin_vision.clip.encoder.layers[0].layer_norm2
            assert norm2.adapter.weight_a.grad is not None and norm2.adapter.weight_a.grad.abs().sum() > 0


def test_save_load_roundtrip(tmp_path):
    model = build(seed=11)
    lavin.save_adapter(model, str(tmp_path))
    base, clip = base_parts(seed=11)  # the same base weights and CLIP, without LaVIN
    lavin.load_adapter(base, str(tmp_path), vision=clip)
    ids = torch.randint(0, TINY["vocab_size"], (2, 4), generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), mmkernels.use_backend("reference"):
        want = lavin.forward(model, ids, pixel_values=images(2))
        got = lavin.forward(base.eval(), ids, pixel_values=images(2))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="differs"):
        lavin.load_adapter(build(seed=11, tau=5.0), str(tmp_path))
    text_only, _ = base_parts(seed=11, vision=False)
    with pytest.raises(ValueError, match="unexpected"):
        lavin.load_adapter(text_only, str(tmp_path))


def test_errors():
    model = build(seed=12, vision=False)
    with pytest.raises(ValueError, match="already applied"):
        lavin.apply(model, lavin.LaVINConfig())
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="modality"):
        lavin.forward(model, ids, modality=2)
    with pytest.raises(ValueError, match="without a vision model"):
        lavin.encode_images(model, images(1))
    with pytest.raises(ValueError, match="LaVIN is not applied"):
        lavin.forward(Llama(LlamaConfig(**TINY)), ids)
    with pytest.raises(ValueError, match="hidden"):
        lavin.LaVINConfig(hidden=7)
    with pytest.raises(ValueError, match="tau"):
        lavin.LaVINConfig(tau=0)
    with pytest.raises(ValueError, match="visual_layer_stride"):
        build(vision=True, visual_layer_stride=8)


# ----------------------------------------------------------------------------------------------------
# Training: tiny LLaMA + tiny CLIP, image questions and text-only sequences
# ----------------------------------------------------------------------------------------------------


def _batches(steps, seed=0):
    """Alternating batches. Image: a class-coded picture (+1 or -1 plus noise), the answer token 40 + class
    after a fixed question. Text-only: counting sequences k, k+1, ... ."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        if step % 2 == 0:
            cls = torch.randint(0, 2, (4,), generator=gen)
            px = (2 * cls - 1).float()[:, None, None, None] + 0.3 * torch.randn(4, 3, 28, 28, generator=gen)
            ids = torch.stack([torch.tensor([3, 4, 5, 40]) + torch.tensor([0, 0, 0, 1]) * c for c in cls])
            out.append((ids, px))
        else:
            start = torch.randint(10, 30, (4, 1), generator=gen)
            out.append((start + torch.arange(5), None))
    return out


def _train(model, batches, lr=2e-2):
    params = [p for p in lavin.adapter_parameters(model).values()]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for ids, px in batches:
        logits = lavin.forward(model, ids, pixel_values=px)
        n_vis = logits.shape[1] - ids.shape[1]
        pred = logits[:, n_vis:-1].reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(pred, ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _route_gap(model):
    with torch.no_grad():
        w = lavin.route(model, torch.tensor([0, 1]))
    return max((w[layer][0] - w[layer][1]).abs().max().item() for layer in w)


def test_tiny_multimodal_training():
    """LaVIN's setting: tau=10, adapters zero-initialised. The loss falls and the two modalities' routing
    weights move apart (their gap starts from the embeddings' random difference)."""
    model = build(seed=13, randomize=False).train()
    gap0 = _route_gap(model)
    losses = _train(model, _batches(16))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.9 * first, losses
    gap = _route_gap(model)
    assert gap > 0.2 and gap > 3 * gap0, (gap0, gap)


def test_training_fused_matches_reference(monkeypatch):
    """Three steps with the adapters on the Triton kernels (interpreter) and on the reference: same losses."""
    batches = _batches(3, seed=1)
    ref_losses = _train(build(seed=14, randomize=False).train(), batches)

    op = mom_nn.mom_adapter

    def fused(*args, **kwargs):  # only the adapters on the kernels; the other ops stay on the reference
        with mmkernels.use_backend("triton"):
            return op(*args, **kwargs)

    monkeypatch.setattr(mom_nn, "mom_adapter", fused)
    fused_losses = _train(build(seed=14, randomize=False).train(), batches)
    assert ref_losses[0] != ref_losses[-1]
    for a, b in zip(fused_losses, ref_losses):
        assert abs(a - b) <= 1e-4 * abs(b), (fused_losses, ref_losses)
