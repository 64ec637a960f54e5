import pytest
import torch
from torch import nn

from mmkernels.nn import ScaleBiasLinear


def _base(bias, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(24, 40, bias=bias)


@pytest.mark.parametrize("form", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
def test_starts_as_the_base_layer_and_matches_the_formula(form, bias):
    base = _base(bias)
    x = torch.randn(3, 5, 24)
    expected_base = base(x)
    layer = ScaleBiasLinear(base, form)
    torch.testing.assert_close(layer(x), expected_base)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.bias.normal_()
    w, b0 = base.weight.double(), (base.bias.double() if bias else torch.zeros(40, dtype=torch.float64))
    s, b, xd = layer.scale.double(), layer.bias.double(), x.double()
    if form == "output":
        expected = s * (xd @ w.T + b0 + b)
    else:
        expected = (xd * s) @ w.T + b0 + b
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
def test_merge_is_exact_in_float64(form, bias):
    layer = ScaleBiasLinear(_base(bias).double(), form)
    layer.scale.data, layer.bias.data = layer.scale.data.double(), layer.bias.data.double()
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(7, 24, dtype=torch.float64)
    merged = layer.merge()
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-12, atol=1e-12)


def test_only_scale_and_bias_train():
    layer = ScaleBiasLinear(_base(True), "output")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"scale", "bias"}
    x = torch.randn(4, 24)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.scale.grad is not None and layer.bias.grad is not None


def test_bad_input():
    with pytest.raises(ValueError, match="form: expected one of"):
        ScaleBiasLinear(_base(False), "both")
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        ScaleBiasLinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"x: expected last dim 24"):
        ScaleBiasLinear(_base(False))(torch.randn(2, 23))


def _formula(layer, x):
    """The layer's function written out in float64 with autograd (s, b as leaves)."""
    w = layer.weight.double()
    b0 = layer.base_bias.double() if layer.base_bias is not None else 0.0
    s = layer.scale.detach().double().requires_grad_(layer.scale.requires_grad)
    b = layer.bias.detach().double().requires_grad_()
    if layer.form == "output":
        y = s * (x @ w.T + b0 + b)
    else:
        y = (x * s) @ w.T + b0 + b
    return y, s, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["output", "input"])
def test_gradients_match_the_formula(form, dtype):
    """dx, ds and db against the float64 formula: within 3x the error of the plain-PyTorch layer in the same
    dtype (autograd of the float32 epilogue, as the layer computed it before saving only x's dtype)."""
    from _tolerance import assert_close_to_reference

    layer = ScaleBiasLinear(_base(True, seed=1).to(dtype), form)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(3, 17, 24, dtype=dtype)
    dy = torch.randn(3, 17, 40, dtype=dtype)

    def grads_of(fn, xin, params):
        xin = xin.detach().requires_grad_()
        out = fn(xin)
        out.backward(dy.to(out.dtype))
        return [xin.grad] + [p.grad for p in params]

    got = grads_of(layer, x, [layer.scale, layer.bias])
    xd = x.double().requires_grad_()
    y64, s64, b64 = _formula(layer, xd)
    y64.backward(dy.double())
    high = [xd.grad, s64.grad, b64.grad]

    def plain(xin):  # the epilogue left to autograd, in float32 around the GEMM in dtype
        acc = torch.float32
        if form == "output":
            return ((nn.functional.linear(xin, layer.weight).to(acc) + layer.bias + layer.base_bias.float())
                    * layer.scale).to(dtype)
        y = nn.functional.linear((xin.to(acc) * layer.scale).to(dtype), layer.weight)
        return (y.to(acc) + layer.bias + layer.base_bias.float()).to(dtype)

    layer.scale.grad = layer.bias.grad = None
    low = grads_of(plain, x, [layer.scale, layer.bias])
    for name, g, lo, hi in zip(("dx", "dscale", "dbias"), got, low, high):
        assert g.dtype == lo.dtype, name
        assert_close_to_reference(g, lo, hi, name, floor=1e-6)


