"""csrc/: every .cu compiles for Hopper with nvcc (no GPU needed), the binding file is valid C++ against
torch's headers, the pure-Python install path is taken on a CPU torch, and the CUDA kernels match the
reference: on a GPU, and on the CPU through tools/cuda_emu (the `csrc_device` fixture)."""

import glob
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import mmkernels
from mmkernels import ops
from _harness import check_against_reference
from _tolerance import FLOORS, assert_close_to_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))


def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return os.path.join(c, "include")
    return None


def test_there_are_cuda_sources():
    assert CU_FILES, "csrc/ has no .cu files"


# rms_norm kernels with ITERS >= 4 (more than 2 x 1024 packs per row: hidden > 16384 in 16-bit, > 8192 in fp32)
# hold 4+ packs of each of three arrays per thread under the 64 registers of 1024-thread blocks, and spill.
_SPILL_ALLOWED = re.compile(r"rms_norm_(fwd|bwd)_kernel.*Li[48]EEEv")


def _spill_stores(ptxas_report: str):
    """[(function, spill store bytes)] from ptxas -v ("Function properties for NAME", then its spill line)."""
    entries, name = [], None
    for line in ptxas_report.splitlines():
        props = re.search(r"Function properties for (\w+)", line)
        spill = re.search(r"(\d+) bytes spill stores", line)
        if props:
            name = props.group(1)
        elif spill and name:
            entries.append((name, int(spill.group(1))))
    return entries


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("path", CU_FILES, ids=[os.path.basename(p) for p in CU_FILES])
def test_cu_compiles_for_sm90_without_spills(path, tmp_path):
    """No warnings, and ptxas's report for every kernel instantiation shows no spill stores beyond 8 bytes
    (local memory in the inner loops), except the rms_norm widths past every LLaMA's (_SPILL_ALLOWED)."""
    res = subprocess.run(
        ["nvcc", "-arch=sm_90", "-std=c++17", "-O2", "-Werror", "all-warnings", "-Xptxas", "-v", "-c", path,
         "-o", str(tmp_path / "out.o")],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr.lower(), res.stderr
    entries = _spill_stores(res.stderr)
    assert entries, res.stderr[-2000:]
    # Up to 8 bytes (two registers parked once; decode_split's fp16 and fp32 instantiations) are tolerated.
    spilling = [(name, n) for name, n in entries if n > 8 and not _SPILL_ALLOWED.search(name)]
    assert not spilling, spilling


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and CUDA headers")
def test_bindings_are_valid_cpp(tmp_path):
    """The binding cannot be built against a CPU torch, but it can be parsed against torch's headers.
    The one header a CPU wheel lacks (generated at torch's CUDA build) is supplied empty."""
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", f"-I{tmp_path}", f"-I{os.path.join(ROOT, 'csrc')}",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", f"-I{_cuda_include()}",
           os.path.join(ROOT, "csrc", "bindings.cpp")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "bindings.cpp" not in res.stderr, res.stderr[-4000:]  # no warning in our own file


def _setup_plan(env_value):
    code = ("import sys, runpy; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    env = dict(os.environ, MMK_BUILD_CUDA=env_value)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-torch install path")
def test_setup_skips_cuda_build_on_cpu_torch():
    res = _setup_plan("auto")
    assert res.returncode == 0, res.stderr
    assert res.stderr.count("CUDA extension skipped") == 1 and "is a CPU build" in res.stderr
    forced = _setup_plan("1")
    assert forced.returncode != 0 and "MMK_BUILD_CUDA=1 but the CUDA extension cannot be built" in forced.stderr
    bad = _setup_plan("yes")
    assert bad.returncode != 0 and "MMK_BUILD_CUDA: expected one of auto, 0, 1" in bad.stderr


# Rows per shape on a GPU; the emulation (tools/cuda_emu: a fiber per CUDA thread) takes at most 5 of them
# with MMK_EMU_SM_COUNT=1, so the backward's grid-stride loop over rows still runs (2 blocks of 1024 threads).
EMULATED_ROWS = 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(1, 17), (333, 4095), (333, 4096), (64, 8192)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_cuda_rms_norm_matches_reference(csrc_device, monkeypatch, dtype, rows, cols, with_residual):
    if csrc_device.type == "cpu":
        rows = min(rows, EMULATED_ROWS)
        monkeypatch.setenv("MMK_EMU_SM_COUNT", "1")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, cols, generator=gen).to(csrc_device).requires_grad_()
    w = (1 + 0.5 * torch.randn(cols, generator=gen)).to(csrc_device).requires_grad_()
    if with_residual:
        r = torch.randn(rows, cols, generator=gen).to(csrc_device).requires_grad_()
        fn, inputs = (lambda x, w, r: ops.rms_norm(x, w, 1e-6, residual=r)), [x, w, r]
    else:
        fn, inputs = (lambda x, w: ops.rms_norm(x, w, 1e-6)), [x, w]
    check_against_reference(fn, inputs, backend="cuda", dtype=dtype, name=f"cuda rms_norm {rows}x{cols}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_rms_norm_float32_weight_and_widest_rows(csrc_device, dtype):
    """A 16-bit x with a float32 weight (a bf16 model's norms with float32 masters), at rows of 4096 and
    65536 (8 vectors per thread, the widest the kernel holds): against the reference in the same dtypes and
    in float64."""
    gen = torch.Generator().manual_seed(1)
    for rows, cols in ((3, 4096), (2, 65536)):
        x = torch.randn(rows, cols, generator=gen).to(dtype)
        w = 1 + 0.5 * torch.randn(cols, generator=gen)
        dy = torch.randn(rows, cols, generator=gen).to(dtype)
        results = []
        for name, xd, wd in (("cuda", x, w), ("reference", x, w), ("reference", x.double(), w.double())):
            xd = xd.to(csrc_device).requires_grad_()
            wd = wd.to(csrc_device).requires_grad_()
            with mmkernels.use_backend(name):
                y = ops.rms_norm(xd, wd, 1e-6)
                y.backward(dy.to(csrc_device, y.dtype))
            results.append((y, xd.grad, wd.grad))
        for i, what in enumerate(("y", "dx", "dw")):
            actual, low, high = (r[i].cpu() for r in results)
            floor = FLOORS[actual.dtype] * math.sqrt(rows) if what == "dw" else None
            assert_close_to_reference(actual, low, high, f"rms_norm {rows}x{cols} {dtype} {what}", floor=floor)


def test_cuda_rms_norm_misaligned_wide_rows(csrc_device):
    """Rows of more than 8192 elements are only read as 16-byte vectors, so a contiguous operand at a
    misaligned address (a view at an odd offset) is copied to aligned memory first; the launch refused it
    ("invalid argument") before, and the automatic choice sent such rows there."""
    n, gen = 16384, torch.Generator().manual_seed(2)

    def odd_view(rows):  # contiguous, 2 bytes past a 16-byte boundary
        return torch.randn(rows * n + 1, generator=gen).half().to(csrc_device)[1:].view(rows, n)

    x, residual, dy, extra = odd_view(3), odd_view(3), odd_view(3), odd_view(3)
    w = torch.randn(n, generator=gen).to(csrc_device)
    assert x.is_contiguous() and x.data_ptr() % 16 == 2
    op = torch.ops.mmkernels_C
    y, h, rstd = op.rms_norm_fwd(x, residual, w, 1e-6)
    y_ref, h_ref, rstd_ref = op.rms_norm_fwd(x.clone(), residual.clone(), w, 1e-6)
    assert torch.equal(y, y_ref) and torch.equal(h, h_ref) and torch.equal(rstd, rstd_ref)
    dh, dw = op.rms_norm_bwd(dy, odd_view(3).copy_(h), w, rstd, extra)
    dh_ref, dw_ref = op.rms_norm_bwd(dy.clone(), h, w, rstd, extra.clone())
    assert torch.equal(dh, dh_ref) and torch.equal(dw, dw_ref)
    with mmkernels.use_backend("reference"):
        expected = ops.rms_norm(x.float(), w, 1e-6, residual=residual.float())[0]
    torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=2e-3)


