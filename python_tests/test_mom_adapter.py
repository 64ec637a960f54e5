"""mom_adapter (LaVIN's mixture-of-modality adapter): the Triton kernels against the reference, the grouped
layout against LaVIN's grouped Conv1d, nn.MoMAdapter (identity init, dropout rule, merge_into), errors, and
the benchmark script's CPU smoke."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mmkernels
from mmkernels.nn.mom_adapter import MoMAdapter
from mmkernels.ops.mom_adapter import mom_adapter
from mmkernels.reference import mom_adapter as ref
from _harness import check_against_reference

op_mod = importlib.import_module("mmkernels.ops.mom_adapter")
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _inputs(batch, t, d, h=8, groups=2, norm=False, seed=0):
    """x, the six adapter parameters, per-sample router weights (different per sample), norm weight or None."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).requires_grad_()

    x = rnd(batch, t, d)
    params = [rnd(h, d, scale=d ** -0.5), rnd(h, scale=0.5), rnd(d, h // groups, scale=0.5), rnd(d, scale=0.5),
              rnd(d, h // groups, scale=0.5), rnd(d, scale=0.5)]
    router_w = torch.softmax(torch.randn(batch, 2, generator=gen) * 2, -1).requires_grad_()
    nw = rnd(d, scale=0.2).detach().add_(1.0).requires_grad_() if norm else None
    return x, params, router_w, nw


def _fn(scale, norm):
    if norm:
        return lambda x, A, a, B, b, D, d_b, w, nw: mom_adapter(x, A, a, B, b, D, d_b, w, scale, nw)  # noqa: E731
    return lambda x, A, a, B, b, D, d_b, w: mom_adapter(x, A, a, B, b, D, d_b, w, scale)  # noqa: E731


def _reduced(batch, t, d, norm):
    """Terms summed into one element of each gradient (inputs: x, A, a, B, b, D, d_b, router_w, norm)."""
    tokens = batch * t
    red = {1: tokens, 2: tokens * d, 3: tokens, 4: tokens, 5: tokens, 6: tokens, 7: t * d}
    if norm:
        red[8] = tokens
    return red


# (batch, T, d, h, groups, norm): d not a power of two and not a multiple of the 32-wide CPU chunk, T=1,
# T crossing the 16-token blocks (so each sample has several blocks over 2 programs), 4 groups of h=16; the norm
# with 3 token blocks over 2 programs (a program adds a second block to its norm-weight partial).
CASES_FP32 = [(2, 37, 40, 8, 2, False), (3, 1, 72, 8, 2, True), (2, 9, 48, 16, 4, False), (2, 37, 40, 8, 2, True)]
CASES_FP16 = [(2, 19, 72, 8, 2, True), (1, 5, 40, 8, 2, False)]


@pytest.mark.parametrize("dtype,case", [(torch.float32, c) for c in CASES_FP32]
                         + [(torch.float16, c) for c in CASES_FP16])
def test_triton_matches_reference(device, dtype, case):
    batch, t, d, h, groups, norm = case
    x, params, router_w, nw = _inputs(batch, t, d, h, groups, norm)
    inputs = [x.to(device), *[p.to(device) for p in params], router_w.to(device)]
    if norm:
        inputs.append(nw.to(device))
    inputs = [t_.detach().requires_grad_() for t_ in inputs]
    check_against_reference(_fn(0.7, norm), inputs, backend="triton", dtype=dtype, name=f"mom_adapter{case}",
                            reduced=_reduced(batch, t, d, norm))


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(2, 37, 40, 8, 2, False), (3, 129, 4096, 8, 2, True), (4, 300, 1000, 8, 2, False)])
def test_triton_matches_reference_bf16(device, case):
    batch, t, d, h, groups, norm = case
    x, params, router_w, nw = _inputs(batch, t, d, h, groups, norm)
    inputs = [x, *params, router_w] + ([nw] if norm else [])
    inputs = [t_.detach().to(device).requires_grad_() for t_ in inputs]
    check_against_reference(_fn(1.0, norm), inputs, backend="triton", dtype=torch.bfloat16,
                            name=f"mom_adapter_bf16{case}", reduced=_reduced(batch, t, d, norm))


def test_reference_backward_matches_autograd():
    """The explicit reference backward (the op's reference path) against autograd of the reference forward."""
    for norm in (False, True):
        x, params, router_w, nw = _inputs(3, 6, 40, norm=norm, seed=3)
        leaves = [t.detach().double().requires_grad_() for t in [x, *params, router_w] + ([nw] if norm else [])]
        nwl = leaves[8] if norm else None
        y = ref.mom_adapter(*leaves[:8], 0.7, nwl)
        dy = torch.randn_like(y)
        want = torch.autograd.grad(y, leaves, dy)
        with mmkernels.use_backend("reference"):
            got = torch.autograd.grad(mom_adapter(*leaves[:8], 0.7, nwl), leaves, dy)
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=f"gradient {i}, norm={norm}")


