"""methods/paca.py and nn.QPaCALinear: apply, zero-init, training on both backends (PaCA, QPaCA), saved
activations vs LoRA and a frozen linear, save/load with column checks, merge."""

import pytest
import torch
from torch.nn import functional as F

import mmkernels
from mmkernels.methods import lora, paca
from mmkernels.nn import LoRALinear, PaCALinear
from mmkernels.nn.qpaca_linear import QPaCALinear
from mmkernels.reference import quantize as qz
from test_llama_adapter import tiny_model


def _loss(model, ids):
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def _train(backend, cfg, steps=4, lr=5e-3):
    model = paca.apply(tiny_model(), cfg)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(paca.adapter_parameters(model).values(), lr=lr, weight_decay=0.0)
    paca.sync_after_step(opt, model)
    losses = []
    with mmkernels.use_backend(backend):
        for _ in range(steps):
            loss = _loss(model, ids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, model


def test_apply_zero_init_and_trainable_set():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        base = model(ids)
        paca.apply(model, paca.PaCAConfig(rank=5))
        assert torch.equal(model(ids), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(paca.adapter_parameters(model))
    assert len(trainable) == 3 * 7  # 3 layers x 7 targets
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, PaCALinear) and q.name == "layers.0.self_attn.q_proj" and q.delta.shape == (64, 5)
    other = model.layers[1].self_attn.q_proj
    assert not torch.equal(q.idx, other.idx)  # columns are drawn per layer name
    with pytest.raises(ValueError, match="already applied"):
        paca.apply(model, paca.PaCAConfig())
    with pytest.raises(ValueError, match="quantize: expected one of"):
        paca.PaCAConfig(quantize="fp8")


def test_training_lowers_the_loss_alike_on_both_backends():
    ref_losses, ref_model = _train("reference", paca.PaCAConfig(rank=8))
    tri_losses, tri_model = _train("triton", paca.PaCAConfig(rank=8))
    assert ref_losses[-1] < ref_losses[0] - 0.05
    assert tri_losses == pytest.approx(ref_losses, rel=1e-5)
    for (name, a), b in zip(paca.adapter_parameters(ref_model).items(), paca.adapter_parameters(tri_model).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
    # sync_after_step kept W_eff in step with the deltas.
    layer = ref_model.layers[2].mlp.down_proj
    torch.testing.assert_close(layer.weight[:, layer.idx], layer.orig_cols + layer.scaling * layer.delta)


# NF4 block 40 divides none of the tiny model's in_features (64, 96)
@pytest.mark.parametrize("kind,block", [("int8", 32), ("nf4", 40)])
def test_qpaca_trains_and_keeps_its_columns_exact(kind, block):
    cfg = paca.PaCAConfig(rank=8, quantize=kind, block=block)
    losses, model = _train("reference", cfg, lr=1e-2)
    assert losses[-1] < losses[0] - 0.05
    layer = model.layers[1].self_attn.v_proj
    assert isinstance(layer, QPaCALinear)
    # The effective weight's selected columns are exactly W[:, I] + s delta: probe with unit inputs.
    probe = torch.zeros(layer.r, layer.in_features)
    probe[torch.arange(layer.r), layer.idx] = 1.0
    with torch.no_grad():
        cols = layer(probe).t()
    assert torch.equal(cols, (layer.cols.float() + layer.scaling * layer.delta).to(cols.dtype))
    _, triton_model = _train("triton", cfg, lr=1e-2)
    # Four AdamW steps at lr 1e-2 move each delta by up to ~4e-2; AdamW divides each gradient by its own
    # running RMS, so a rounding-level difference between the backends in a near-zero gradient can move an
    # element by ~1e-5 (seen: 4.8e-6 on one of 512). A wrong gradient moves elements by ~1e-2.
    for a, b in zip(paca.adapter_parameters(model).values(), paca.adapter_parameters(triton_model).values()):
        torch.testing.assert_close(a, b, rtol=5e-4, atol=2e-5)


# in_features 100 and 72 are not multiples of the block: blocks span rows and the last one is zero-padded.
@pytest.mark.parametrize("d_in,block", [(128, 64), (100, 64), (72, 16)])
def test_qpaca_base_error_within_the_quantization_bound(d_in, block):
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(d_in, 24, bias=True)
    with torch.no_grad():
        base.weight.normal_(0, 0.05, generator=gen)
    layer = QPaCALinear(base, r=6, kind="nf4", block=block)
    x = torch.randn(7, d_in, generator=gen)
    with torch.no_grad():
        err = (layer(x) - base(x)).abs()
        w0 = base.weight.clone()
        w0[:, layer.idx] = 0
    blocks = -(-24 * d_in // block)
    absmax = F.pad(w0.reshape(-1), (0, blocks * block - 24 * d_in)).reshape(blocks, block).abs().amax(1)
    elem = (absmax * qz.NF4_MAX_GAP / 2).repeat_interleave(block)[:24 * d_in].reshape(24, d_in)
    assert torch.all(err <= x.abs() @ elem.t() * (1 + 1e-5) + 1e-6)
    assert err.max() > 0  # the base really is quantized
    assert layer.qdata.numel() == blocks * block // 2


def test_saved_activations_paca_vs_lora_vs_frozen():
    """Bytes kept for backward that scale with tokens: PaCA keeps x_I (r/d_in of x), LoRA keeps x and
    x A^T, a frozen linear keeps no more than x."""
    tokens, d_in, d_out, r = 64, 96, 48, 6

    def saved_activation_bytes(layer):
        x = torch.randn(tokens, d_in, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            layer(x).sum().backward()
        return sum(t.numel() * t.element_size() for t in saved if t.shape[0] == tokens)

    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    paca_bytes = saved_activation_bytes(PaCALinear(base, r))
    lora_bytes = saved_activation_bytes(LoRALinear(torch.nn.Linear(d_in, d_out, bias=False), r))
    frozen_bytes = saved_activation_bytes(base)
    assert paca_bytes == tokens * r * 4
    assert lora_bytes == tokens * (d_in + r) * 4
    assert paca_bytes / (tokens * d_in * 4) == r / d_in
    assert frozen_bytes <= tokens * d_in * 4


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_save_load_and_merge(tmp_path, quantize):
    cfg = paca.PaCAConfig(rank=4, quantize=quantize, block=32, seed=3)
    _, model = _train("reference", cfg, steps=2)
    paca.save_adapter(model, str(tmp_path))
    restored = paca.load_adapter(tiny_model(), str(tmp_path))
    ids = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        expected = model(ids)
        paca.sync(restored)  # loading sets the deltas; PaCALinear's W_eff follows at the sync
        assert torch.equal(restored(ids), expected)
        merged = paca.merge(restored)(ids)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="the saved columns of layers.0.self_attn.q_proj differ"):
        other = paca.apply(tiny_model(), paca.PaCAConfig(rank=4, quantize=quantize, block=32, seed=4))
        other.paca_config = cfg  # same config on record, different columns in the layers
        paca.load_adapter(other, str(tmp_path))
    with pytest.raises(ValueError, match="holds a 'paca' adapter, expected 'lora'"):
        lora.load_adapter(tiny_model(), str(tmp_path))
