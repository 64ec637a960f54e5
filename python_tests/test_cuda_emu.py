"""tools/cuda_emu, the CPU build of csrc: its launch rewriting, its runtime's semantics (shuffles, barriers,
indices), the faults it must expose, and that csrc's kernels give the same bits whatever order their
threads run in (a missing barrier would not)."""

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmkernels
from mmkernels import ops
from conftest import HAS_CUDA, cuda_emu_build, use_emulated_csrc

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "tools" / "cuda_emu"
build = cuda_emu_build()

needs_gpp = pytest.mark.skipif(shutil.which("g++") is None, reason="the csrc emulation needs g++")


def test_rewrite_launches():
    src = ("  k<T, D, R, kVec><<<grid, kThreads, 0, stream>>>(p);\n"
           "  other_kernel<<<static_cast<unsigned>(ceil_div(n, 4)), 128, 0, s>>>(\n      a, f(b, c), d);\n"
           "  ns::plain<<<1, 32>>>();\n")
    out = build.rewrite_launches(src)
    assert out == ("  ::mmk_emu::launch([&] { k<T, D, R, kVec>(p); }, grid, kThreads, 0, stream);\n"
                   "  ::mmk_emu::launch([&] { other_kernel(\n      a, f(b, c), d); }, "
                   "static_cast<unsigned>(ceil_div(n, 4)), 128, 0, s);\n"
                   "  ::mmk_emu::launch([&] { ns::plain(); }, 1, 32);\n")
    with pytest.raises(ValueError, match="no kernel launch found"):
        build.rewrite_launches("int main() {}", "x.cu")
    with pytest.raises(ValueError, match="expected ';' after the launch"):
        build.rewrite_launches("k<<<1, 1>>>(a) + 1;", "x.cu")


def test_bindings_edits_are_all_found():
    text = (ROOT / "csrc" / "bindings.cpp").read_text()
    edited = build.edit_bindings(text)
    assert "is_cuda()" not in edited and "TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m)" in edited
    with pytest.raises(ValueError, match="expected to find 'TORCH_LIBRARY_IMPL"):
        build.edit_bindings(text.replace("TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m)", ""))


@functools.lru_cache(maxsize=None)
def _asan_runtime():
    """gcc's AddressSanitizer runtime (to preload into a Python that loads a sanitized library), or None."""
    if shutil.which("gcc") is None:
        return None
    path = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


needs_asan = pytest.mark.skipif(shutil.which("g++") is None or _asan_runtime() is None,
                                reason="needs g++ with AddressSanitizer")
ASAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0"}
ASAN_FIBER_WARNING = "WARNING: ASan doesn't fully support makecontext/swapcontext"


