"""linear_cross_entropy: the chunked op (triton and reference backends) against the unchunked naive oracle.

Oracle rule (_tolerance.py): the op in the test dtype must be within k times the error of the naive
F.cross_entropy path in the same dtype, both measured against the naive path in float64, for the loss and
for the gradients of x, W and b.
"""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.ops.linear_cross_entropy import linear_cross_entropy
from mmkernels.reference.linear_cross_entropy import linear_cross_entropy_naive
from _tolerance import FLOORS, assert_close_to_reference

ops_mod = importlib.import_module("mmkernels.ops.linear_cross_entropy")
ref_mod = importlib.import_module("mmkernels.reference.linear_cross_entropy")
kernels = importlib.import_module("mmkernels.kernels.linear_cross_entropy")

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"


@pytest.fixture
def small_blocks(monkeypatch):
    """Vocabulary blocks of 128 columns, so V=257 and V=1000 take several online-logsumexp steps with a
    ragged last block in the interpreter."""
    monkeypatch.setattr(kernels, "BLOCK_V_MAX", 128)


def _problem(lead, d, vocab, device, *, ignore_frac=0.25, bias=True, logit_scale=1.0, seed=0):
    """float64 leaves (x, W, b) and int64 targets; ~ignore_frac of the targets are -100."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=gen, dtype=torch.float64) * logit_scale
    w = torch.randn(vocab, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    t = torch.randint(0, vocab, lead, generator=gen)
    t[torch.rand(lead, generator=gen) < ignore_frac] = -100
    return x.to(device), w.to(device), None if b is None else b.to(device), t.to(device)


def _run(fn, leaves, target, grad_seed=7):
    leaves = [p.detach().clone().requires_grad_(True) if p is not None else None for p in leaves]
    loss = fn(*leaves, target)
    gen = torch.Generator().manual_seed(grad_seed)
    g = torch.randn(loss.shape, generator=gen, dtype=torch.float64).to(loss.device, loss.dtype)
    loss.backward(g)
    return loss.detach(), [None if p is None else p.grad for p in leaves]


def check_vs_naive(leaves, target, *, dtype, backend, k=3.0, **kwargs):
    """The op (forced backend, dtype) vs naive (dtype) vs naive (float64): loss and every leaf gradient.
    The inputs are first rounded to dtype, so all three see the same values."""
    rounded = [None if p is None else p.to(dtype).to(torch.float64) for p in leaves]

    def ours(x, w, b, t):
        with mmkernels.use_backend(backend):
            return linear_cross_entropy(x, w, t, b, **kwargs)

    def naive(x, w, b, t):
        return linear_cross_entropy_naive(x, w, t, b, **{k_: v for k_, v in kwargs.items() if k_ != "chunk_size"})

    out, grads = _run(ours, [None if p is None else p.to(dtype) for p in rounded], target)
    low, low_grads = _run(naive, [None if p is None else p.to(dtype) for p in rounded], target)
    high, high_grads = _run(naive, rounded, target)
    assert out.dtype == torch.float32 and out.shape == high.shape
    assert_close_to_reference(out, low, high, "loss", k=k)
    tokens = target.numel()
    for name, a, lo, hi in zip(("dx", "dW", "db"), grads, low_grads, high_grads):
        if hi is None:
            continue
        assert a is not None and a.dtype == dtype, f"{name}: {None if a is None else a.dtype}"
        # dW and db sum over the tokens: rounding grows like sqrt(tokens) there.
        floor = FLOORS[dtype] * math.sqrt(tokens) if name != "dx" else None
        assert_close_to_reference(a, lo, hi, name, k=k, floor=floor)


# (leading shape, d, V, chunk_size, bias, reduction, label_smoothing, logit scale)
CASES = [
    ((13,), 24, 257, 5, True, "mean", 0.0, 1.0),        # N not a multiple of the chunk
    ((2, 9), 17, 1000, 4, False, "sum", 0.0, 1.0),      # (B, T, d) input, odd d, no bias
    ((11,), 32, 1000, 1, True, "mean", 0.1, 1.0),       # chunk of one row, label smoothing
    ((7,), 9, 257, 64, True, "none", 0.0, 1.0),         # chunk larger than N, per-token losses
    ((3, 5), 16, 130, None, False, "none", 0.2, 1.0),   # default chunk size
    ((10,), 16, 300, 3, True, "mean", 0.0, 8.0),        # large logits: the online max matters
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-d{c[1]}-V{c[2]}-c{c[3]}-{c[5]}-eps{c[6]}")
def test_triton_matches_naive_oracle(device, small_blocks, case, dtype):
    lead, d, vocab, chunk, bias, reduction, eps, scale = case
    x, w, b, t = _problem(lead, d, vocab, device, bias=bias, logit_scale=scale)
    check_vs_naive([x, w, b], t, dtype=dtype, backend="triton", chunk_size=chunk, reduction=reduction,
                   label_smoothing=eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: f"{c[0]}-V{c[2]}-c{c[3]}-{c[5]}")
def test_reference_backend_matches_naive_oracle(device, case, dtype):
    lead, d, vocab, chunk, bias, reduction, eps, scale = case
    x, w, b, t = _problem(lead, d, vocab, device, bias=bias, logit_scale=scale)
    check_vs_naive([x, w, b], t, dtype=dtype, backend="reference", chunk_size=chunk, reduction=reduction,
                   label_smoothing=eps)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("reduction,eps", [("mean", 0.0), ("mean", 0.1), ("sum", 0.1), ("none", 0.0)])
def test_equals_torch_cross_entropy(device, backend, reduction, eps):
    """Against torch.nn.functional.cross_entropy(x @ W.T + b) directly (its own "mean" over non-ignored
    tokens, its label smoothing): float64 through the reference math, float32 for the kernel."""
    x, w, b, t = _problem((12,), 20, 257, device)
    dtype = torch.float32 if backend == "triton" else torch.float64
    leaves = [p.to(dtype) for p in (x, w, b)]
    with mmkernels.use_backend(backend):
        out, grads = _run(lambda x, w, b, t: linear_cross_entropy(x, w, t, b, reduction=reduction,
                                                                  label_smoothing=eps, chunk_size=5), leaves, t)
    want, want_grads = _run(lambda x, w, b, t: F.cross_entropy(x @ w.T + b, t, reduction=reduction,
                                                               label_smoothing=eps), leaves, t)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, want.float() if dtype == torch.float32 else want, **tol)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a, e, **tol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_grads(device, backend, reduction):
    x, w, b, t = _problem((6,), 8, 40, device)
    t.fill_(-100)
    leaves = [p.float() for p in (x, w, b)]
    with mmkernels.use_backend(backend):
        out, grads = _run(lambda x, w, b, t: linear_cross_entropy(x, w, t, b, reduction=reduction, chunk_size=4),
                          leaves, t)
    assert torch.equal(out, torch.zeros_like(out))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_custom_ignore_index_and_empty_input(device, backend):
    x, w, b, t = _problem((9,), 8, 40, device, ignore_frac=0.0)
    t[::3] = 7  # a valid class used as the ignore index
    leaves = [p.float() for p in (x, w, b)]
    with mmkernels.use_backend(backend):
        out, grads = _run(lambda x, w, b, t: linear_cross_entropy(x, w, t, b, ignore_index=7, chunk_size=2),
                          leaves, t)
    want, want_grads = _run(lambda x, w, b, t: F.cross_entropy(x @ w.T + b, t, ignore_index=7), leaves, t)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    with mmkernels.use_backend(backend):
        empty = linear_cross_entropy(torch.zeros(0, 8, requires_grad=True), w.float(), t[:0])
    assert empty.item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_frozen_weight_runs_no_weight_gemm(device, backend, monkeypatch):
    """A frozen lm_head: no dW accumulation at all (and weight.grad stays None); a trainable one: one dW
    GEMM per chunk. Only bias trainable: dx and db, still no dW GEMM."""
    calls = []
    real = ref_mod.accumulate_matmul_
    monkeypatch.setattr(ref_mod, "accumulate_matmul_", lambda acc, a, b_: (calls.append(a.shape), real(acc, a, b_)))
    x, w, b, t = _problem((10,), 8, 50, device)
    x, w, b = x.float().requires_grad_(), w.float(), b.float().requires_grad_()
    with mmkernels.use_backend(backend):
        linear_cross_entropy(x, w, t, b, chunk_size=3).backward()
    assert calls == [] and w.grad is None and x.grad is not None and b.grad is not None
    w.requires_grad_()
    with mmkernels.use_backend(backend):
        loss = linear_cross_entropy(x, w, t, chunk_size=3)
        loss.backward()
    assert len(calls) == 4 and w.grad is not None  # ceil(10 / 3) chunks
    torch.testing.assert_close(loss, F.cross_entropy(x.detach() @ w.detach().T, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_grad_computes_loss_only(device, backend, monkeypatch):
    calls = []
    real = ref_mod.accumulate_matmul_
    monkeypatch.setattr(ref_mod, "accumulate_matmul_", lambda *a: (calls.append(1), real(*a)))
    x, w, b, t = _problem((10,), 8, 50, device)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    with torch.no_grad(), mmkernels.use_backend(backend):
        loss = linear_cross_entropy(x, w, t, chunk_size=4)
    assert calls == [] and not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(x.detach() @ w.detach().T, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_chunks_bound_the_largest_allocation(device, backend):
    """The only (rows x V) tensors are one chunk's: every allocation during forward + backward stays below
    max(chunk x V, V x d, N x d) elements (fp32), far below the N x V logits."""
    if device.type != "cpu":
        pytest.skip("CPU allocation profile")
    n, d, vocab, chunk = 64, 8, 1000, 4
    x, w, b, t = _problem((n,), d, vocab, device)
    x, w, b = (p.float().requires_grad_() for p in (x, w, b))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with mmkernels.use_backend(backend):
            linear_cross_entropy(x, w, t, b, chunk_size=chunk).backward()
    # An op's self memory: what it allocated itself (aten::empty, aten::mm, ...), net of its own frees.
    sizes = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    assert sizes, "the profiler recorded no allocation"
    bound = 4 * max(chunk * vocab, vocab * d, n * d)
    assert bound * 4 <= 4 * n * vocab  # the bound would catch the full logits (and a quarter of them)
    assert max(sizes) <= bound, max(sizes)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backward_twice_with_retain_graph(device, backend):
    """The backward scales the forward's gradients out of place: a second backward gives the same."""
    x, w, b, t = _problem((7,), 8, 30, device)
    x, w = x.float().requires_grad_(), w.float().requires_grad_()
    with mmkernels.use_backend(backend):
        loss = linear_cross_entropy(x, w, t, chunk_size=3)
    g1 = torch.autograd.grad(loss, (x, w), torch.tensor(2.0), retain_graph=True)
    g2 = torch.autograd.grad(loss, (x, w), torch.tensor(2.0))
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_strided_inputs(device, backend):
    """Shifted causal-LM views (hidden[:, :-1], labels[:, 1:]) and a strided 1-D target."""
    h, w, _, labels = _problem((2, 8), 12, 60, device)
    h, w = h.float().requires_grad_(), w.float()
    with mmkernels.use_backend(backend):
        out = linear_cross_entropy(h[:, :-1], w, labels[:, 1:], chunk_size=3)
        strided = linear_cross_entropy(h[0, ::2], w, labels[0, ::2], chunk_size=3)
    want = F.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(strided, F.cross_entropy(h[0, ::2] @ w.T, labels[0, ::2]), rtol=1e-5, atol=1e-6)
    g, g_want = torch.autograd.grad(out, h)[0], torch.autograd.grad(want, h)[0]
    torch.testing.assert_close(g, g_want, rtol=1e-5, atol=1e-6)


