"""LoRA: ops.lora_linear against the float64 formula, nn.LoRALinear (stacked [W; A] buffer, merge), and
methods/lora.py against HF PEFT on the same weights (logits), save/load, and a short training run."""

import pytest
import torch

from mmkernels import ops
from mmkernels.methods import lora
from mmkernels.models import Llama
from mmkernels.nn import LoRALinear
from mmkernels.ops.lora import lora_linear_bwd, lora_linear_fwd, stacked
from _tolerance import assert_close_to_reference

transformers = pytest.importorskip("transformers")


def _formula(x, w, a, b, s, bias):
    y = x @ w.t() + s * (x @ a.t()) @ b.t()
    return y if bias is None else y + bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [((1, 1, 8), 5, 1), ((2, 7, 48), 24, 4), ((33, 100), 72, 17)])
@pytest.mark.parametrize("layout", ["stacked", "separate"])
def test_lora_linear_matches_the_formula(shape, dtype, layout):
    x_shape, d_out, rank = shape
    gen = torch.Generator().manual_seed(0)
    d_in = x_shape[-1]
    base = torch.nn.Linear(d_in, d_out, dtype=torch.float64)
    layer = LoRALinear(base, rank, alpha=2.0 * rank, generator=gen).to(dtype)
    if layout == "stacked":  # the layout the module allocates (a .to() separates W and A)
        layer = LoRALinear(base.to(dtype), rank, alpha=2.0 * rank, generator=gen)
        assert stacked(layer.weight, layer.lora_A) is not None
    else:
        assert stacked(layer.weight, layer.lora_A) is None
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3, generator=gen)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64)
    dy = torch.randn(*x_shape[:-1], d_out, generator=gen, dtype=torch.float64)

    def run(dt, fn):
        xs = x.detach().to(dt).requires_grad_()
        a, b = (layer.lora_A.detach().to(dt).requires_grad_(), layer.lora_B.detach().to(dt).requires_grad_())
        y = fn(xs, layer.weight.detach().to(dt), a, b, layer.scaling, layer.bias.detach().to(dt))
        y.backward(dy.to(dt))
        return [y.detach(), xs.grad, a.grad, b.grad]

    high = run(torch.float64, _formula)
    low = run(dtype, _formula)
    ours_a, ours_b = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    if layout == "stacked":  # keep the stacked storage: differentiate through the module's own tensors
        layer.zero_grad(set_to_none=True)
        xs = x.detach().to(dtype).requires_grad_()
        y = layer(xs)
        y.backward(dy.to(dtype))
        ours = [y.detach(), xs.grad, layer.lora_A.grad, layer.lora_B.grad]
    else:
        xs = x.detach().to(dtype).requires_grad_()
        y = ops.lora_linear(xs, layer.weight, ours_a, ours_b, layer.scaling, layer.bias)
        y.backward(dy.to(dtype))
        ours = [y.detach(), xs.grad, ours_a.grad, ours_b.grad]
    for name, o, lo, hi in zip(("y", "dx", "dA", "dB"), ours, low, high):
        assert_close_to_reference(o, lo, hi, f"lora {name} {shape} {dtype} {layout}")


def test_float32_masters_with_16bit_activations():
    """The trainer's setup on a GPU: a 16-bit base, float32 A and B (AdamW masters), 16-bit activations. The
    low-rank path runs in the activations' dtype and the gradients reach the float32 masters."""
    from mmkernels.train.trainer import master_weights

    gen = torch.Generator().manual_seed(3)
    base = torch.nn.Linear(40, 24, bias=False)
    layer = LoRALinear(base, 4, alpha=8.0, generator=gen).to(torch.float16)
    with torch.no_grad():
        layer.lora_B.normal_(generator=gen)
    master_weights(layer)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    x = torch.randn(3, 40, generator=gen).to(torch.float16)
    y = layer(x)
    assert y.dtype == torch.float16
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    want = _formula(x.double(), layer.weight.double(), a.double(), b.double(), layer.scaling, None)
    low = _formula(x, layer.weight, a.half(), b.half(), layer.scaling, None)
    assert_close_to_reference(y, low, want, "lora y, float32 masters")
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0


def test_saves_x_and_h_only_and_skips_the_weight_gradient():
    layer = LoRALinear(torch.nn.Linear(64, 32), rank=4)
    x = torch.randn(10, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(10, 64), (10, 4), (32, 64), (4, 64), (32, 4)])  # x, h and the (shared) weights
    assert layer.weight.grad is None and layer.lora_A.grad is not None