def test_the_cuda_backend_inside_a_model(csrc_device, monkeypatch):
    """The automatic backend choice sends a model's calls to csrc where a kernel serves them (every RMSNorm,
    decoding at head dim 64, PaCA's fused step): LLaMA-Adapter V1 generation of a left-padded batch gives
    the reference backend's tokens, and two PaCA training steps its losses and deltas."""
    from mmkernels import backend
    from mmkernels.methods import llama_adapter as la, paca
    from mmkernels.models import Llama, LlamaConfig

    used = set()
    real_ops = backend.cuda_ops

    class Recorder:
        def __getattr__(self, name):
            used.add(name)
            return getattr(real_ops(), name)

    monkeypatch.setattr(backend, "cuda_ops", Recorder)
    cfg = LlamaConfig(vocab_size=61, hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)

    def model(method):
        torch.manual_seed(0)
        m = Llama(cfg)
        if method == "llama_adapter":
            la.apply(m, la.LlamaAdapterConfig(version=1, prompt_len=3, prompt_layers=2, gate_init=0.5))
            with torch.no_grad():
                for p in la.adapter_parameters(m).values():
                    p.normal_(0, 0.5)
        else:
            paca.apply(m, paca.PaCAConfig(rank=4, seed=1))
        return m.to(csrc_device)

    prompts = [[5, 9, 2, 33, 7, 1, 8], [4, 4], [60, 3, 17, 9]]
    runs = {}
    for name in (None, "reference"):
        with mmkernels.use_backend(name), torch.no_grad():
            runs[name] = model("llama_adapter").eval().generate(prompts, max_new_tokens=6, pad_id=0)
    assert runs[None] == runs["reference"]
    assert {"rms_norm_fwd", "decode_attention"} <= used

    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1)).to(csrc_device)
    for name in (None, "reference"):
        with mmkernels.use_backend(name):
            m = model("paca")
            opt = paca.fused_optimizer(m, [{"params": list(paca.adapter_parameters(m).values())}], lr=1e-2)
            losses = []
            for _ in range(2):
                logits = m(ids[:, :-1])
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            runs[name] = (losses, [d.detach().cpu() for d in paca.adapter_parameters(m).values()])
    assert {"rms_norm_bwd", "paca_adamw_sync"} <= used
    torch.testing.assert_close(runs[None][0], runs["reference"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[None][1], runs["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_cuda_rms_norm_errors(csrc_device):
    x = torch.randn(4, 8, device=csrc_device)
    with pytest.raises(RuntimeError, match=r"weight: expected shape \(8\)"):
        torch.ops.mmkernels_C.rms_norm_fwd(x, None, torch.ones(7, device=csrc_device), 1e-6)
    with pytest.raises(RuntimeError, match="x: expected a contiguous tensor"):
        torch.ops.mmkernels_C.rms_norm_fwd(x.t(), None, torch.ones(4, device=csrc_device), 1e-6)


def test_cuda_decode_attention_errors(csrc_device):
    op = torch.ops.mmkernels_C.decode_attention
    dev = csrc_device
    q, kv = torch.randn(2, 1, 4, 64, device=dev), torch.randn(2, 9, 2, 64, device=dev)
    with pytest.raises(RuntimeError, match="q: expected head dim 64 or 128 for the CUDA decode_attention kernel, got 48"):
        op(q[..., :48], kv[..., :48], kv[..., :48], None, None, None, None, 0.125, True)
    with pytest.raises(RuntimeError, match="q: expected 1 to 16 new queries"):
        op(torch.randn(2, 17, 4, 64, device=dev), kv, kv, None, None, None, None, 0.125, True)
    with pytest.raises(RuntimeError, match="k: expected the last dim contiguous"):
        op(q, kv.transpose(1, 3).contiguous().transpose(1, 3), kv, None, None, None, None, 0.125, True)
    with pytest.raises(RuntimeError, match=r"v: expected dtype Half \(that of q\)"):
        op(q.half(), kv.half(), kv, None, None, None, None, 0.125, True)
    with pytest.raises(RuntimeError, match="prompt_k, prompt_v, gate: expected all three or none, got 1"):
        op(q, kv, kv, kv[:1, :3], None, None, None, 0.125, True)
    pk = kv[:1, :3]
    with pytest.raises(RuntimeError, match=r"gate: expected shape \(4\) or \(1\), got \[3\]"):
        op(q, kv, kv, pk, pk, torch.zeros(3, device=dev), None, 0.125, True)
    with pytest.raises(RuntimeError, match="gate: expected dtype float32"):
        op(q, kv, kv, pk, pk, torch.zeros(4, device=dev, dtype=torch.float16), None, 0.125, True)
    with pytest.raises(RuntimeError, match="kv_start: expected dtype int32"):
        op(q, kv, kv, None, None, None, torch.zeros(2, device=dev, dtype=torch.int64), 0.125, True)
    with pytest.raises(RuntimeError, match=r"kv_start: expected shape \(2\), got \[3\]"):
        op(q, kv, kv, None, None, None, torch.zeros(3, device=dev, dtype=torch.int32), 0.125, True)
