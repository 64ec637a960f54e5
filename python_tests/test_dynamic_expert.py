"""ops.dynamic_expert (kernels vs reference, forward and every gradient), its boundary checks and custom-op
registration, nn.HyperNetwork / nn.DynamicExpert, and the benchmark script's CPU smoke."""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels.nn.hypernetwork import DynamicExpert, HyperNetwork
from mmkernels.ops.dynamic_expert import ACTIVATIONS, MAX_BOTTLENECK, dynamic_expert
from mmkernels.reference import dynamic_expert as ref
from _harness import check_against_reference
from _tolerance import assert_close_to_reference

kernels = importlib.import_module("mmkernels.kernels.dynamic_expert")
op_mod = importlib.import_module("mmkernels.ops.dynamic_expert")
REPO = Path(__file__).resolve().parent.parent


def _problem(bsz, t, d_in, h, activation, device, d_out=None, residual=True, seed=0):
    """Inputs with different weights for every sample; weights scaled so hidden and y are O(1)."""
    d_out = d_in if d_out is None else d_out
    gen = torch.Generator().manual_seed(seed)
    cols = 2 * h if activation == "swiglu" else h
    x = torch.randn(bsz, t, d_in, generator=gen)
    w_down = torch.randn(bsz, d_in, cols, generator=gen) * (2.0 / math.sqrt(d_in))
    w_up = torch.randn(bsz, h, d_out, generator=gen) / math.sqrt(h)
    res = torch.randn(bsz, t, d_out, generator=gen) if residual else None
    to = lambda v: None if v is None else v.to(device).requires_grad_()  # noqa: E731
    return to(x), to(w_down), to(w_up), to(res)


