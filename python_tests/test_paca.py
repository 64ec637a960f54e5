import importlib
import zlib

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import ops
from mmkernels.nn import PaCALinear
from mmkernels.reference import paca as ref
from _harness import check_against_reference
from _tolerance import FLOORS, assert_close_to_reference

paca_mod = importlib.import_module("mmkernels.ops.paca")
kernels = importlib.import_module("mmkernels.kernels.paca")


def _problem(d_in, d_out, r, device, seed=0, bias=True, scaling=0.5):
    """A W_eff synced from (W, delta) with values exact in fp16, so every dtype sees the same weight."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen).half().float() / d_in**0.5
    idx = ref.select_columns(d_in, r, seed)
    delta = torch.randn(d_out, r, generator=gen) * 0.1
    w_eff = ref.scatter_delta(w, delta, idx, scaling).half().float()
    b = torch.randn(d_out, generator=gen).half().float() if bias else None
    return w_eff.to(device), delta.to(device), idx.to(device), None if b is None else b.to(device)


# (x shape, d_out, r, differentiable bias): tokens 1, 7, 33; d_in 48, 100; d_out 24, 72; r 1, 5, 16, 17
CASES = [
    ((1, 48), 24, 1, False),
    ((7, 100), 72, 5, True),
    ((33, 48), 72, 16, False),
    ((33, 100), 24, 17, True),
    ((7, 48), 24, 17, False),
    ((1, 100), 72, 16, True),
    ((2, 7, 100), 72, 17, True),  # 3-D inputs (B, T, d_in)
    ((3, 11, 48), 24, 5, False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_paca_linear_triton_matches_reference(device, case, dtype):
    shape, d_out, r, grad_bias = case
    d_in = shape[-1]
    w, delta, idx, b = _problem(d_in, d_out, r, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    delta.requires_grad_()
    tokens = x.numel() // d_in
    if grad_bias:
        b.requires_grad_()
        inputs = [x, delta, b]
        fn = lambda x, delta, b: ops.paca_linear(x, w.to(x.dtype), delta, idx, 0.5, b)  # noqa: E731
        reduced = {2: tokens}
    else:
        inputs = [x, delta]
        fn = lambda x, delta: ops.paca_linear(x, w.to(x.dtype), delta, idx, 0.5, b.to(x.dtype))  # noqa: E731
        reduced = {}
    # d_delta sums over the tokens
    check_against_reference(fn, inputs, backend="triton", dtype=dtype, name=f"paca{case}",
                            reduced={1: tokens, **reduced})


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16])
def test_fp32_delta_with_low_precision_activations(device, x_dtype):
    """The training setup: x and W in fp16, delta an fp32 master; d_delta comes back in fp32."""
    w, delta, idx, b = _problem(100, 72, 17, device)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(33, 100, generator=gen).to(device, x_dtype)
    dy = torch.randn(33, 72, generator=gen).to(device, x_dtype)
    grads = {}
    for name in ("triton", "reference"):
        d = delta.clone().requires_grad_()
        with mmkernels.use_backend(name):
            ops.paca_linear(x, w.to(x_dtype), d, idx, 0.5, b.to(x_dtype)).backward(dy)
        assert d.grad.dtype == torch.float32
        grads[name] = d.grad
    high = 0.5 * dy.double().t() @ x.double()[:, idx]
    assert_close_to_reference(grads["triton"], grads["reference"], high, "d_delta fp32")


@pytest.mark.parametrize("r", [1, 5, 16, 17, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gather_kernel(device, r, dtype):
    gen = torch.Generator().manual_seed(r)
    big = torch.randn(37, 130, generator=gen).to(device, dtype)
    x = big[:, 7:107]  # a strided view: row stride 130
    idx = ref.select_columns(100, r, r).to(device)
    out = kernels.gather_columns(x, idx.to(torch.int32))
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, x[:, idx])
    assert kernels.gather_columns(x[:0], idx.to(torch.int32)).shape == (0, r)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_delta_grad_kernel(device, dtype, splits, monkeypatch):
    """Several token blocks (M=130, BLOCK_K=64), two r blocks (r=70), a strided dy; split-K forced on CPU."""
    monkeypatch.setattr(kernels, "_num_splits", lambda tiles, k_blocks, dev: min(splits, k_blocks))
    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(72, 130, generator=gen).t().to(device, dtype)  # (130, 72), column-major
    x_i = torch.randn(130, 70, generator=gen).to(device, dtype)
    out = kernels.delta_grad(dy, x_i, 0.25)
    assert out.dtype == torch.float32 and out.shape == (72, 70)
    high = ref.delta_grad(dy.double(), x_i.double(), 0.25)
    low = ref.delta_grad(dy, x_i, 0.25)
    assert_close_to_reference(out, low, high, "delta_grad", floor=FLOORS[torch.float32] * 130**0.5)
    assert torch.equal(kernels.delta_grad(dy[:0], x_i[:0], 0.25), torch.zeros(72, 70, device=device))


@pytest.mark.parametrize("r", [1, 17, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sync_kernel(device, dtype, r):
    gen = torch.Generator().manual_seed(r)
    w = torch.randn(72, 100, generator=gen).to(device, dtype)
    idx = ref.select_columns(100, r, r).to(device)
    orig = w[:, idx].clone()
    delta = torch.randn(r, 72, generator=gen).t().to(device)  # fp32, strided
    expected = w.clone()
    ref.sync_columns(expected, orig, delta, idx, 0.75)
    kernels.sync_columns(w, orig, delta, idx.to(torch.int32), 0.75)
    rest = torch.ones(100, dtype=torch.bool)
    rest[idx.cpu()] = False
    assert torch.equal(w[:, rest.to(device)], expected[:, rest.to(device)])  # other columns untouched
    if device.type == "cpu":
        assert torch.equal(w, expected)
    else:  # a fused multiply-add may round the fp32 value differently by one unit
        torch.testing.assert_close(w, expected, rtol=2 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sync_unmerge_round_trip_is_bit_exact(device, backend_name, dtype):
    base = nn.Linear(100, 72).to(device, dtype)
    original = base.weight.detach().clone()
    layer = PaCALinear(base, 17, scaling=2.0, name="layers.0.q_proj")
    gen = torch.Generator().manual_seed(5)
    with mmkernels.use_backend(backend_name):
        for _ in range(3):
            with torch.no_grad():
                layer.delta.copy_(torch.randn(72, 17, generator=gen))
            layer.sync_()
            assert not torch.equal(layer.weight, original)
        plain = layer.unmerge()
    assert torch.equal(layer.weight, original)
    assert type(plain) is nn.Linear and plain.weight is layer.weight and plain.bias is layer.bias


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_fresh_layer_equals_base_layer(device, backend_name):
    base = nn.Linear(48, 24).to(device)
    x = torch.randn(2, 7, 48, device=device, requires_grad=True)
    expected = base(x)
    (dx_expected,) = torch.autograd.grad(expected.sum(), x)
    layer = PaCALinear(base, 5, name="fc")
    assert torch.equal(layer.delta, torch.zeros(24, 5, device=device)) and layer.delta.dtype == torch.float32
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    with mmkernels.use_backend(backend_name):
        y = layer(x)
        dx, d_delta = torch.autograd.grad(y.sum(), [x, layer.delta])
    assert torch.equal(y, expected)
    assert torch.equal(dx, dx_expected)
    assert d_delta.shape == (24, 5) and d_delta.dtype == torch.float32


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_synced_layer_equals_effective_weight(device, backend_name, dtype):
    base = nn.Linear(100, 72).to(device, dtype)
    w0, b0 = base.weight.detach().double().clone(), base.bias.detach().double().clone()
    layer = PaCALinear(base, 16, scaling=0.5, seed=3, name="mlp.up")
    with torch.no_grad():
        layer.delta.copy_(torch.randn(72, 16, generator=torch.Generator().manual_seed(0)))
    x = torch.randn(33, 100, device=device).to(dtype)
    with mmkernels.use_backend(backend_name):
        layer.sync_()
        y = layer(x)
    w_eff = ref.scatter_delta(w0, layer.delta.double(), layer.idx, 0.5)
    high = x.double() @ w_eff.t() + b0
    low = torch.nn.functional.linear(x, w_eff.to(dtype), base.bias)
    assert_close_to_reference(y, low, high, "synced PaCALinear")
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight is not layer.weight
    assert torch.equal(merged(x), layer(x))


def test_merge_folds_a_delta_not_yet_synced():
    """merge() exports W_eff of the current delta even when no sync ran since delta changed (load_adapter and
    load_state_dict set delta only; the forward's W_eff follows at the next sync)."""
    base = nn.Linear(20, 12)
    w0 = base.weight.detach().double().clone()
    layer = PaCALinear(base, 5, scaling=0.5, seed=1, name="layers.0.mlp.up_proj")
    with torch.no_grad():
        layer.delta.copy_(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)))
    merged = layer.merge()
    expected = ref.scatter_delta(w0, layer.delta.double(), layer.idx, 0.5)
    torch.testing.assert_close(merged.weight.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(merged.bias, base.bias) and merged.bias is not base.bias


def test_column_choice_is_deterministic_per_name_and_seed():
    assert ref.layer_seed("q_proj", 0) == zlib.crc32(b"q_proj") and ref.layer_seed("q_proj", 1) != ref.layer_seed("q_proj", 0)
    a = PaCALinear(nn.Linear(100, 8), 16, name="layers.0.q_proj").idx
    assert torch.equal(a, PaCALinear(nn.Linear(100, 8), 16, name="layers.0.q_proj").idx)
    assert not torch.equal(a, PaCALinear(nn.Linear(100, 8), 16, name="layers.1.q_proj").idx)
    assert not torch.equal(a, PaCALinear(nn.Linear(100, 8), 16, seed=1, name="layers.0.q_proj").idx)
    assert a.dtype == torch.int64 and a.shape == (16,)
    assert bool((a[1:] > a[:-1]).all()) and 0 <= int(a[0]) and int(a[-1]) < 100
    assert torch.equal(ref.select_columns(10, 10, 7), torch.arange(10))


def test_backward_saves_only_x_i(device):
    """One forward saves x_I (tokens x r) and a reference to the resident weight: nothing of tokens x d_in."""
    layer = PaCALinear(nn.Linear(100, 72).to(device), 17, name="o_proj")
    x = torch.randn(3, 11, 100, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    for backend_name in ("triton", "reference"):
        saved.clear()
        with mmkernels.use_backend(backend_name), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        others = [t for t in saved if t.data_ptr() != layer.weight.data_ptr()]
        assert len(others) == len(saved) - 1, "the weight is saved once, by reference"
        assert sum(t.numel() * t.element_size() for t in others) == 33 * 17 * x.element_size()
        assert [tuple(t.shape) for t in others] == [(33, 17)]
        assert torch.equal(others[0], x.detach().reshape(33, 100)[:, layer.idx])
        y.sum().backward()


def test_gradients_only_where_needed(device):
    """x without grad: the dx GEMM is skipped; delta without grad: x still gets its gradient."""
    layer = PaCALinear(nn.Linear(48, 24).to(device), 5)
    x = torch.randn(7, 48, device=device)
    layer(x).sum().backward()
    assert layer.delta.grad is not None and layer.weight.grad is None and layer.bias.grad is None
    layer.delta.requires_grad_(False)
    x.requires_grad_()
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(7, 48))


def test_sync_between_forward_and_backward_is_an_error():
    layer = PaCALinear(nn.Linear(48, 24), 5)
    y = layer(torch.randn(3, 48))
    layer.sync_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_bad_input():
    w, delta, idx = torch.randn(24, 48), torch.zeros(24, 5), ref.select_columns(48, 5, 0)
    x = torch.randn(7, 48)
    with pytest.raises(ValueError, match=r"x: expected last dim 48 \(weight's in_features\), got shape \(7, 40\)"):
        ops.paca_linear(torch.randn(7, 40), w, delta, idx, 1.0)
    with pytest.raises(ValueError, match=r"delta: expected shape \(24, 5\), got \(24, 4\)"):
        ops.paca_linear(x, w, torch.zeros(24, 4), idx, 1.0)
    with pytest.raises(TypeError, match=r"idx: expected dtype in \(torch.int64, torch.int32\), got torch.float32"):
        ops.paca_linear(x, w, delta, idx.float(), 1.0)
    with pytest.raises(ValueError, match="idx: expected 1 dimensions, got 2"):
        ops.paca_linear(x, w, delta, idx[None], 1.0)
    with pytest.raises(ValueError, match=r"idx: expected column indices in \[0, 48\) \(d_in\), got values in \[3, 48\]"):
        ops.paca_linear(x, w, delta, torch.tensor([3, 4, 5, 6, 48]), 1.0)
    with pytest.raises(ValueError, match=r"idx: expected column indices in \[0, 48\)"):
        ops.paca_linear(x, w, delta, torch.tensor([-1, 4, 5, 6, 7]), 1.0)
    with pytest.raises(ValueError, match="idx: expected strictly increasing column indices"):
        ops.paca_linear(x, w, delta, torch.tensor([3, 4, 4, 6, 7]), 1.0)
    with pytest.raises(ValueError, match="idx: expected strictly increasing column indices"):
        ops.paca_linear(x, w, delta, torch.tensor([7, 4, 5, 6, 8], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match=r"idx: expected between 1 and 48 \(d_in\) column indices, got 0"):
        ops.paca_linear(x, w, torch.zeros(24, 0), idx[:0], 1.0)
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32 \\(the dtype of x\\), got torch.float16"):
        ops.paca_linear(x, w.half(), delta, idx, 1.0)
    with pytest.raises(ValueError, match=r"bias: expected shape \(24,\), got \(23,\)"):
        ops.paca_linear(x, w, delta, idx, 1.0, torch.zeros(23))
    with pytest.raises(TypeError, match="scaling: expected a number, got Tensor"):
        ops.paca_linear(x, w, delta, idx, torch.tensor(1.0))
    with pytest.raises(ValueError, match="idx: expected device meta"):
        ops.paca_linear(x.to("meta"), w.to("meta"), delta.to("meta"), idx, 1.0)
    with pytest.raises(TypeError, match="base: expected an nn.Linear, got Conv1d"):
        PaCALinear(nn.Conv1d(4, 4, 1), 2)
    for r in (0, 49, 2.0, True):
        with pytest.raises(ValueError, match=r"r: expected an integer in \[1, 48\] \(in_features\)"):
            PaCALinear(nn.Linear(48, 24), r)
    with pytest.raises(ValueError, match=r"orig_cols: expected shape \(24, 5\), got \(24, 4\)"):
        paca_mod.sync_columns(w, torch.zeros(24, 4), delta, idx, 1.0)


def test_idx_values_are_rechecked_after_in_place_change():
    w, delta, x = torch.randn(24, 48), torch.zeros(24, 3), torch.randn(2, 48)
    idx = torch.tensor([1, 2, 3])
    ops.paca_linear(x, w, delta, idx, 1.0)
    idx[0] = 5
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.paca_linear(x, w, delta, idx, 1.0)


def test_extra_repr():
    layer = PaCALinear(nn.Linear(48, 24, bias=False), 5, scaling=2, seed=1, name="k")
    assert repr(layer) == "PaCALinear(48, 24, r=5, scaling=2.0, seed=1, name='k', bias=False)"
    assert layer.unmerge().bias is None


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck(impl):
    w, delta, idx, b = _problem(48, 24, 5, "cpu")
    x = torch.randn(7, 48, requires_grad=True)
    delta.requires_grad_()
    torch.library.opcheck(paca_mod.paca_linear_fwd, (x, w, b, delta, idx, 0.5, impl))
    torch.library.opcheck(paca_mod.paca_linear_fwd, (x, w, b.requires_grad_(), delta, idx, 0.5, impl))
    x_i = x.detach()[:, idx]
    for need_dx in (True, False):
        torch.library.opcheck(paca_mod.paca_linear_bwd, (torch.randn(7, 24), x_i, w, 0.5, need_dx, impl))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    layer = PaCALinear(nn.Linear(48, 24), 5, name="v_proj")
    with torch.no_grad():
        layer.delta.normal_()
    layer.sync_()
    x = torch.randn(2, 7, 48, requires_grad=True)

    def step(x):
        return (layer(x) ** 2).sum()

    with mmkernels.use_backend("reference"):
        eager = step(x)
        eager_grads = torch.autograd.grad(eager, [x, layer.delta])
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        out = compiled(x)
        grads = torch.autograd.grad(out, [x, layer.delta])
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_paca_bf16_gpu():
    w, delta, idx, b = _problem(4096, 1024, 64, "cuda")
    x = torch.randn(4, 513, 4096, device="cuda").requires_grad_()
    delta.requires_grad_()
    b.requires_grad_()
    fn = lambda x, delta, b: ops.paca_linear(x, w.to(x.dtype), delta, idx, 0.5, b)  # noqa: E731
    check_against_reference(fn, [x, delta, b], backend="triton", dtype=torch.bfloat16, name="paca bf16",
                            reduced={1: 4 * 513, 2: 4 * 513})
    # the training setup at scale: bf16 activations, fp32 delta, split-K over 8k tokens
    xs = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)
    got = kernels.delta_grad(dy, xs[:, idx], 0.5)
    high = ref.delta_grad(dy.double(), xs[:, idx].double(), 0.5)
    assert_close_to_reference(got, ref.delta_grad(dy, xs[:, idx], 0.5), high, "delta_grad bf16 8k",
                              floor=FLOORS[torch.float32] * 8192**0.5)
