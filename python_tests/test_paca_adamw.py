"""The fused PaCA optimizer step (ops.paca_adamw_sync, nn.PaCAAdamW) against torch.optim.AdamW + a column sync.

torch.optim.AdamW(foreach=False) on a copy of each delta, followed by reference.paca.sync_columns, is the
oracle. The reference backend runs torch's own operations and must agree bit for bit. The kernels run the
same operation sequence in fp32 except that their square root is correctly rounded (torch's CPU sqrt can
be 1 ulp off), so their exp_avg is bit-exact, exp_avg_sq within an ulp, delta within a few ulps of the
update, and the weight columns are the rounding of orig + s * (their own delta), bit for bit.
"""

import copy
import importlib
import math

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels import ops
from mmkernels.nn import PaCAAdamW, PaCALinear
from mmkernels.reference import paca as ref_paca

adamw_ops = importlib.import_module("mmkernels.ops.paca_adamw")
kernels = importlib.import_module("mmkernels.kernels.paca_adamw")

F32_EPS = torch.finfo(torch.float32).eps

# (d_out, r): d_out 1 and 37, r 1, 5, 17 (non-multiples of every block size), and one full tile
SHAPES = [(1, 1), (1, 5), (1, 17), (37, 1), (37, 5), (37, 17), (64, 16)]


def _layer(d_out, r, dtype, device, seed, scaling=0.5, name="proj"):
    """A PaCALinear over a random base weight in `dtype`, with a random (non-zero) delta already synced."""
    gen = torch.Generator().manual_seed(seed)
    d_in = r + 11
    base = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d_in, generator=gen))
    layer = PaCALinear(base.to(device, dtype), r, scaling=scaling, seed=seed, name=name)
    with torch.no_grad():
        layer.delta.copy_(torch.randn(d_out, r, generator=gen) * 0.1)
    layer.sync_()
    return layer


def _ordered(t):
    """Float bits mapped to integers that are ordered like the floats (ulp distance = integer distance)."""
    ity = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[t.dtype]
    bits = t.contiguous().view(ity).to(torch.int64)
    lowest = -(1 << (8 * t.element_size() - 1))
    return torch.where(bits < 0, lowest - bits, bits)