# (B, T, d_in, d_out, h, residual): B=1 and B=3; T=1, 7, 70 (two row blocks, the last partial); odd d;
# d_out != d_in (the projector's expert); h=5 (below the 16-wide dot tile) and the default 16.
SHAPES = [
    (1, 1, 37, 37, 16, True),
    (3, 7, 50, 50, 5, False),
    (2, 70, 33, 45, 16, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(device, shape, activation, dtype):
    bsz, t, d_in, d_out, h, residual = shape
    x, w_down, w_up, res = _problem(bsz, t, d_in, h, activation, device, d_out, residual)
    inputs = [x, w_down, w_up] + ([res] if res is not None else [])

    def fn(x, w_down, w_up, res=None):
        return dynamic_expert(x, w_down, w_up, residual=res, activation=activation)

    # weight gradients sum over the T tokens of a sample
    check_against_reference(fn, inputs, backend="triton", dtype=dtype, name=f"dynamic_expert[{activation}]",
                            reduced={1: t, 2: t})


def test_weight_gradient_splits_are_deterministic_and_agree(device):
    """The weight kernel's token splits: several splits give the one-split result up to fp32 summation
    order, the same bits on every run, and both match the float64 reference."""
    x, w_down, w_up, _ = _problem(2, 70, 24, 16, "swiglu", device)
    dy = torch.randn(2, 70, 24, generator=torch.Generator().manual_seed(3)).to(device)
    args = (dy, x.detach(), w_down.detach(), w_up.detach(), "swiglu")
    one = kernels.dynamic_expert_bwd(*args, splits=1)
    many = kernels.dynamic_expert_bwd(*args, splits=3)
    again = kernels.dynamic_expert_bwd(*args, splits=3)
    high = ref.dynamic_expert_backward(*(a.double() if torch.is_tensor(a) else a for a in args))
    low = ref.dynamic_expert_backward(*args)
    for i, (a, b, c, hi, lo) in enumerate(zip(one, many, again, high, low)):
        assert torch.equal(b, c), f"gradient {i}: not deterministic"
        assert_close_to_reference(b, lo, hi, f"splits=3 grad {i}")
        assert_close_to_reference(a, lo, hi, f"splits=1 grad {i}")


def test_each_sample_uses_its_own_weights(device):
    """Sample b's output depends on weights b only: permuting the weights permutes the outputs."""
    x, w_down, w_up, res = _problem(3, 5, 24, 16, "gelu", device)
    x = x.detach()[:1].expand(3, -1, -1)  # the same tokens in every sample
    with mmkernels.use_backend("triton"):
        y = dynamic_expert(x, w_down.detach(), w_up.detach(), activation="gelu")
        perm = torch.tensor([2, 0, 1])
        y_perm = dynamic_expert(x, w_down.detach()[perm], w_up.detach()[perm], activation="gelu")
    assert not torch.allclose(y[0], y[1], atol=1e-3)
    torch.testing.assert_close(y_perm, y[perm])


def test_residual_gradient_is_dy_and_residual_is_optional(device):
    x, w_down, w_up, res = _problem(2, 3, 20, 16, "silu", device)
    dy = torch.randn(2, 3, 20).to(device)
    with mmkernels.use_backend("triton"):
        y = dynamic_expert(x, w_down, w_up, res, activation="silu")
        y0 = dynamic_expert(x, w_down, w_up, activation="silu")
    torch.testing.assert_close(y, y0 + res, rtol=1e-6, atol=1e-6)
    y.backward(dy)
    assert torch.equal(res.grad, dy)


def test_zero_up_weight_returns_the_residual_bit_exactly(device):
    x, w_down, w_up, res = _problem(2, 9, 30, 16, "swiglu", device)
    res16 = res.detach().half()
    for name in ("triton", "reference"):
        with mmkernels.use_backend(name):
            y = dynamic_expert(x.detach().half(), w_down.detach().half(), torch.zeros_like(w_up).half(), res16)
        assert torch.equal(y, res16), name


def test_boundary_checks(device):
    x, w_down, w_up, res = (t.detach() for t in _problem(2, 3, 20, 4, "swiglu", device))
    with pytest.raises(ValueError, match="activation: expected one of"):
        dynamic_expert(x, w_down, w_up, activation="tanh")
    with pytest.raises(ValueError, match=r"w_down: expected shape \(2, 20, 4\), got \(2, 20, 8\)"):
        dynamic_expert(x, w_down, w_up, activation="gelu")
    with pytest.raises(ValueError, match=r"w_up: expected shape \(2, 4, 20\), got \(1, 4, 20\)"):
        dynamic_expert(x, w_down, w_up[:1])
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 3, 20\)"):
        dynamic_expert(x, w_down, w_up, res[:, :2])
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        dynamic_expert(x[0], w_down, w_up)
    with pytest.raises(TypeError, match="w_up: expected dtype torch.float32"):
        dynamic_expert(x, w_down, w_up.half())
    with pytest.raises(TypeError, match="x: expected dtype in"):
        dynamic_expert(x.long(), w_down, w_up)


def test_wide_bottleneck_forced_triton_is_an_error_automatic_runs_reference(device):
    h = MAX_BOTTLENECK + 1
    x, w_down, w_up, _ = (None if t is None else t.detach() for t in _problem(1, 2, 16, h, "relu", device,
                                                                              residual=False))
    with mmkernels.use_backend("triton"), pytest.raises(ValueError, match=f"bottleneck h <= {MAX_BOTTLENECK}"):
        dynamic_expert(x, w_down, w_up, activation="relu")
    y = dynamic_expert(x, w_down, w_up, activation="relu")
    torch.testing.assert_close(y, ref.dynamic_expert(x, w_down, w_up, None, "relu"))


def test_custom_op_registration():
    """opcheck: the fake impl's shapes, schema and autograd registration (reference backend)."""
    x, w_down, w_up, res = _problem(2, 3, 20, 4, "swiglu", torch.device("cpu"))
    torch.library.opcheck(op_mod.dynamic_expert_fwd, (x, w_down, w_up, res, "swiglu", "reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES + [(4, 300, 256, 256, 16, True)])
def test_triton_matches_reference_bf16(shape, activation):
    bsz, t, d_in, d_out, h, residual = shape
    x, w_down, w_up, res = _problem(bsz, t, d_in, h, activation, torch.device("cuda"), d_out, residual)
    inputs = [x, w_down, w_up] + ([res] if res is not None else [])

    def fn(x, w_down, w_up, res=None):
        return dynamic_expert(x, w_down, w_up, residual=res, activation=activation)

    check_against_reference(fn, inputs, backend="triton", dtype=torch.bfloat16, name=f"dynamic_expert[{activation}]",
                            reduced={1: t, 2: t})


# ---------------------------------------------------------------------------------------------------------
# nn.HyperNetwork, nn.DynamicExpert
# ---------------------------------------------------------------------------------------------------------


def _perturb(module, seed=1, scale=0.3):
    """Non-zero dynamic parts and up weights, so that every parameter shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("w2", "b2")) or name.endswith("up.static"):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


@pytest.mark.parametrize("rows, cols", [(40, 6), (6, 40)])
def test_hypernetwork_shapes_count_and_init(rows, cols):
    gen = torch.Generator().manual_seed(0)
    net = HyperNetwork(24, rows, cols, embed_dim=8, rank=3, generator=gen)
    g = torch.randn(5, 24)
    k = net(g)
    assert k.shape == (5, rows, cols) and k.dtype == torch.float32
    assert torch.equal(net.dynamic(g), torch.zeros(5, rows, cols))  # starts exactly at the static weight
    assert torch.equal(k, net.static.expand(5, -1, -1))
    small, large = min(rows, cols), max(rows, cols)
    want = 24 * 8 + 8 + small * 3 * 8 + small * 3 + 3 * large + large + rows * cols
    assert sum(p.numel() for p in net.parameters()) == want
    _perturb(net)
    dyn = net.dynamic(g)
    assert dyn.shape == (5, rows, cols)
    centered = dyn[0] - (net.b2 if rows <= cols else net.b2[:, None])
    assert torch.linalg.matrix_rank(centered.detach()) <= 3  # a rank-3 dynamic part (plus the bias B2)
    assert not torch.allclose(dyn[0], dyn[1])  # per-sample
    torch.testing.assert_close(net.dynamic(3.0 * g), dyn)  # the guidance is rms-normalised first


def test_dynamic_expert_starts_at_zero_and_is_per_sample():
    torch.manual_seed(0)
    expert = DynamicExpert(32, bottleneck=8, guidance_dim=12, activation="swiglu", embed_dim=16, rank=4,
                           generator=torch.Generator().manual_seed(0))
    x, res, g = torch.randn(2, 5, 32), torch.randn(2, 5, 32), torch.randn(2, 12)
    assert torch.equal(expert(x, guidance=g, residual=res), res)  # zero-init up weights: exactly the residual
    _perturb(expert)
    y = expert(x, guidance=g)
    same_x = expert(x[:1].expand(2, -1, -1), guidance=g)
    assert not torch.allclose(same_x[0], same_x[1], atol=1e-4)  # different guidance, different experts
    swapped = expert(x.flip(0), guidance=g.flip(0))
    torch.testing.assert_close(swapped, y.flip(0))
    weights = expert.generate(g)
    torch.testing.assert_close(expert(x, weights=weights), y)
    # gradients reach every hypernetwork parameter through the op
    with mmkernels.use_backend("triton"):
        expert(x, guidance=g, residual=res).square().sum().backward()
    missing = [n for n, p in expert.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_dynamic_expert_gradients_match_autograd_of_the_reference():
    """The module's hypernetwork gradients through the custom op equal plain autograd through the reference
    math (float64), so the op's backward is wired to every input."""
    expert = DynamicExpert(20, bottleneck=4, guidance_dim=6, activation="gelu", embed_dim=8, rank=2,
                           generator=torch.Generator().manual_seed(0)).double()
    _perturb(expert)
    x, g = torch.randn(3, 4, 20, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    expert(x, guidance=g).sum().backward()
    ours = {n: p.grad.clone() for n, p in expert.named_parameters()}
    expert.zero_grad()
    w_down, w_up = expert.generate(g)
    ref.dynamic_expert(x, w_down, w_up, None, "gelu").sum().backward()
    for n, p in expert.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_dynamic_expert_argument_errors():
    expert = DynamicExpert(16, bottleneck=4, guidance_dim=8)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="expected exactly one of them, got neither"):
        expert(x)
    with pytest.raises(ValueError, match="expected exactly one of them, got both"):
        expert(x, guidance=torch.randn(2, 8), weights=expert.generate(torch.randn(2, 8)))
    with pytest.raises(ValueError, match=r"guidance: expected shape \(B, 8\)"):
        expert(x, guidance=torch.randn(2, 7))
    with pytest.raises(ValueError, match="x: expected batch 3"):
        expert(x, weights=expert.generate(torch.randn(3, 8)))
    with pytest.raises(ValueError, match="bottleneck: expected a positive integer"):
        DynamicExpert(16, bottleneck=0)
    with pytest.raises(ValueError, match="activation: expected one of"):
        DynamicExpert(16, activation="tanh")


# ---------------------------------------------------------------------------------------------------------
# benchmark script
# ---------------------------------------------------------------------------------------------------------


def test_benchmark_script_smoke_on_cpu(tmp_path):
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    env.pop("MMK_BACKEND", None)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_dynamic_expert.py"), "--quick",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: timings are measured only on a GPU; correctness smoke passed" in proc.stdout
    assert "mmkernels[triton]" in proc.stdout
    assert not out.exists()


def test_benchmark_smoke_catches_a_wrong_op():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import bench_dynamic_expert as bench
        import runner
    finally:
        sys.path.pop(0)
    import dataclasses

    wrong = dataclasses.replace(bench.BENCH, ours=lambda *a: bench.ours(*a) * 1.001)
    failures = runner.smoke(wrong)
    assert failures and any("output" in f for f in failures)