def test_per_sample_router_weights(device):
    """Each sample uses its own router weights: a batch equals its samples run one by one (triton)."""
    x, params, router_w, _ = _inputs(2, 3, 40, seed=5)
    args = [p.detach().to(device) for p in params]
    with mmkernels.use_backend("triton"):
        y = mom_adapter(x.detach().to(device), *args, router_w.detach().to(device))
        for i in range(2):
            yi = mom_adapter(x[i:i + 1].detach().to(device), *args, router_w[i:i + 1].detach().to(device))
            torch.testing.assert_close(y[i:i + 1], yi, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(y[0], ref.mom_adapter(x[:1].detach(), *params, router_w[1:].detach()).to(device)[0])


def test_grouped_layout_matches_lavin_conv1d():
    """LaVIN's adapter: conv_A = Conv1d(d, h, 1), conv_B / conv_D = Conv1d(h, d, 1, groups=2) on (B, d, T),
    y = conv_B(u) s w0 + conv_D(u) s w1 + x. Its state dict loads 1:1 into MoMAdapter."""
    torch.manual_seed(0)
    d, h, s = 40, 8, 0.8
    conv_a = nn.Conv1d(d, h, 1).double()
    conv_b = nn.Conv1d(h, d, 1, groups=2).double()
    conv_d = nn.Conv1d(h, d, 1, groups=2).double()
    experts = nn.Linear(d, 2).double()
    x = torch.randn(3, 7, d, dtype=torch.float64)
    t = x[:, 0]
    w = torch.softmax(experts(t) / 10.0, -1)
    xt = x.transpose(1, 2)
    u = conv_a(xt)
    want = (conv_b(u) * s * w[:, 0, None, None] + conv_d(u) * s * w[:, 1, None, None] + xt).transpose(1, 2)

    state = {f"conv_A.{k}": v for k, v in conv_a.state_dict().items()}
    state.update({f"conv_B.{k}": v for k, v in conv_b.state_dict().items()})
    state.update({f"conv_D.{k}": v for k, v in conv_d.state_dict().items()})
    state.update({f"expert_weights.{k}": v for k, v in experts.state_dict().items()})
    adapter = MoMAdapter(d, hidden=h, groups=2, scale=s, tau=10.0).double()
    adapter.load_lavin_state_dict(state)
    with mmkernels.use_backend("reference"), torch.no_grad():
        got = adapter(x, router_w=w)
        # the router runs in float32 (as LaVIN's, under autocast, runs in half precision)
        torch.testing.assert_close(adapter.routing_weights(t), w.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_new_adapter_is_identity():
    adapter = MoMAdapter(40)
    x = torch.randn(2, 3, 40)
    with mmkernels.use_backend("reference"):
        y = adapter(x, router_input=x[:, 0])
    torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert adapter.weight_a.abs().sum() > 0 and adapter.weight_b.abs().sum() == 0 and adapter.weight_d.abs().sum() == 0


def test_norm_weight_fuses_rms_norm():
    """With norm_weight the op equals RMSNorm (float64, no rounding) followed by the adapter."""
    x, params, router_w, nw = _inputs(2, 5, 40, norm=True, seed=7)
    x, nw = x.detach().double(), nw.detach().double()
    params = [p.detach().double() for p in params]
    w = router_w.detach().double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * nw
    with mmkernels.use_backend("reference"):
        want = mom_adapter(normed, *params, w, 0.7)
        got = mom_adapter(x, *params, w, 0.7, nw, eps=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _merge_case(bias):
    torch.manual_seed(1)
    d = 48
    adapter = MoMAdapter(d, scale=0.6).double()
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.3)
    linears = [nn.Linear(d, n, bias=bias).double() for n in (48, 16, 16)]
    return adapter, linears


@pytest.mark.parametrize("bias", [False, True])
def test_merge_into_is_exact(bias):
    adapter, linears = _merge_case(bias)
    w = torch.tensor([0.3, 0.7], dtype=torch.float64)
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    merged = adapter.merge_into(linears, w)
    with mmkernels.use_backend("reference"), torch.no_grad():
        y = adapter(x, router_w=w.expand(2, 2))
        for lin, m in zip(linears, merged):
            assert m.bias is not None and lin.weight.shape == m.weight.shape
            torch.testing.assert_close(m(x), lin(y), rtol=1e-10, atol=1e-10)


def test_dropout_rule():
    """dropout > 0 in training: plain PyTorch with dropout; a forced triton backend raises; eval mode fused."""
    adapter = MoMAdapter(40, dropout=0.5)
    with torch.no_grad():
        adapter.weight_b.normal_()
        adapter.weight_d.normal_()
    x = torch.randn(2, 4, 40)
    w = torch.tensor([[0.4, 0.6], [0.9, 0.1]])
    with mmkernels.use_backend("triton"), pytest.raises(ValueError, match="dropout"):
        adapter(x, router_w=w)
    with mmkernels.use_backend("reference"):
        y_train = adapter(x, router_w=w)
        adapter.eval()
        y_eval = adapter(x, router_w=w)
    assert not torch.allclose(y_train, y_eval)
    with mmkernels.use_backend("triton"):
        torch.testing.assert_close(adapter(x, router_w=w), y_eval, rtol=1e-5, atol=1e-5)


def test_boundary_errors():
    x, params, router_w, nw = _inputs(2, 3, 40, norm=True)
    A, a, B, b, D, d_b = [p.detach() for p in params]
    w = router_w.detach()
    with pytest.raises(ValueError, match="x: expected 3 dimensions"):
        mom_adapter(x[0], A, a, B, b, D, d_b, w)
    with pytest.raises(ValueError, match=r"A: expected shape \(8, 40\)"):
        mom_adapter(x, A[:, :30], a, B, b, D, d_b, w)
    with pytest.raises(ValueError, match=r"router_w: expected shape \(2, 2\)"):
        mom_adapter(x, A, a, B, b, D, d_b, w[:1])
    with pytest.raises(ValueError, match=r"d_b: expected shape \(40,\)"):
        mom_adapter(x, A, a, B, b, D, d_b[:3], w)
    with pytest.raises(ValueError, match="B: expected shape"):
        mom_adapter(x, A, a, B[:, :3], b, D, d_b, w)
    with pytest.raises(ValueError, match="divisible"):
        mom_adapter(torch.randn(2, 3, 41), torch.randn(8, 41), a, torch.randn(41, 4), torch.randn(41), torch.randn(41, 4),
                    torch.randn(41), w)
    with pytest.raises(TypeError, match="dtype"):
        mom_adapter(x, A.double(), a, B, b, D, d_b, w)
    with pytest.raises(ValueError, match=r"norm_weight: expected shape \(40,\)"):
        mom_adapter(x, A, a, B, b, D, d_b, w, 1.0, nw[:5])
    with pytest.raises(ValueError, match="eps"):
        mom_adapter(x, A, a, B, b, D, d_b, w, 1.0, nw, eps=0.0)
    adapter = MoMAdapter(40)
    with pytest.raises(ValueError, match="exactly one"):
        adapter(x)
    with pytest.raises(ValueError, match="groups"):
        MoMAdapter(41)


def test_wide_hidden_falls_back_or_raises():
    x, params, router_w, _ = _inputs(1, 2, 40, h=128, groups=2)
    args = [t.detach() for t in (x, *params, router_w)]
    with mmkernels.use_backend("triton"), pytest.raises(ValueError, match="h <= 64"):
        mom_adapter(*args)


def test_opcheck():
    x, params, router_w, nw = _inputs(2, 3, 40, norm=True)
    args = (x.detach(), *[p.detach() for p in params], router_w.detach(), nw.detach(), 0.5, 1e-6, "reference")
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(op_mod.mom_adapter_fwd, args, test_utils=tests)
    y, u, rstd = op_mod.mom_adapter_fwd(*args)
    torch.library.opcheck(op_mod.mom_adapter_bwd, (torch.randn_like(y), x.detach(), u, rstd, *args[1:9], 0.5,
                                                   "reference"), test_utils=tests[:2])


def test_bench_script_smoke_on_cpu(tmp_path):
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    env.pop("MMK_BACKEND", None)
    env["OMP_NUM_THREADS"] = "1"  # tiny tensors: threads only contend on a shared CPU
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_mom_adapter.py"), "--quick", "--out",
                           str(tmp_path / "results")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: timings are measured only on a GPU; correctness smoke passed" in proc.stdout
    assert "mmkernels[triton]" in proc.stdout
    assert not (tmp_path / "results").exists()
