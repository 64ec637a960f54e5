"""Data-parallel training on CPU: 2 processes with the gloo backend (torchrun), under DDP and FSDP2.

Each rank reads half of every global batch; the adapters must end identical on both ranks and equal to a
single process trained on the whole global batch.
"""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

COMMON = ["--vision", "tiny", "--demo-samples", "32", "--demo-eval-samples", "8", "--max-steps", "3",
          "--no-progress", "--max-len", "160", "--warmup-steps", "1", "--max-grad-norm", "0", "--no-fused-loss"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out, *extra, nproc=1):
    if nproc == 1:
        cmd = [sys.executable, "-m", "mmkernels.cli", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "mmkernels.cli", "train"]
    proc = subprocess.run([*cmd, *COMMON, "--out-dir", str(out), *extra], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), json.load(open(out / "summary.json"))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("single"), "--batch-size", "8")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_global_batch(tmp_path, single, mode):
    ref, ref_summary = single
    got, summary = _train(tmp_path, "--batch-size", "4", "--distributed", mode, nproc=2)
    assert summary["world_size"] == 2
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=2e-5, atol=2e-6, msg=name)
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], rel=1e-5)


def test_ranks_hold_identical_adapters(tmp_path):
    """The trainer compares every rank's trainable parameters with rank 0's at the end of a run."""
    _, summary = _train(tmp_path, "--batch-size", "4", "--distributed", "ddp", nproc=2)
    assert summary["rank_max_diff"] == 0.0