def _max_ulps(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    return int((_ordered(a) - _ordered(b)).abs().max()) if a.numel() else 0


def _run_pair(layers, steps, backend_name, lr, betas, weight_decay, grad_mask=None, seed=0):
    """`steps` steps of PaCAAdamW over `layers` (with `backend_name` forced) and of torch AdamW over copies of
    their deltas, on the same gradients. Returns (PaCAAdamW, torch's deltas, torch's AdamW, the weights synced
    from torch's deltas)."""
    deltas = [nn.Parameter(layer.delta.detach().clone()) for layer in layers]
    opt = PaCAAdamW(layers, lr=lr, betas=betas, weight_decay=weight_decay)
    torch_opt = torch.optim.AdamW(deltas, lr=lr, betas=betas, weight_decay=weight_decay, foreach=False)
    gen = torch.Generator().manual_seed(seed)
    with mmkernels.use_backend(backend_name):
        for k in range(steps):
            for i, (layer, d) in enumerate(zip(layers, deltas)):
                g = torch.randn(d.shape, generator=gen).to(d.device)
                has_grad = grad_mask is None or grad_mask[k][i]
                layer.delta.grad = g.clone() if has_grad else None
                d.grad = g.clone() if has_grad else None
            opt.step()
            torch_opt.step()
    weights = []
    for layer, d in zip(layers, deltas):
        w = layer.weight.detach().clone()
        ref_paca.sync_columns(w, layer.orig_cols, d.detach(), layer.idx, layer.scaling)
        weights.append(w)
    return opt, deltas, torch_opt, weights


def _rest(layer):
    keep = torch.ones(layer.in_features, dtype=torch.bool, device=layer.idx.device)
    keep[layer.idx] = False
    return keep


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{r}" for n, r in SHAPES])
def test_matches_torch_adamw_and_sync(device, backend_name, wdtype, shape):
    d_out, r = shape
    lr, betas, wd, steps = 1e-2, (0.9, 0.999), 0.05, 3
    layers = [_layer(d_out, r, wdtype, device, seed=1), _layer(7, 3, wdtype, device, seed=2, name="other")]
    w0 = [layer.weight.detach().clone() for layer in layers]
    opt, deltas, torch_opt, weights = _run_pair(layers, steps, backend_name, lr, betas, wd)
    for layer, d, w, before in zip(layers, deltas, weights, w0):
        state, torch_state = opt.state[layer.delta], torch_opt.state[d]
        assert sorted(state) == sorted(torch_state) == ["exp_avg", "exp_avg_sq", "step"]
        assert torch.equal(state["step"], torch_state["step"]) and state["step"].item() == steps
        rest = _rest(layer)
        assert torch.equal(layer.weight[:, rest], before[:, rest])  # the other columns are untouched, bit for bit
        if backend_name == "reference":  # torch's own operations: identical
            assert torch.equal(layer.delta, d)
            assert torch.equal(state["exp_avg"], torch_state["exp_avg"])
            assert torch.equal(state["exp_avg_sq"], torch_state["exp_avg_sq"])
            assert torch.equal(layer.weight, w)
            continue
        # lerp: the same fma as torch's CPU kernel (its CUDA kernel leaves the contraction to nvcc)
        assert _max_ulps(state["exp_avg"], torch_state["exp_avg"]) <= (0 if device.type == "cpu" else 1)
        assert _max_ulps(state["exp_avg_sq"], torch_state["exp_avg_sq"]) <= 1
        # delta: 1e-6 relative, and an absolute floor of a few ulps of the per-step update (<= ~lr) per step,
        # for elements where successive updates cancel
        torch.testing.assert_close(layer.delta, d.detach(), rtol=1e-6, atol=steps * 4 * F32_EPS * lr)
        # the weight columns are exactly orig + s * delta rounded once, from the kernel's own delta ...
        mine = ref_paca.synced_columns(layer.orig_cols, layer.delta.detach(), layer.scaling, wdtype)
        assert torch.equal(layer.weight[:, layer.idx], mine)
        # ... and therefore the rounding of (nearly) the same fp32 value as torch's: fp16 exact or 1 ulp
        if wdtype == torch.float16:
            assert _max_ulps(layer.weight, w) <= 1
        else:
            torch.testing.assert_close(layer.weight, w, rtol=1e-6, atol=steps * 4 * F32_EPS * lr * layer.scaling)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("betas,weight_decay", [((0.9, 0.999), 0.0), ((0.3, 0.95), 0.2), ((0.0, 0.5), 0.01)])
def test_hyperparameters(device, backend_name, betas, weight_decay):
    """No decay; beta1 < 0.5 (torch's lerp then starts from the gradient); beta1 = 0."""
    layers = [_layer(37, 5, torch.float32, device, seed=3)]
    opt, deltas, torch_opt, weights = _run_pair(layers, 3, backend_name, 3e-3, betas, weight_decay)
    tol = dict(rtol=0, atol=0) if backend_name == "reference" else dict(rtol=1e-6, atol=12 * F32_EPS * 3e-3)
    torch.testing.assert_close(layers[0].delta, deltas[0].detach(), **tol)
    exact = backend_name == "reference" or device.type == "cpu"
    m, torch_m = opt.state[layers[0].delta]["exp_avg"], torch_opt.state[deltas[0]]["exp_avg"]
    assert _max_ulps(m, torch_m) <= (0 if exact else 1)
    torch.testing.assert_close(layers[0].weight, weights[0], **tol)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
# beta1 = 0.5: lerp weight exactly 0.5, the boundary of torch's two lerp formulas (weight < 0.5 or not)
@pytest.mark.parametrize("beta1", [0.9, 0.2, 0.5])
def test_kernel_is_torch_order_with_ieee_sqrt(device, wdtype, idx_dtype, beta1):
    """The kernel against torch operations in AdamW's order, with a correctly rounded sqrt: bit for bit.
    Strided delta, grad and states, and a weight stored transposed."""
    gen = torch.Generator().manual_seed(4)
    d_out, d_in, r = 37, 40, 17
    weight = torch.randn(d_in, d_out, generator=gen).to(device, wdtype).t()  # strides (1, d_out)
    idx = ref_paca.select_columns(d_in, r, 4).to(device)
    orig = torch.randn(d_out, r, generator=gen).to(device, wdtype)

    def strided(scale=1.0):
        return (torch.randn(r, d_out, generator=gen) * scale).to(device).t()

    delta, grad, m, v = strided(0.1), strided(), strided(0.1), strided(0.01).abs()
    m0, v0, delta0, w0 = m.clone(), v.clone(), delta.clone(), weight.clone()
    step, lr, beta2, eps, wd, s = 5.0, 2e-3, 0.99, 1e-6, 0.1, 0.75
    kernels.adamw_sync(weight, orig, idx.to(idx_dtype), s, delta, grad, m, v, step, lr, beta1, beta2, eps, wd)

    # The oracle runs on the CPU, where torch divides by a scalar exactly (its CUDA kernel multiplies by the
    # reciprocal). Whether torch fuses the multiply-adds of lerp / addcmul depends on its kernel: 1 ulp.
    cpu = lambda t: t.cpu().clone()  # noqa: E731
    exp_m = cpu(m0).lerp_(cpu(grad), 1 - beta1)
    assert _max_ulps(cpu(m), exp_m) <= (0 if device.type == "cpu" else 1)
    exp_v = cpu(v0).mul_(beta2).addcmul_(cpu(grad), cpu(grad), value=1 - beta2)
    assert _max_ulps(cpu(v), exp_v) <= 1
    # the rest of the step from the kernel's own m and v: no fused operation left to differ
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    denom = (cpu(v).double().sqrt().float() / bc2**0.5).add_(eps)
    exp_delta = cpu(delta0).mul_(1 - lr * wd).addcdiv_(cpu(m), denom, value=-(lr / bc1))
    assert torch.equal(cpu(delta), exp_delta)
    exp_w = cpu(w0)
    ref_paca.sync_columns(exp_w, cpu(orig), exp_delta, cpu(idx), s)
    assert torch.equal(cpu(weight), exp_w)


def test_grad_none_is_skipped(device):
    layers = [_layer(37, 5, torch.float16, device, seed=5), _layer(1, 17, torch.float16, device, seed=6)]
    grad_mask = [[True, False], [True, False], [True, True]]
    before_w, before_d = layers[1].weight.detach().clone(), layers[1].delta.detach().clone()
    opt = PaCAAdamW(layers, lr=1e-2)
    layers[0].delta.grad = torch.ones_like(layers[0].delta)
    with mmkernels.use_backend("triton"):
        opt.step()
    assert len(opt.state[layers[1].delta]) == 0  # no state made for a delta without a gradient
    assert torch.equal(layers[1].weight, before_w) and torch.equal(layers[1].delta, before_d)
    assert not torch.equal(layers[0].delta, _layer(37, 5, torch.float16, device, seed=5).delta)

    fresh = [_layer(37, 5, torch.float16, device, seed=5), _layer(1, 17, torch.float16, device, seed=6)]
    opt, deltas, torch_opt, weights = _run_pair(fresh, 3, "reference", 1e-2, (0.9, 0.999), 0.01, grad_mask)
    assert opt.state[fresh[1].delta]["step"].item() == 1 and opt.state[fresh[0].delta]["step"].item() == 3
    for layer, d, w in zip(fresh, deltas, weights):
        assert torch.equal(layer.delta, d) and torch.equal(layer.weight, w)


def test_training_loop_needs_no_sync(device):
    """Forward, backward, step: the next forward already sees W_eff = W + s * scatter(delta)."""
    torch.manual_seed(0)
    base = nn.Linear(48, 24).to(device)
    w_orig = base.weight.detach().clone()
    layer = PaCALinear(base, 5, scaling=2.0, name="q_proj")
    twin = copy.deepcopy(layer)
    opt = PaCAAdamW([layer], lr=1e-2, weight_decay=0.1)
    twin_opt = torch.optim.AdamW([twin.delta], lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(3, 48, device=device)
    with mmkernels.use_backend("reference"):
        for _ in range(3):
            for mod, o in ((layer, opt), (twin, twin_opt)):
                o.zero_grad()
                (mod(x) ** 2).sum().backward()
                o.step()
            twin.sync_()
            torch.testing.assert_close(layer.delta, twin.delta, rtol=0, atol=0)
            torch.testing.assert_close(layer.weight, twin.weight, rtol=0, atol=0)
        expected = torch.nn.functional.linear(x, ref_paca.scatter_delta(w_orig, layer.delta, layer.idx, 2.0),
                                              base.bias)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_step_between_forward_and_backward_is_an_error():
    layer = PaCALinear(nn.Linear(16, 8), 3)
    opt = PaCAAdamW([layer])
    y = layer(torch.randn(2, 16, requires_grad=True)).sum()
    layer.delta.grad = torch.ones_like(layer.delta)
    opt.step()  # rewrites the weight that the forward saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_state_dict_moves_to_and_from_torch_adamw():
    torch.manual_seed(0)
    layers = [PaCALinear(nn.Linear(20, 9), 4, name="a"), PaCALinear(nn.Linear(20, 9), 2, name="b")]
    opt = PaCAAdamW(layers, lr=5e-3, betas=(0.8, 0.99), weight_decay=0.02)
    for _ in range(2):
        for layer in layers:
            layer.delta.grad = torch.randn_like(layer.delta)
        opt.step()
    sd = opt.state_dict()
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].device.type == "cpu"

    twins = copy.deepcopy(layers)
    torch_opt = torch.optim.AdamW([t.delta for t in twins], lr=1.0, foreach=False)
    torch_opt.load_state_dict(copy.deepcopy(sd))  # as if saved and loaded: no tensors shared
    resumed_layers = copy.deepcopy(layers)
    resumed = PaCAAdamW(resumed_layers)
    resumed.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # and back
    assert resumed.param_groups[0]["lr"] == 5e-3 and tuple(resumed.param_groups[0]["betas"]) == (0.8, 0.99)
    gen = torch.Generator().manual_seed(1)
    with mmkernels.use_backend("reference"):
        for _ in range(2):
            for a, b, c in zip(layers, twins, resumed_layers):
                g = torch.randn(a.delta.shape, generator=gen)
                a.delta.grad, b.delta.grad, c.delta.grad = g.clone(), g.clone(), g.clone()
            opt.step()
            torch_opt.step()
            resumed.step()
    for a, b, c in zip(layers, twins, resumed_layers):
        assert torch.equal(a.delta, b.delta) and torch.equal(a.delta, c.delta)
        assert torch.equal(a.weight, c.weight)
        assert torch.equal(opt.state[a.delta]["exp_avg_sq"], torch_opt.state[b.delta]["exp_avg_sq"])


def test_float64_runs_the_reference(device):
    layer = _layer(9, 3, torch.float64, device, seed=7)
    w_before = layer.weight.detach().clone()
    d = layer.delta.detach().double().clone()
    m, v, g = torch.zeros_like(d), torch.zeros_like(d), torch.randn_like(d)
    twin = nn.Parameter(d.clone())
    twin.grad = g.clone()
    torch.optim.AdamW([twin], lr=1e-2, foreach=False).step()
    ops.paca_adamw_sync(layer.weight, layer.orig_cols, layer.idx, layer.scaling, d, g, m, v, 1, 1e-2)
    assert torch.equal(d, twin.detach())
    expected = w_before.clone()
    ref_paca.sync_columns(expected, layer.orig_cols, d, layer.idx, layer.scaling)
    assert torch.equal(layer.weight, expected)
    forced = r"backend 'triton' was forced .* weight: expected dtype in .* for the triton kernel, got torch.float64"
    with mmkernels.use_backend("triton"), pytest.raises(ValueError, match=forced):
        ops.paca_adamw_sync(layer.weight, layer.orig_cols, layer.idx, 1.0, d, g, m, v, 2, 1e-2)


def _args(d_out=24, d_in=48, r=5, device="cpu"):
    w = torch.randn(d_out, d_in, device=device)
    idx = ref_paca.select_columns(d_in, r, 0).to(device)
    f = [torch.zeros(d_out, r, device=device) for _ in range(4)]
    return dict(weight=w, orig_cols=w[:, idx].clone(), idx=idx, scaling=1.0, delta=f[0], grad=f[1], exp_avg=f[2],
                exp_avg_sq=f[3], step=1, lr=1e-3)


@pytest.mark.parametrize("change,error,match", [
    (dict(delta=torch.zeros(24, 4)), ValueError, r"delta: expected shape \(24, 5\), got \(24, 4\)"),
    (dict(grad=torch.zeros(5, 24)), ValueError, r"grad: expected shape \(24, 5\), got \(5, 24\)"),
    (dict(exp_avg=torch.zeros(24, 5, 1)), ValueError, "exp_avg: expected 2 dimensions, got 3"),
    (dict(exp_avg_sq=torch.zeros(24, 5, dtype=torch.float64)), TypeError,
     "exp_avg_sq: expected dtype torch.float32 \\(the dtype of delta\\), got torch.float64"),
    (dict(delta=torch.zeros(24, 5, dtype=torch.float16)), TypeError,
     "delta: expected dtype torch.float32 \\(or torch.float64\\), got torch.float16"),
    (dict(orig_cols=torch.zeros(24, 5, dtype=torch.float16)), TypeError,
     "orig_cols: expected dtype torch.float32 \\(the dtype of weight\\), got torch.float16"),
    (dict(orig_cols=torch.zeros(24, 6)), ValueError, r"orig_cols: expected shape \(24, 5\), got \(24, 6\)"),
    (dict(idx=torch.tensor([0, 3, 3, 7, 9])), ValueError, "idx: expected strictly increasing column indices"),
    (dict(idx=torch.tensor([0, 3, 4, 7, 48])), ValueError, r"idx: expected column indices in \[0, 48\)"),
    (dict(idx=torch.arange(5.0)), TypeError, r"idx: expected dtype in \(torch.int64, torch.int32\)"),
    (dict(grad=torch.zeros(24, 5, device="meta")), ValueError, "grad: expected device cpu \\(the device of weight\\)"),
    (dict(scaling="1"), TypeError, "scaling: expected a number, got str"),
    (dict(step=0), ValueError, "step: expected a positive integer count"),
    (dict(step=1.5), ValueError, "step: expected a positive integer count"),
    (dict(step=torch.zeros(2)), TypeError, "step: expected a number, got Tensor"),
    (dict(lr=-1e-3), ValueError, "lr: expected a number >= 0, got -0.001"),
    (dict(lr=float("nan")), ValueError, "lr: expected a finite number"),
    (dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\]: expected a number in \[0, 1\), got 1.0"),
    (dict(betas=0.9), TypeError, r"betas: expected a pair \(beta1, beta2\), got 0.9"),
    (dict(eps=-1.0), ValueError, "eps: expected a number >= 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay: expected a number >= 0"),
])
def test_bad_input(change, error, match):
    args = _args()
    args.update(change)
    with pytest.raises(error, match=match):
        ops.paca_adamw_sync(**args)


def test_bad_optimizer_arguments():
    layer = PaCALinear(nn.Linear(8, 4), 2)
    with pytest.raises(TypeError, match="modules\\[1\\]: expected a PaCALinear, got Linear"):
        PaCAAdamW([layer, nn.Linear(8, 4)])
    with pytest.raises(ValueError, match="modules: expected at least one PaCALinear, got none"):
        PaCAAdamW([])
    with pytest.raises(ValueError, match="modules: the PaCALinear '' is listed twice"):
        PaCAAdamW([layer, layer])
    with pytest.raises(ValueError, match="lr: expected a number >= 0, got -1.0"):
        PaCAAdamW([layer], lr=-1.0)
    with pytest.raises(TypeError, match="lr: expected a number, got Tensor"):
        PaCAAdamW([layer], lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match=r"betas\[0\]: expected a number in \[0, 1\), got 1.5"):
        PaCAAdamW([layer], betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="weight_decay: expected a number >= 0"):
        PaCAAdamW([layer], weight_decay=-1)
    opt = PaCAAdamW(layer)  # one module alone is accepted
    with pytest.raises(ValueError, match="PaCAAdamW takes the delta of a PaCALinear given to its constructor"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    layer.delta = nn.Parameter(torch.zeros(4, 2))
    layer.delta.grad = torch.ones(4, 2)
    opt.param_groups[0]["params"][0].grad = torch.ones(4, 2)
    with pytest.raises(RuntimeError, match="its delta is no longer the tensor this optimizer was built with"):
        opt.step()


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_opcheck(device, impl):
    a = _args(d_out=9, d_in=20, r=3, device=device)
    for k in ("delta", "grad", "exp_avg"):
        a[k] = torch.randn(9, 3, device=device)
    a["exp_avg_sq"] = torch.rand(9, 3, device=device)
    torch.library.opcheck(adamw_ops.paca_adamw_sync_op,
                          (a["weight"], a["orig_cols"], a["idx"], 0.5, a["delta"], a["grad"], a["exp_avg"],
                           a["exp_avg_sq"], 3.0, 1e-3, 0.9, 0.999, 1e-8, 0.01, impl))


def test_compile_fullgraph_matches_eager():
    def run(args):
        ops.paca_adamw_sync(args["weight"], args["orig_cols"], args["idx"], 0.5, args["delta"], args["grad"],
                            args["exp_avg"], args["exp_avg_sq"], 2.0, 1e-2, (0.9, 0.999), 1e-8, 0.1)

    eager = _args()
    eager["grad"] = torch.randn(24, 5)
    compiled = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in eager.items()}
    with mmkernels.use_backend("reference"):
        run(eager)
        torch.compile(run, fullgraph=True, backend="aot_eager")(compiled)
    for k in ("weight", "delta", "exp_avg", "exp_avg_sq"):
        assert torch.equal(compiled[k], eager[k]), k


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (37, 5), (37, 17), (4096, 64), (1024, 16)])
def test_cuda_backend(csrc_device, wdtype, shape):
    """csrc/paca_adamw.cu: the same operation sequence as the Triton kernel (IEEE div and sqrt, the same fmas,
    the same host coefficients), so the two agree bit for bit; against torch's CUDA AdamW within ulps
    (torch divides by the scalar bias correction through its reciprocal). d_out * r a multiple of 4 takes the
    128-bit path, the others the scalar one."""
    d_out, r = shape
    results = {}
    for name in ("cuda", "triton", "torch"):
        layers = [_layer(d_out, r, wdtype, csrc_device, seed=8)]
        w0 = layers[0].weight.detach().clone()
        if name == "torch":
            _, deltas, torch_opt, weights = _run_pair(layers, 3, "reference", 1e-2, (0.9, 0.999), 0.05)
            results[name] = (deltas[0].detach(), torch_opt.state[deltas[0]]["exp_avg_sq"], weights[0])
            continue
        opt, *_ = _run_pair(layers, 3, name, 1e-2, (0.9, 0.999), 0.05)
        rest = _rest(layers[0])
        assert torch.equal(layers[0].weight[:, rest], w0[:, rest])
        results[name] = (layers[0].delta.detach(), opt.state[layers[0].delta]["exp_avg_sq"], layers[0].weight)
    for a, b in zip(results["cuda"], results["triton"]):
        assert torch.equal(a, b)
    d, v, w = results["cuda"]
    td, tv, tw = results["torch"]
    torch.testing.assert_close(d, td, rtol=1e-6, atol=12 * F32_EPS * 1e-2)
    assert _max_ulps(v, tv) <= 2
    if wdtype == torch.float32:
        torch.testing.assert_close(w, tw, rtol=1e-6, atol=12 * F32_EPS * 1e-2 * 0.5)
    else:
        assert _max_ulps(w, tw) <= 1