def test_bad_input():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"x: expected last dim 8"):
        linear_cross_entropy(torch.randn(4, 7), w, t)
    with pytest.raises(ValueError, match=r"target: expected shape \(4,\)"):
        linear_cross_entropy(x, w, t[:3])
    with pytest.raises(TypeError, match="target: expected dtype in"):
        linear_cross_entropy(x, w, t.int())
    with pytest.raises(TypeError, match="weight: expected dtype torch.float32"):
        linear_cross_entropy(x, w.half(), t)
    with pytest.raises(ValueError, match=r"bias: expected shape \(10,\)"):
        linear_cross_entropy(x, w, t, torch.randn(9))
    with pytest.raises(ValueError, match=r"target: expected class indices in \[0, 10\).*got 10"):
        linear_cross_entropy(x, w, torch.tensor([0, 10, 1, 2]))
    with pytest.raises(ValueError, match=r"got -1"):
        linear_cross_entropy(x, w, torch.tensor([0, -1, 1, 2]))
    with pytest.raises(ValueError, match="reduction: expected one of"):
        linear_cross_entropy(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match=r"label_smoothing: expected a number in \[0, 1\]"):
        linear_cross_entropy(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        linear_cross_entropy(x, w, t, chunk_size=0)


def test_default_chunk_size():
    assert ref_mod.default_chunk_size(16384, 128256, torch.bfloat16) == 1024
    assert ref_mod.default_chunk_size(16384, 32000, torch.bfloat16) == 4096
    assert ref_mod.default_chunk_size(100, 32000, torch.bfloat16) == 100
    assert ref_mod.default_chunk_size(10, 2**40, torch.float32) == 1


def test_opcheck_and_compile():
    torch.manual_seed(0)
    x, w, b = torch.randn(6, 8), torch.randn(20, 8), torch.randn(20)
    t = torch.tensor([1, -100, 3, 19, 0, 5])
    for red in ("mean", "none"):
        torch.library.opcheck(ops_mod.linear_cross_entropy_fwd,
                              (x.requires_grad_(), w.requires_grad_(), t, b.requires_grad_(), -100, 0.1, red, 4,
                               True, True, True, "reference"))

    def f(x, w, b):
        return linear_cross_entropy(x, w, t, b, chunk_size=4, label_smoothing=0.1)

    with mmkernels.use_backend("reference"):
        eager = f(x, w, b)
        eager_grads = torch.autograd.grad(eager, (x, w, b))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        out = compiled(x, w, b)
        grads = torch.autograd.grad(out, (x, w, b))
    torch.testing.assert_close(out, eager)
    for a, e in zip(grads, eager_grads):
        torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------------------------------
# The benchmark script (CPU: correctness smoke only)
# ----------------------------------------------------------------------------------------------------


def _cpu_env():
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)
    env.pop("MMK_BACKEND", None)
    return env


