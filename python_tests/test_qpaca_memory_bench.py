"""benchmarks/bench_qpaca_memory.py: the CPU smoke as a script, that the smoke catches a wrong layer, a stray weight
copy and a step that learns nothing, the byte accounting against independent counts, and the GPU measurement
driven on CPU with fake memory statistics (no timing claims)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import runner  # noqa: E402
import bench_paca  # noqa: E402
import bench_qpaca_memory as bq  # noqa: E402
from mmkernels.methods import paca  # noqa: E402
from mmkernels.nn.qpaca_linear import QPaCALinear  # noqa: E402


def _tiny(kind="nf4", layers=1, seq=16, block=64):
    cfg = bq.config(layers, seq, **bq.TINY)
    pcfg = paca.PaCAConfig(rank=16, quantize=kind, block=block)
    return cfg, pcfg, bq.build(cfg, pcfg, "cpu", torch.float32)


def test_script_smoke_runs_as_a_script(tmp_path):
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(BENCH / "bench_qpaca_memory.py"), "--layers", "4", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert runner.NO_GPU_LINE in proc.stdout
    assert "smoke: qpaca_memory nf4" in proc.stdout and "smoke: qpaca_memory int8" in proc.stdout, proc.stdout
    assert not out.exists(), "nothing may be written without a GPU"
    bad = subprocess.run([sys.executable, str(BENCH / "bench_qpaca_memory.py"), "--quantize", "nf2"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--quantize" in bad.stderr, bad.stderr


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_weight_bytes_of_llama7b(kind):
    cfg = bq.config(32, 2048, **bq.SEVEN_B)
    got = bq.weight_bytes(cfg, paca.PaCAConfig(rank=16, quantize=kind), 2)
    assert got == bench_paca.llama7b_weight_bytes(f"qpaca_{kind}", 16, 2)
    # Independent count for NF4: 4 + 2*2.6875 + 2.6875 Mi-weights per layer (h^2 units) at 4.5 bits each.
    if kind == "nf4":
        h, i, r = 4096, 11008, 16
        targets = 4 * h * h + 3 * h * i
        per_layer = targets * 9 // 16 + 7 * r * 8 + (4 * h + 2 * i + h) * r * 6 + 2 * h * 2
        assert got == 32 * per_layer + 2 * 32000 * h * 2 + h * 2


# NF4 block 48 divides no layer's d_out x d_in, so every layer's last block is zero-padded
@pytest.mark.parametrize("kind,block", [("nf4", 64), ("nf4", 48), ("int8", 64)])
def test_model_bytes_match_an_independent_count(kind, block):
    cfg, pcfg, model = _tiny(kind, layers=2, block=block)
    tensors = {id(t): t for t in [*model.state_dict(keep_vars=True).values()]}
    independent = sum(t.numel() * t.element_size() for t in tensors.values()) + model._inv_freq.nbytes
    assert bq.model_bytes(model) == independent == bq.weight_bytes(cfg, pcfg, 4) + bq.rope_bytes(cfg)
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert len(paca.layers(model)) == 7 * cfg.num_hidden_layers
    # A stray copy of a target's weight is counted, and so is the whole storage behind a kept view.
    layer = model.layers[0].mlp.up_proj
    layer.stale = torch.zeros(layer.out_features, layer.in_features)
    assert bq.model_bytes(model) == independent + layer.stale.nbytes
    layer.stale = torch.zeros(4 * layer.out_features, layer.in_features)[:1]
    assert bq.model_bytes(model) == independent + 4 * layer.out_features * layer.in_features * 4


def test_optimizer_state_bytes():
    cfg, pcfg, model = _tiny()
    step, opt = bq.make_step(model, bq.make_batch(cfg, 1, 8, "cpu"), 1e-3)
    assert bq.optimizer_state_bytes(opt) == 0
    step()
    deltas = sum(p.nbytes for p in paca.adapter_parameters(model).values())
    steps = sum(st["step"].nbytes for st in opt.state.values())
    assert bq.optimizer_state_bytes(opt) == 2 * deltas + steps


def _smoke(**kw):
    return bq.smoke(steps=2, layers=1, seq=12, kinds=("nf4",), **kw)


def test_smoke_passes_and_catches_a_wrong_forward(monkeypatch):
    assert _smoke() == []
    right = QPaCALinear.forward
    monkeypatch.setattr(QPaCALinear, "forward", lambda self, x: right(self, x) * 1.01)
    failures = _smoke()
    assert len(failures) == 1 and "step-0 loss vs the dense dequantized model" in failures[0], failures


def test_smoke_catches_a_stray_weight_copy(monkeypatch):
    right = QPaCALinear.__init__

    def keeps_its_base(self, base, *args, **kw):
        right(self, base, *args, **kw)
        self.base_weight = base.weight.detach()  # a full-precision copy the build should have dropped

    monkeypatch.setattr(QPaCALinear, "__init__", keeps_its_base)
    failures = _smoke()
    assert len(failures) == 1 and "references" in failures[0], failures


def test_smoke_catches_steps_that_do_not_learn():
    failures = _smoke(lr=0.0)
    assert len(failures) == 1 and "did not lower the loss" in failures[0], failures


def test_gpu_path_plumbing_on_cpu(tmp_path, monkeypatch, capsys):
    """run() on CPU with a tiny config and fake CUDA memory statistics: one well-formed row with the verdict."""
    env = {"gpu": "Test GPU", "torch": "t", "triton": "t", "commit": "abc1234"}
    monkeypatch.setattr(runner, "HAS_CUDA", True)
    monkeypatch.setattr(runner, "env_info", lambda: dict(env))
    monkeypatch.setattr(bq, "DEVICE", "cpu")
    monkeypatch.setattr(bq, "DTYPE", torch.float32)
    monkeypatch.setattr(bq, "SEVEN_B", bq.TINY)
    monkeypatch.setattr(bq, "_settle", lambda: 1234)
    monkeypatch.setattr(bq, "_peaks_reset", lambda: None)
    peak = {"allocated": 5 * 2**30, "reserved": 13 * 2**30}
    monkeypatch.setattr(bq, "_peaks", lambda: dict(peak))
    made, make_step = [], bq.make_step

    def keep_optimizer(*args):
        step, opt = make_step(*args)
        made.append(opt)
        return step, opt

    monkeypatch.setattr(bq, "make_step", keep_optimizer)
    rc = bq.main(["--layers", "1", "--seq", "16", "--steps", "2", "--lr", "1e-2", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    (row,) = runner.read_rows(tmp_path / "test-gpu.jsonl")
    assert tuple(row)[:len(runner.ROW_KEYS)] == runner.ROW_KEYS
    assert (row["op"], row["mode"], row["provider"], row["backend"]) == ("qpaca_memory", "step",
                                                                        "mmkernels_qpaca_nf4", "reference")
    assert row["shape"] == {"layers": 1, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 96,
                            "B": 1, "T": 16, "rank": 16, "quantize": "nf4"}
    assert row["peak_mem_bytes"] == peak["allocated"] and row["peak_mem_mb"] == 5 * 1024
    assert row["target_bytes"] == 12 * 2**30 and row["fits"] is False  # 13 GiB reserved
    assert row["weight_bytes"] == row["weight_bytes_expected"] > 0 and row["weight_bytes_allocated"] == 1234
    assert row["llama7b_weight_bytes"] == bench_paca.llama7b_weight_bytes("qpaca_nf4", 16, 4)  # float32 here
    assert row["optimizer_state_bytes"] > 0 and row["tokens_per_s"] > 0 and row["ms_p50"] > 0
    assert len(row["losses"]) == 2 and row["losses"][1] < row["losses"][0]
    assert "DOES NOT FIT in 12 GiB" in printed, printed
    # the trainer's estimate of the same run: its weights are the ones the build left (the rotary frequencies are
    # a plain attribute, which the build counts and the estimate does not) and its optimizer state AdamW's moments
    est = row["estimate"]
    assert est["weights"] == row["weight_bytes"] - bq.rope_bytes(bq.config(1, 16, **bq.TINY))
    moments = sum(t.nbytes for st in made[0].state.values() for k, t in st.items() if k != "step")
    assert est["optimizer"] == moments > 0
    assert est["total"] == sum(v for k, v in est.items() if k != "total") and "estimate" in printed