def _build_selftest(out, *flags):
    src = out / "selftest.cpp"
    src.write_text(build.emulated_source((ROOT / "python_tests" / "fixtures" / "cuda_emu_selftest.cu").read_text()))
    exe = out / ("selftest" + "".join(f.strip("-=") for f in flags))
    res = subprocess.run(["g++", "-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas", *flags,
                          f"-I{EMU / 'include'}", str(src), "-o", str(exe)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    return exe


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("the csrc emulation needs g++")
    exe = _build_selftest(tmp_path_factory.mktemp("cuda_emu"))

    def run(case, schedule="forward"):
        env = dict(os.environ, MMK_EMU_SCHEDULE=schedule)
        res = subprocess.run([str(exe), case], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    return run


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_runtime_semantics(selftest, schedule):
    expected = [496 * 1000 + ((lane + 1) % 32) * 10 for lane in range(32)] * 2
    assert selftest("shuffles", schedule) == " ".join(map(str, expected))
    assert selftest("neighbour", schedule) == " ".join(str((i + 1) % 64 + 1) for i in range(64))
    assert selftest("grid_indices", schedule) == " ".join(str(b * 100 + t) for b in range(12) for t in range(16))
    # exited threads leave the barrier: the remaining warp meets at it and shuffles
    assert selftest("early_exit_then_barrier", schedule) == " ".join(str(i ^ 31) for i in range(32))


def test_shared_memory_starts_poisoned_in_every_block(selftest):
    """A block reading shared memory it did not write gets the poison (-1 as an int), not block 0's values."""
    assert selftest("stale_shared") == " ".join([str(100 + i) for i in range(32)] + ["-1"] * 32)


def test_a_missing_barrier_shows(selftest):
    right = " ".join(str((i + 1) % 64 + 1) for i in range(64))
    forward, reverse = selftest("neighbour_without_barrier"), selftest("neighbour_without_barrier", "reverse")
    assert forward != right and forward != reverse


@pytest.mark.parametrize("case,message", [
    ("divergent_barrier", r"error: unspecified launch failure: __syncthreads reached at .*selftest.cpp:\d+ while "
                          r"others wait at .*selftest.cpp:\d+ \(block \(0,0,0\), thread 32\)"),
    ("shuffle_after_exit", r"error: unspecified launch failure: __shfl_xor_sync with a full mask after lane 5 "
                           r"exited"),
    ("deadlock", r"error: unspecified launch failure: deadlock: 16 threads wait at __syncthreads, 16 at a warp "
                 r"shuffle, 32 not exited"),
    ("too_many_threads", r"error: invalid configuration argument: grid \(1,1,1\), block \(2048,1,1\)"),
])
def test_faults_are_reported(selftest, case, message):
    out = selftest(case)
    assert re.fullmatch(message + ".*", out), out


@needs_gpp
@pytest.mark.skipif(HAS_CUDA, reason="a GPU is here: csrc runs on it")
def test_csrc_results_do_not_depend_on_thread_order(monkeypatch):
    """Each csrc kernel run with its threads scheduled first to last and last to first gives the same bits:
    every value a thread reads from shared memory or another lane was ordered by a barrier or a shuffle."""
    use_emulated_csrc(monkeypatch)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 8, 64, generator=gen)
    k, v = torch.randn(2, 700, 2, 64, generator=gen), torch.randn(2, 700, 2, 64, generator=gen)
    pk, pv = torch.randn(2, 10, 2, 64, generator=gen), torch.randn(2, 10, 2, 64, generator=gen)
    gate = torch.randn(8, generator=gen)
    x, r = torch.randn(6, 4096, generator=gen).half(), torch.randn(6, 4096, generator=gen).half()
    w = torch.randn(4096, generator=gen)
    dy = torch.randn(6, 4096, generator=gen).half()

    def run():
        with mmkernels.use_backend("cuda"), torch.no_grad():
            att = ops.decode_attention(q, k, v, prompt_k=pk, prompt_v=pv, gate=gate,
                                       kv_start=torch.tensor([0, 200], dtype=torch.int32))
        xs, rs, ws = (t.clone().requires_grad_() for t in (x, r, w))
        with mmkernels.use_backend("cuda"):
            y, h = ops.rms_norm(xs, ws, 1e-6, residual=rs)
            torch.autograd.backward([y, h], [dy, dy])
        return att, y, h, xs.grad, ws.grad

    monkeypatch.setenv("MMK_EMU_SM_COUNT", "1")
    first = run()
    monkeypatch.setenv("MMK_EMU_SCHEDULE", "reverse")
    second = run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_asan
def test_asan_sees_a_kernel_read_past_its_array(tmp_path):
    """The check below can fail: a kernel thread (a fiber) reading one element past a heap array is reported."""
    exe = _build_selftest(tmp_path, "-fsanitize=address", "-g")
    res = subprocess.run([str(exe), "read_past_the_end"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, **ASAN_ENV))
    assert res.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in res.stderr and "read_past_the_end" in res.stderr


@needs_asan
@pytest.mark.skipif(HAS_CUDA, reason="a GPU is here: csrc runs on it")
def test_csrc_stays_inside_its_memory_under_asan():
    """Every csrc op over every dtype, on exactly sized tensors, built with AddressSanitizer
    (_csrc_asan_workload.py): no read or write outside a tensor, a shared array or a thread's arrays."""
    lib = build.build(sanitize=True)
    env = dict(os.environ, LD_PRELOAD=_asan_runtime(), MMK_EMU_SM_COUNT="1", **ASAN_ENV)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, str(ROOT / "python_tests" / "_csrc_asan_workload.py"), str(lib)],
                         capture_output=True, text=True, env=env, timeout=1200)
    report = "\n".join(line for line in res.stderr.splitlines() if ASAN_FIBER_WARNING not in line)
    assert res.returncode == 0 and "AddressSanitizer" not in report, report[-6000:]
    assert res.stdout.split("\n")[:3] == ["rms_norm: 100 launches", "decode_attention: 48 launches",
                                           "paca_adamw_sync: 30 launches"], res.stdout