def test_bench_script_quick_on_cpu(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_linear_cross_entropy.py"), "--quick", "--out", str(out)],
                          cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no GPU: timings are measured only on a GPU; correctness smoke passed" in proc.stdout
    assert "mmkernels[triton]" in proc.stdout
    assert not out.exists()


def test_bench_timing_loop_plumbing_on_cpu(tmp_path, monkeypatch, capsys):
    """runner.main's GPU branch driven on CPU with a fake clock: one well-formed row per provider x mode."""
    import dataclasses

    sys.path.insert(0, str(BENCH))
    import runner
    import bench_linear_cross_entropy as mod
    from _fake_gpu import fake_gpu

    fake_gpu(monkeypatch, runner)
    bench = dataclasses.replace(mod.BENCH, presets={"default": mod.BENCH.smoke_shapes[:1]})
    rc = runner.main(bench, ["--out", str(tmp_path), "--providers", "mmkernels,eager,liger", "--quick"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = runner.read_rows(tmp_path / "test-gpu.jsonl")[2:]
    assert [(r["provider"], r["mode"]) for r in rows if r["provider"] != "liger"] == [
        (p, m) for p in ("mmkernels", "eager") for m in runner.MODES]
    for r in rows:
        assert list(r) == list(runner.ROW_KEYS) and r["op"] == "linear_cross_entropy"
        assert r["tflops"] > 0 and r["gbps"] is None
    if importlib.util.find_spec("liger_kernel") is None:
        assert "note: provider liger skipped" in printed


# ----------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_matches_naive_oracle_gpu(reduction):
    x, w, b, t = _problem((4, 257), 256, 32000, "cuda", logit_scale=2.0)
    check_vs_naive([x, w, b], t, dtype=torch.bfloat16, backend="triton", chunk_size=300, reduction=reduction,
                   label_smoothing=0.0)
    check_vs_naive([x, w, None], t, dtype=torch.float16, backend="triton", chunk_size=None, reduction=reduction,
                   label_smoothing=0.1)


@pytest.mark.gpu
def test_peak_memory_below_full_logits_gpu():
    """Forward + backward at N=16384, V=32000, d=1024 in bf16 allocates far less than the (N x V) logits."""
    n, d, vocab = 16384, 1024, 32000
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, d, device="cuda") / d**0.5).to(torch.bfloat16).requires_grad_()
    t = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with mmkernels.use_backend("triton"):
        linear_cross_entropy(x, w, t, chunk_size=512).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = n * vocab * 2
    # chunk logits 32 MiB + dx and x.grad 2 x 32 MiB + fp32 dW 125 MiB + bf16 dW 63 MiB: ~0.3 of the logits.
    assert extra < 0.5 * logits_bytes, (extra, logits_bytes)
