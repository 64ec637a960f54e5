"""tools/compile_check.py: every Triton kernel compiles for Hopper (sm_90) and fits its limits, checked on a
machine without a GPU through Triton's own compiler and a stand-in driver."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "tools" / "compile_check.py"), *args], capture_output=True,
                          text=True, env=env, timeout=1200)


@pytest.fixture(scope="module")
def full_run():
    return _run()


def test_every_kernel_compiles_for_hopper(full_run):
    assert full_run.returncode == 0, full_run.stdout[-4000:] + full_run.stderr[-4000:]
    out = full_run.stdout
    assert "FAILED" not in out
    # The kernels of every op family were reached (a workload that silently fell back to the reference
    # path would compile nothing).
    for kernel in ("_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_gated_bwd_preprocess", "_decode_split",
                   "_decode_combine", "_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel",
                   "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_ce_chunk_kernel", "_gather_columns_kernel",
                   "_delta_grad_kernel", "_adamw_sync_kernel", "_dequant_matmul_nn", "_dequant_matmul_nt",
                   "_mom_fwd_kernel", "_mom_bwd_kernel", "_phm_adapter_fwd_kernel", "_phm_adapter_bwd_kernel",
                   "_fwd_kernel", "_bwd_rows_kernel", "_bwd_weights_kernel"):
        assert f"  {kernel} " in out, kernel


def test_a_kernel_over_the_shared_memory_limit_fails():
    """The limits are checked: with 32 KiB of shared memory per block the attention kernels do not fit."""
    proc = _run("--methods", "base", "--shared-limit", str(32 * 1024))
    assert proc.returncode == 1
    assert "OutOfResources" in proc.stdout and "compile_check FAILED" in proc.stdout
