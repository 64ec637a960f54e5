"""tools/compile_check.py: every Triton kernel compiles for Hopper (sm_90) and fits its limits, checked on a
machine without a GPU through Triton's own compiler and a stand-in driver. The methods are split over two
test modules (this one and test_compile_check_multimodal.py) so that two test workers share the compiling."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEXT_METHODS = "base,llama_adapter,lora,paca,qpaca_nf4,qpaca_int8"
# The GPU machines' Triton (3.6), installed beside the project's by .ci/run:
#   pip install --target .triton-gpu --no-deps triton==3.6.0
GPU_TRITON = ROOT / ".triton-gpu"
GPU_TRITON_VERSION = "3.6.0"


def run_check(*args, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py"), *args], capture_output=True,
                          text=True, env=env, timeout=1200)


def assert_compiled(proc, kernels):
    """The run passed, and each kernel was reached (a workload that fell back to the reference path would
    compile nothing)."""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "FAILED" not in proc.stdout
    for kernel in kernels:
        assert f"  {kernel} " in proc.stdout, kernel


def test_text_methods_and_generation_compile_for_hopper():
    assert_compiled(run_check("--methods", TEXT_METHODS), (
        "_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_gated_bwd_preprocess", "_decode_split", "_decode_combine",
        "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel",
        "_ce_chunk_kernel", "_gather_columns_kernel", "_delta_grad_kernel", "_adamw_sync_kernel",
        "_dequant_matmul_nn", "_dequant_matmul_nt", "_scale_bias_fwd_kernel", "_scale_bias_bwd_kernel",
        "_swiglu_scale_bias_fwd_kernel", "_swiglu_scale_bias_bwd_kernel"))


@pytest.mark.skipif(not (GPU_TRITON / "triton").is_dir(),
                    reason=f"no Triton {GPU_TRITON_VERSION} in {GPU_TRITON} (pip install --target .triton-gpu "
                           f"--no-deps triton=={GPU_TRITON_VERSION}; .ci/run does)")
def test_every_kernel_compiles_with_the_gpu_machines_triton():
    """The GPU machines run Triton 3.6: every method's kernels compile with it too, fit and do not spill (it
    allocates registers differently: tiles that were spill-free with 3.9 spilled with 3.6)."""
    path = os.pathsep.join(p for p in (str(GPU_TRITON), os.environ.get("PYTHONPATH", "")) if p)
    proc = run_check(env={"PYTHONPATH": path})
    assert f"compile_check: triton {GPU_TRITON_VERSION}," in proc.stdout, proc.stdout[:2000]
    assert_compiled(proc, ("_attn_bwd_dkdv", "_dequant_matmul_nt", "_mom_bwd_kernel", "_phm_adapter_bwd_kernel",
                           "_bwd_rows_kernel", "_decode_split", "_adamw_sync_kernel", "_ce_chunk_kernel"))


def test_a_kernel_over_the_shared_memory_limit_fails():
    """The limits are checked: with 32 KiB of shared memory per block the attention kernels do not fit."""
    proc = run_check("--methods", "", "--shared-limit", str(32 * 1024))
    assert proc.returncode == 1
    assert "OutOfResources" in proc.stdout and "compile_check FAILED" in proc.stdout


def test_a_kernel_that_spills_registers_fails():
    """Spills are checked: attention backward tiles at head_dim 128 with 4 warps (MMK_ATTN_BWD_TILES, the
    benchmark knob) make ptxas spill registers to local memory, and the check names the kernel."""
    proc = run_check("--methods", "", env={"MMK_ATTN_BWD_TILES": "32,128,4,3/128,32,4,3"})
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "_attn_bwd_dkdv" in proc.stdout and "local-memory instructions" in proc.stdout