@pytest.mark.parametrize("form", ["output", "input"])
def test_a_frozen_scale_saves_nothing_and_its_gradients_still_flow(form):
    layer = ScaleBiasLinear(_base(True), form)
    layer.scale.requires_grad_(False)
    x = torch.randn(5, 24, requires_grad=True)
    saved = _saved(lambda: layer(x), {*layer.parameters(), *layer.buffers()})
    assert saved == []
    layer(x).square().sum().backward()
    assert x.grad is not None and layer.bias.grad is not None and layer.scale.grad is None


def _saved(fn, params):
    """The tensors fn's autograd graph saves, other than `params` (by storage, each once)."""
    params = {p.untyped_storage().data_ptr() for p in params}
    out = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            out.setdefault(ptr, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return [t for t in out.values() if t.numel() > 40]  # leave out the (40,) scale and bias-sized vectors


def test_saves_one_tensor_in_the_input_dtype():
    """The output form saves W x (bf16, as the GEMM wrote it); the input form saves x, and three layers
    reading one x (q, k, v) save it once. Neither keeps a float32 copy of a (tokens x features) tensor."""
    x = torch.randn(6, 24, dtype=torch.bfloat16, requires_grad=True)
    out_layer = ScaleBiasLinear(_base(False).to(torch.bfloat16), "output")
    saved = _saved(lambda: out_layer(x), {*out_layer.parameters()})
    assert [(t.shape, t.dtype) for t in saved] == [(torch.Size([6, 40]), torch.bfloat16)]
    layers = [ScaleBiasLinear(_base(False, seed=i).to(torch.bfloat16), "input") for i in range(3)]
    params = {p for layer in layers for p in layer.parameters()}
    saved = _saved(lambda: [layer(x) for layer in layers], params)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def _mlp_pair(dtype=torch.float32):
    gate = ScaleBiasLinear(_base(True, seed=3).to(dtype), "output")
    up = ScaleBiasLinear(_base(False, seed=4).to(dtype), "output")
    with torch.no_grad():
        for layer in (gate, up):
            layer.scale.uniform_(0.5, 1.5)
            layer.bias.normal_()
    return gate, up


def test_fused_swiglu_is_swiglu_of_the_two_layers():
    """Output and every gradient equal the unfused composition (float64: no rounding between the two)."""
    from mmkernels import ops

    gate, up = _mlp_pair(torch.float64)
    for layer in (gate, up):
        layer.scale.data, layer.bias.data = layer.scale.data.double(), layer.bias.data.double()
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(3, 7, 40, dtype=torch.float64)
    results = []
    for fn in (lambda: ScaleBiasLinear.fused_swiglu(gate, up, x), lambda: ops.swiglu(gate(x), up(x))):
        for t in (x, gate.scale, gate.bias, up.scale, up.bias):
            t.grad = None
        out = fn()
        out.backward(dy)
        results.append([out] + [t.grad.clone() for t in (x, gate.scale, gate.bias, up.scale, up.bias)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_llama_mlp_fuses_v2_scales_and_saves_two_tensors_less():
    """models.llama.MLP takes the fused path when gate_proj and up_proj are output-form ScaleBiasLinears:
    the same output (bf16 here: within the rounding the unfused path adds), and of the (tokens x 40) tensors
    it saves only the two GEMM outputs where the unfused composition saves four."""
    from mmkernels import ops
    from mmkernels.models.llama import MLP

    mlp = MLP.__new__(MLP)
    nn.Module.__init__(mlp)
    mlp.gate_proj, mlp.up_proj = _mlp_pair(torch.bfloat16)
    mlp.down_proj = nn.Linear(40, 24, bias=False).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(6, 24, dtype=torch.bfloat16, requires_grad=True)
    params = set(mlp.parameters())
    fused = _saved(lambda: mlp(x), params)
    unfused = _saved(lambda: mlp.down_proj(ops.swiglu(mlp.gate_proj(x), mlp.up_proj(x))), params)
    assert sorted(t.shape for t in fused) == [(6, 40)] * 2 and all(t.dtype == torch.bfloat16 for t in fused)
    assert sorted(t.shape for t in unfused) == [(6, 40)] * 4
    with torch.no_grad():
        want = mlp.down_proj(ops.swiglu(mlp.gate_proj(x), mlp.up_proj(x))).float()
        got = mlp(x).float()
    assert (got - want).abs().max() <= 0.02 * want.abs().max()


def test_fused_swiglu_bad_input():
    gate, up = _mlp_pair()
    with pytest.raises(ValueError, match="up: expected an output-form ScaleBiasLinear"):
        ScaleBiasLinear.fused_swiglu(gate, ScaleBiasLinear(_base(False), "input"), torch.randn(2, 24))
    with pytest.raises(ValueError, match=r"x: expected last dim 24"):
        ScaleBiasLinear.fused_swiglu(gate, up, torch.randn(2, 23))


# -- ops.scale_bias: the output form's epilogue -----------------------------------------------------------------
SCALE_BIAS_SHAPES = [(5,), (3, 37), (2, 5, 64), (70, 33), (0, 9), (4, 0)]


def _epilogue_inputs(shape, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    y = (2 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
    scale = (0.5 + torch.rand(n, generator=gen)).to(device).requires_grad_()
    bias = (0.3 * torch.randn(n, generator=gen)).to(device).requires_grad_()
    return y, scale, bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SCALE_BIAS_SHAPES)
def test_scale_bias_triton_matches_reference(device, shape, dtype):
    import math

    from _harness import check_against_reference
    from mmkernels import ops

    rows = max(1, math.prod(shape[:-1]))
    check_against_reference(ops.scale_bias, list(_epilogue_inputs(shape, device)), backend="triton", dtype=dtype,
                            name=f"scale_bias{shape}", reduced={1: rows, 2: rows})


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
def test_scale_bias_with_float32_vectors_and_half_activations(device, backend_name, out_dtype):
    """float32 master scale and bias beside a float16 GEMM output (the trainer's case), the result in y's dtype
    or another: output and gradients against float64, within 3x the error of the same math run with every input
    rounded to float16."""
    import mmkernels
    from _tolerance import FLOORS, assert_close_to_reference
    from mmkernels import ops

    y, scale, bias = _epilogue_inputs((70, 33), device, seed=1)
    dout = torch.linspace(-1, 1, 70 * 33, device=device).view(70, 33)

    def run(yy, s, b, backend, out):
        leaves = [t.detach().requires_grad_() for t in (yy, s, b)]
        with mmkernels.use_backend(backend):
            res = ops.scale_bias(*leaves, out_dtype=out)
        res.backward(dout.to(res.dtype))
        return [res, *(t.grad for t in leaves)]

    got = run(y.half(), scale, bias, backend_name, out_dtype)
    low = run(y.half(), scale.half(), bias.half(), "reference", out_dtype)
    high = run(y.double(), scale.double(), bias.double(), "reference", None)
    assert [t.dtype for t in got] == [out_dtype or torch.float16, torch.float16, torch.float32, torch.float32]
    for i, (a, lo, hi) in enumerate(zip(got, low, high)):
        floor = FLOORS[torch.float16] * (70 ** 0.5 if i >= 2 else 1.0)
        assert_close_to_reference(a.float(), lo.float(), hi, f"output/grad {i}", floor=floor)


@pytest.mark.parametrize("form", ["output", "input"])
def test_the_layer_on_the_triton_backend(device, form):
    """The layer with its epilogue on the triton kernels (the interpreter here) against the float64 formula."""
    import mmkernels

    layer = ScaleBiasLinear(_base(True, seed=2).to(device), form)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(4, 6, 24, device=device, requires_grad=True)
    with mmkernels.use_backend("triton"):
        out = layer(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    xd = x.detach().double().requires_grad_()
    y64, s64, b64 = _formula(layer, xd)
    y64.backward(dy.double())
    for name, got, want in (("out", out, y64), ("dx", x.grad, xd.grad), ("dscale", layer.scale.grad, s64.grad),
                            ("dbias", layer.bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=name)


def test_scale_bias_bad_input():
    from mmkernels import ops

    y, scale, bias = _epilogue_inputs((3, 8), "cpu")
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\), got \(7,\)"):
        ops.scale_bias(y, scale, bias[:7])
    with pytest.raises(ValueError, match=r"scale: expected 1 dimensions, got 2"):
        ops.scale_bias(y, scale[None], bias)
    with pytest.raises(TypeError, match=r"out_dtype: expected a float dtype, got torch.int32"):
        ops.scale_bias(y, scale, bias, out_dtype=torch.int32)
