"""phm_adapter / phm_linear / nn.PHMAdapter: kernels vs reference, the reference vs a float64 oracle, interop
with the `adapters` library (fixture), boundary checks, and the benchmark's CPU smoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmkernels
from _harness import check_against_reference
from _tolerance import assert_close_to_reference
from mmkernels.nn.phm_adapter import ADAPTERS_NAMES, PHMAdapter, new_phm_rule
from mmkernels.ops.phm import phm_adapter, phm_linear
from mmkernels.reference import phm as ref

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "phm_adapters_lib.safetensors"


def make_inputs(lead, d, k, n, r, seed=0, device="cpu"):
    """x (*lead, d) and the eight parameters, float64, scaled so every stage is O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device).requires_grad_(True)

    return [rnd(*lead, d),
            rnd(n, n, n, scale=n ** -0.5), rnd(n, d // n, r, scale=(d // n) ** -0.5), rnd(n, r, k // n, scale=(n * r) ** -0.5),
            rnd(k, scale=0.3),
            rnd(n, n, n, scale=n ** -0.5), rnd(n, k // n, r, scale=(k // n) ** -0.5), rnd(n, r, d // n, scale=(n * r) ** -0.5),
            rnd(d, scale=0.3)]


# (leading dims, d, k, n, r): odd block sizes (d/n = 9, k/n = 3), T=1, rank 1-3, C padded (n*n*r = 12 -> 16)
# and C = 64 (n = 8), several row blocks (70 rows), several width chunks (d = 320 > 128) and bottleneck
# chunks (k = 80 > 64).
SHAPES = [
    ((2, 3), 36, 12, 4, 1),
    ((1,), 36, 12, 4, 2),
    ((70,), 24, 8, 2, 3),
    ((5,), 128, 64, 8, 1),
    ((3,), 320, 80, 4, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s}")
def test_kernel_matches_reference(shape, dtype, device):
    lead, d, k, n, r = shape
    inputs = make_inputs(lead, d, k, n, r, device=device)
    check_against_reference(phm_adapter, inputs, backend="triton", dtype=dtype, name=f"phm_adapter{shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [((2, 3), 36, 12, 4, 1), ((70,), 24, 8, 2, 3), ((9,), 4096, 128, 4, 1),
                                   ((129,), 512, 64, 4, 2)], ids=lambda s: f"{s}")
def test_kernel_matches_reference_bf16(shape, device):
    lead, d, k, n, r = shape
    inputs = make_inputs(lead, d, k, n, r, device=device)
    check_against_reference(phm_adapter, inputs, backend="triton", dtype=torch.bfloat16, name=f"phm_adapter{shape}")


def test_reference_backward_is_the_gradient():
    """The explicit backward (the kernel's spec) equals autograd through the reference forward, in float64."""
    inputs = make_inputs((4, 3), 36, 12, 4, 2, seed=3)
    y = ref.phm_adapter(*inputs)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    auto = torch.autograd.grad(y, inputs, dy)
    explicit = ref.phm_adapter_backward(dy, *[t.detach() for t in inputs])
    for i, (a, b) in enumerate(zip(auto, explicit)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"gradient {i}")


def test_factorised_layer_equals_the_kronecker_weight():
    """phm_linear == x @ sum_i kron(A_i, s_i t_i) + b (W materialised only here, as the oracle)."""
    g = torch.Generator().manual_seed(0)
    n, r, d_in, d_out = 4, 2, 20, 12
    x = torch.randn(3, 5, d_in, dtype=torch.float64, generator=g)
    rule = torch.randn(n, n, n, dtype=torch.float64, generator=g)
    s = torch.randn(n, d_in // n, r, dtype=torch.float64, generator=g)
    t = torch.randn(n, r, d_out // n, dtype=torch.float64, generator=g)
    b = torch.randn(d_out, dtype=torch.float64, generator=g)
    w = torch.zeros(d_in, d_out, dtype=torch.float64)
    for i in range(n):
        w += torch.kron(rule[i], s[i] @ t[i])
    torch.testing.assert_close(ref.kron_weight(rule, s, t), w)
    torch.testing.assert_close(phm_linear(x, rule, s, t, b), x @ w + b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(phm_linear(x, rule, s, t), x @ w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_shared_rule_receives_both_gradients(backend, device):
    """One rule used by the down and up layers: its gradient is the sum of both layers' gradients."""
    inputs = make_inputs((6,), 36, 12, 4, 1, seed=5, device=device)
    x, rule = inputs[0], inputs[1]
    args32 = [t.detach().float().requires_grad_(True) for t in inputs]
    shared = args32[1]
    with mmkernels.use_backend(backend):
        y = phm_adapter(args32[0], shared, *args32[2:5], shared, *args32[6:])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y)
    y.backward(dy)
    with torch.no_grad():
        rule64 = rule.detach().clone().requires_grad_(True)
    y64 = ref.phm_adapter(x.detach(), rule64, *[t.detach() for t in inputs[2:5]], rule64,
                          *[t.detach() for t in inputs[6:]])
    (g64,) = torch.autograd.grad(y64, rule64, dy.double())
    torch.testing.assert_close(shared.grad.double(), g64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_custom_op_registration(impl, device):
    """Schema, autograd registration and fake (meta) impls (torch.compile / export see correct shapes)."""
    from mmkernels.ops import phm as ops

    inputs = [t.detach().float().requires_grad_(True) for t in make_inputs((5,), 36, 12, 4, 1, device=device)]
    result = torch.library.opcheck(ops.phm_adapter_fwd, (*inputs, impl))
    assert set(result.values()) == {"SUCCESS"}, result


def test_empty_and_no_bias(device):
    inputs = make_inputs((0, 3), 36, 12, 4, 1, device=device)
    with mmkernels.use_backend("triton"):
        y = phm_adapter(*[t.detach().float() for t in inputs])
    assert y.shape == (0, 3, 36)
    inputs = make_inputs((4,), 36, 12, 4, 1, device=device)
    args = [t.detach().float() for t in inputs]
    args[4] = args[8] = None
    zero = [torch.zeros(12), torch.zeros(36)]
    with mmkernels.use_backend("triton"):
        y = phm_adapter(*args)
    want = ref.phm_adapter(*args[:4], zero[0], *args[5:8], zero[1])
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_boundary_checks():
    x, rd, sd, td, bd, ru, su, tu, bu = [t.detach().float() for t in make_inputs((4,), 36, 12, 4, 1)]
    with pytest.raises(ValueError, match="rule_down.*divisible"):
        phm_adapter(x[:, :35], rd, sd, td, bd, ru, su, tu, bu)
    with pytest.raises(ValueError, match=r"s_down: expected shape \(4, 9, 1\)"):
        phm_adapter(x, rd, sd[:, :8], td, bd, ru, su, tu, bu)
    with pytest.raises(ValueError, match=r"t_up: expected shape \(4, 1, 9\)"):
        phm_adapter(x, rd, sd, td, bd, ru, su, tu[:, :, :8], bu)
    with pytest.raises(ValueError, match="b_down"):
        phm_adapter(x, rd, sd, td, bd[:11], ru, su, tu, bu)
    with pytest.raises(ValueError, match="rule_up"):
        phm_adapter(x, rd, sd, td, bd, ru[:2, :2, :2], su, tu, bu)
    with pytest.raises(ValueError, match="s_up: expected shape"):
        phm_adapter(x, rd, sd, td, bd, ru, torch.zeros(4, 3, 2), tu, bu)
    with pytest.raises(TypeError, match="b_up: expected dtype torch.float32"):
        phm_adapter(x, rd, sd, td, bd, ru, su, tu, bu.half())
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        phm_adapter(x.tolist(), rd, sd, td, bd, ru, su, tu, bu)
    with pytest.raises(ValueError, match="reduction"):
        PHMAdapter(64, reduction=32, n=4)  # bottleneck 2 < n
    with pytest.raises(ValueError, match="d: expected a multiple of n"):
        PHMAdapter(66, reduction=2, n=4)
    with pytest.raises(ValueError, match=r"phm_rule: expected shape \(4, 4, 4\)"):
        PHMAdapter(64, reduction=4, n=4, phm_rule=new_phm_rule(2))


def test_rule_wider_than_the_kernels_take():
    """n * n * rank > 128 (e.g. n = 8, rank 4) does not fit the triton kernels: a forced triton backend
    raises naming the limit; the automatic choice runs the reference (on CPU, the reference anyway)."""
    x, rd, sd, td, bd, ru, su, tu, bu = [t.detach().float() for t in make_inputs((3,), 64, 16, 8, 4)]
    with mmkernels.use_backend("triton"), pytest.raises(ValueError, match=r"n \* n \* rank <= 128.*n = 8, rank = 4"):
        phm_adapter(x, rd, sd, td, bd, ru, su, tu, bu)
    want = ref.phm_adapter(x.double(), *(t.double() for t in (rd, sd, td, bd, ru, su, tu, bu)))
    torch.testing.assert_close(phm_adapter(x, rd, sd, td, bd, ru, su, tu, bu).double(), want, rtol=1e-5, atol=1e-5)


def test_module_init_follows_the_library():
    torch.manual_seed(0)
    m = PHMAdapter(512, reduction=8, n=4, rank=1)
    # Glorot-normal per i over the 2-D slice (fan_in + fan_out = d/n + r): std sqrt(2 / (128 + 1)).
    assert abs(m.s_down.std().item() / (2 / 129) ** 0.5 - 1) < 0.15
    assert abs(m.t_up.std().item() / (2 / 129) ** 0.5 - 1) < 0.15
    assert m.b_down.abs().max() == 0 and m.b_up.abs().max() == 0
    assert abs(m.phm_rule_down.std().item() / 0.01 - 1) < 0.5  # own rules: N(0, 0.01^2), 64 values
    shared = new_phm_rule(4)
    assert shared.std().item() < 1e-3  # shared rule: N(0, 1e-4^2)
    ident = PHMAdapter(64, reduction=4, n=4, rank=2, phm_rule=shared, init="identity")
    x = torch.randn(3, 64)
    assert torch.equal(ident(x), x)
    a, b = ident.rules
    assert a is b is shared
    assert {n for n, _ in ident.named_parameters()} == {"s_down", "t_down", "b_down", "s_up", "t_up", "b_up", "phm_rule"}


# ------------------------------------------------------------------------------------------------------
# The `adapters` library's Compacter (fixture made by fixtures/make_phm_fixture.py in its own venv)
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lib():
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(FIXTURE), "pt") as fh:
        meta = fh.metadata()
    return load_file(str(FIXTURE)), meta


def _lib_adapter_state(tensors, prefix):
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _check_against_library(ours32, ours64, lib32, lib64, name):
    """ours in float64 reproduces the library in float64 (same math); ours in float32 obeys the tolerance
    rule against the library's float64 result, with the library's float32 result as the low-precision run."""
    torch.testing.assert_close(ours64, lib64, rtol=1e-10, atol=1e-10 * lib64.abs().max().item(), msg=name)
    assert_close_to_reference(ours32, lib32, lib64, name, k=3.0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_library_single_adapter_own_rules_rank2(lib, backend):
    tensors, meta = lib
    cfg = json.loads(meta["single"])
    state = _lib_adapter_state(tensors, "single.")
    x = tensors["single.x"]
    outs = {}
    for dtype in (torch.float32, torch.float64):
        m = PHMAdapter(cfg["d"], cfg["reduction_factor"], cfg["phm_dim"], cfg["phm_rank"], dtype=dtype)
        m.load_adapters_state(state)
        with torch.no_grad(), mmkernels.use_backend(backend):
            outs[dtype] = m(x.to(dtype))
            if dtype == torch.float64:
                h64 = phm_linear(x.double(), m.phm_rule_down, m.s_down, m.t_down, m.b_down)
    _check_against_library(outs[torch.float32], outs[torch.float64], tensors["single.y32"], tensors["single.y64"],
                           "single adapter")
    torch.testing.assert_close(h64, tensors["single.h64"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_library_model_adapters_shared_rule(lib, backend):
    """Every Adapter module of the library's Compacter model (shared rule, rank 1, reduction 8), on the inputs
    it saw in the model's forward."""
    tensors, meta = lib
    cfg = json.loads(meta["compacter"])
    d = json.loads(meta["llama"])["hidden_size"]
    lib_rule = tensors["lib.model.shared_parameters.c.phm_rule"]
    for i in range(2):
        for where in ("attention", "output"):
            state = _lib_adapter_state(tensors, f"lib.model.layers.{i}.{where}_adapters.adapters.c.")
            x = tensors[f"io.layers.{i}.{where}.x"]
            outs = {}
            for dtype in (torch.float32, torch.float64):
                rule = new_phm_rule(cfg["phm_dim"], dtype=dtype)
                m = PHMAdapter(d, cfg["reduction_factor"], cfg["phm_dim"], cfg["phm_rank"], phm_rule=rule, dtype=dtype)
                m.load_adapters_state(state, phm_rule=lib_rule)
                with torch.no_grad(), mmkernels.use_backend(backend):
                    outs[dtype] = m(x.to(dtype))
            _check_against_library(outs[torch.float32], outs[torch.float64], tensors[f"io.layers.{i}.{where}.y32"],
                                   tensors[f"io.layers.{i}.{where}.y64"], f"layer {i} {where} adapter")


def test_library_names_cover_the_module(lib):
    tensors, _ = lib
    names = {k[len("single."):] for k in tensors if k.startswith("single.") and "." in k[len("single."):]}
    assert names == set(ADAPTERS_NAMES.values())


# ------------------------------------------------------------------------------------------------------
# Benchmark script
# ------------------------------------------------------------------------------------------------------


def test_benchmark_script_smoke_on_cpu(tmp_path):
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    env.pop("MMK_BACKEND", None)
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_phm_adapter.py"), "--quick", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: timings are measured only on a GPU; correctness smoke passed" in proc.stdout
    assert "mmkernels[triton]" in proc.stdout and "kron_materialize" in proc.stdout
    assert not out.exists()


def test_benchmark_work_formulas():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_phm_adapter as bench

    t = bench.TARGET
    assert bench.nbytes(t, "fwd", torch.bfloat16) == 2 * 16384 * 4096 * 2
    assert bench.nbytes(t, "bwd", torch.bfloat16) == 3 * 16384 * 4096 * 2
    assert bench.nbytes(t, "fwd+bwd", torch.bfloat16) == 5 * 16384 * 4096 * 2
    assert bench.flops(t, "fwd") is None