def test_cuda_strided_weight_and_errors(csrc_device):
    a = _args(d_out=37, d_in=40, r=5, device=csrc_device)
    a["grad"] = torch.randn(37, 5, device=csrc_device)
    w_t = a["weight"].t().contiguous().t()  # column-major weight
    b = dict(a, weight=w_t, delta=a["delta"].clone(), exp_avg=a["exp_avg"].clone(), exp_avg_sq=a["exp_avg_sq"].clone())
    with mmkernels.use_backend("cuda"):
        ops.paca_adamw_sync(**a)
        ops.paca_adamw_sync(**b)
    assert torch.equal(a["weight"], b["weight"]) and torch.equal(a["delta"], b["delta"])

    op = torch.ops.mmkernels_C.paca_adamw_sync
    w, o, i, d = a["weight"], a["orig_cols"], a["idx"], a["delta"]
    g, m, v = a["grad"], a["exp_avg"], a["exp_avg_sq"]
    h = (1.0, 0.9, 0.999, 1e-8, 0.0)
    with pytest.raises(RuntimeError, match="delta: expected dtype float32, got Half"):
        op(w, o, i, 1.0, d.half(), g, m, v, 1.0, *h)
    with pytest.raises(RuntimeError, match=r"grad: expected shape \(37, 5\), got \[37, 4\]"):
        op(w, o, i, 1.0, d, g[:, :4], m, v, 1.0, *h)
    with pytest.raises(RuntimeError, match="exp_avg: expected a contiguous tensor"):
        op(w, o, i, 1.0, d, g, torch.zeros(5, 37, device=csrc_device).t(), v, 1.0, *h)
    if csrc_device.type == "cuda":
        with pytest.raises(RuntimeError, match="exp_avg_sq: expected device cuda:0 \\(that of weight\\), got cpu"):
            op(w, o, i, 1.0, d, g, m, v.cpu(), 1.0, *h)
    with pytest.raises(RuntimeError, match="idx: expected dtype int64, got Int"):
        op(w, o, i.int(), 1.0, d, g, m, v, 1.0, *h)
    with pytest.raises(RuntimeError, match=r"orig_cols: expected dtype Float \(that of weight\), got Half"):
        op(w, o.half(), i, 1.0, d, g, m, v, 1.0, *h)
    with pytest.raises(RuntimeError, match="step: expected a count >= 1"):
        op(w, o, i, 1.0, d, g, m, v, 0.0, *h)
    # a non-contiguous state: the automatic choice moves to Triton, a forced cuda backend refuses
    m_t = torch.zeros(5, 37, device=csrc_device).t()
    ops.paca_adamw_sync(**dict(a, exp_avg=m_t))
    with mmkernels.use_backend("cuda"), pytest.raises(ValueError, match="exp_avg: expected a contiguous tensor"):
        ops.paca_adamw_sync(**dict(a, exp_avg=m_t))


def test_update_magnitude_is_about_lr():
    """Sanity of the tolerance floor used above: one step moves each element by at most ~lr."""
    a = _args()
    a["grad"] = torch.randn(24, 5)
    ops.paca_adamw_sync(**a)
    assert float(a["delta"].abs().max()) <= 1e-3 * (1 + 1e-6) and math.isfinite(float(a["delta"].sum()))