def test_zero_init_merge_and_errors():
    base = torch.nn.Linear(40, 24)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.testing.assert_close(layer.merge()(x), layer(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"rank: expected an integer in \[1, 24\], got 25"):
        LoRALinear(base, rank=25)
    with pytest.raises(ValueError, match=r"x: expected last dim 40"):
        layer(torch.randn(2, 41))
    with pytest.raises(TypeError, match="lora_a: expected dtype torch.float32"):
        ops.lora_linear(x, layer.weight, layer.lora_A.double(), layer.lora_B, 1.0)


def test_dropout_path_matches_the_formula():
    """With dropout in training mode the low-rank path reads dropout(x) (PEFT's order) and keeps the alpha / r
    scaling: y = x W^T + b + s (dropout(x) A^T) B^T, on the same dropout mask; in eval mode no dropout."""
    base = torch.nn.Linear(40, 24)
    layer = LoRALinear(base, rank=4, alpha=12.0, dropout=0.25)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 40)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.25, True)
    assert not torch.equal(dropped, x)
    torch.testing.assert_close(y, _formula(x, base.weight, layer.lora_A, layer.lora_B, 3.0, base.bias) +
                               3.0 * (dropped - x) @ layer.lora_A.t() @ layer.lora_B.t(), rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), _formula(x, base.weight, layer.lora_A, layer.lora_B, 3.0, base.bias),
                               rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, w, a, b = torch.randn(6, 16), torch.randn(8, 16), torch.randn(2, 16), torch.randn(8, 2)
    torch.library.opcheck(lora_linear_fwd, (x, w, a, b, 0.5))
    y, h = lora_linear_fwd(x, w, a, b, 0.5)
    torch.library.opcheck(lora_linear_bwd, (torch.randn_like(y), x, h, w, a, b, 0.5))


def _peft_lora(tmp_path, targets):
    from peft import LoraConfig, get_peft_model

    from test_llama_adapter import TINY

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    hf.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=12, target_modules=list(targets), lora_dropout=0.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # PEFT zero-inits B: give it values so the low-rank path counts
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return peft_model.eval()


@pytest.mark.parametrize("targets", [lora.TARGETS, ("q_proj", "v_proj")])
def test_peft_lora_parity(tmp_path, targets):
    peft_model = _peft_lora(tmp_path, targets)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    ours = lora.from_peft(Llama.from_pretrained(str(tmp_path / "base")), peft_model).eval()
    assert ours.lora_config.targets == tuple(targets) and ours.lora_config.rank == 4
    peft_model.save_pretrained(tmp_path / "adapter")
    from_dir = lora.from_peft(Llama.from_pretrained(str(tmp_path / "base")), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        actual, actual_dir = ours(ids), from_dir(ids)
    scale = expected.abs().max().item()
    assert (expected - plain).abs().max().item() > 1e-2 * scale  # the adapter matters at this size
    assert (actual - expected).abs().max().item() <= 2e-6 * scale
    assert torch.equal(actual, actual_dir)


def test_save_load_merge_and_training(tmp_path):
    from test_llama_adapter import tiny_model

    model = lora.apply(tiny_model(), lora.LoRAConfig(rank=4, alpha=8.0))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora.adapter_parameters(model))
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW(lora.adapter_parameters(model).values(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    lora.save_adapter(model, str(tmp_path))
    restored = lora.load_adapter(tiny_model(), str(tmp_path))
    with torch.no_grad():
        expected = model(ids)
        assert torch.equal(restored(ids), expected)
        merged = lora.merge(restored)(ids)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds a 'lora' adapter, expected 'llama_adapter'"):
        from mmkernels.methods import llama_adapter

        llama_adapter.load_adapter(tiny_model(), str(tmp_path))


def test_dropout_path_on_a_16_bit_base_with_float32_masters():
    """The trainer's bf16 base holds float32 A and B (master weights): the dropout path runs them in x's dtype
    as the fused path does, and the gradients reach the float32 masters."""
    from mmkernels.train.trainer import master_weights

    base = torch.nn.Linear(40, 24).to(torch.bfloat16)
    layer = LoRALinear(base, rank=4, alpha=8.0, dropout=0.25)
    master_weights(layer)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 40, dtype=torch.bfloat16)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = torch.nn.functional.dropout(x, 0.25, True)
    a, b = layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype)
    expected = torch.nn.functional.linear(x, base.weight, base.bias) + 2.0 * ((dropped @ a.t()) @ b.t())
    assert y.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().sum() > 0
