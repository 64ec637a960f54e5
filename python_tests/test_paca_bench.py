"""benchmarks/bench_paca.py and bench_paca_step.py: the CPU smoke of each script, that the smokes catch a wrong
layer, the weight-byte and FLOP formulas, and the GPU case loop driven on CPU with a fake clock (no timing)."""

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
from _fake_gpu import fake_gpu  # noqa: E402
import bench_paca  # noqa: E402
import bench_paca_step  # noqa: E402



def _cpu_main(module, tmp_path, monkeypatch, capsys):
    """The script's main() on its CPU path (also on a GPU machine), in this process: the smokes import
    transformers and PEFT once here instead of once per subprocess."""
    monkeypatch.setattr(runner, "HAS_CUDA", False)
    out = tmp_path / "results"
    rc = module.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert runner.NO_GPU_LINE in printed
    assert not out.exists(), "nothing may be written without a GPU"
    return printed


@pytest.mark.parametrize("name", ["bench_paca.py", "bench_paca_step.py"])
def test_scripts_run_as_scripts(name):
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    bad = subprocess.run([sys.executable, str(BENCH / name), "--providers", "nope"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown provider" in bad.stderr, bad.stderr


def test_bench_paca_smoke_on_cpu(tmp_path, monkeypatch, capsys):
    out = _cpu_main(bench_paca, tmp_path, monkeypatch, capsys)
    for checked in ("mmkernels_paca_r16[triton]", "mmkernels_paca_r8[reference]", "mmkernels_qpaca_nf4[triton]",
                    "mmkernels_qpaca_int8[triton]", "mmkernels_lora_r8", "mmkernels_lora_r16"):
        assert checked in out, out


def test_bench_paca_step_smoke_on_cpu(tmp_path, monkeypatch, capsys):
    out = _cpu_main(bench_paca_step, tmp_path, monkeypatch, capsys)
    assert "paca[triton]" in out and "against transformers (step 0) and PEFT LoRA (every step)" in out, out


def _one_smoke_shape(monkeypatch):
    monkeypatch.setattr(bench_paca, "SMOKE_SHAPES", bench_paca.SMOKE_SHAPES[:1])


def test_paca_smoke_catches_a_wrong_delta_gradient(monkeypatch):
    from mmkernels.ops import paca as paca_ops

    _one_smoke_shape(monkeypatch)
    monkeypatch.setattr(runner, "MODES", ("fwd",))  # the closures are not what this test is about
    right = paca_ops.ref.delta_grad
    monkeypatch.setattr(paca_ops.ref, "delta_grad", lambda dy, x_i, s: right(dy, x_i, s) * 1.001)
    failures = bench_paca.smoke()
    assert failures and all("[reference] grad of delta" in f for f in failures), failures


def test_paca_smoke_catches_a_wrong_forward_and_a_wrong_lora(monkeypatch):
    from mmkernels.nn.lora_linear import LoRALinear
    from mmkernels.nn.qpaca_linear import QPaCALinear

    _one_smoke_shape(monkeypatch)
    monkeypatch.setattr(runner, "MODES", ("fwd",))  # the closures are not what this test is about
    qpaca_fwd, lora_fwd = QPaCALinear.forward, LoRALinear.forward
    monkeypatch.setattr(QPaCALinear, "forward", lambda self, x: qpaca_fwd(self, x) * 1.001)
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x: lora_fwd(self, x) * 1.001)
    failures = bench_paca.smoke()
    for what in ("mmkernels_qpaca_nf4[reference] output", "mmkernels_qpaca_int8[triton] grad of x",
                 "mmkernels_qpaca_nf4[triton] grad of delta", "mmkernels_lora_r8 vs peft output",
                 "mmkernels_lora_r16 vs peft grads"):
        assert any(what in f for f in failures), (what, failures)
    assert not any("paca_r" in f for f in failures), failures  # PaCALinear itself was left alone


def test_step_smoke_catches_a_wrong_lora_a_wrong_paca_forward_and_a_wrong_paca_update(monkeypatch):
    from mmkernels.nn.lora_linear import LoRALinear
    from mmkernels.nn.paca_linear import PaCALinear
    from mmkernels.ops import paca as paca_ops

    lora_fwd, paca_fwd, sync = LoRALinear.forward, PaCALinear.forward, paca_ops.ref.sync_columns
    # A uniform 0.1% gain is nearly absorbed by the RMSNorms at step 0; the next step's loss shows it.
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x: lora_fwd(self, x) * 1.001)
    monkeypatch.setattr(PaCALinear, "forward", lambda self, x: paca_fwd(self, x) + 0.01)
    # A column sync that scales delta wrongly: only the unfused optimizer goes through sync_columns (the fused
    # one writes the columns itself), so the two PaCA runs part after the first step.
    monkeypatch.setattr(paca_ops.ref, "sync_columns", lambda w, o, d, i, s: sync(w, o, d, i, 1.5 * s))
    failures = bench_paca_step.smoke(backends=["reference"])
    for what in ("mmkernels LoRA vs PEFT LoRA losses", "paca[reference] step-0 loss vs transformers",
                 "paca[reference, torch AdamW + sync] vs paca[reference] losses"):
        assert any(what in f for f in failures), (what, failures)
    assert not any(" peft step-0" in f or " lora step-0" in f for f in failures), failures


def test_layer_bytes_formulas():
    d, r = 4096, 16
    assert bench_paca.layer_bytes("frozen", None, d, d) == d * d * 2
    assert bench_paca.layer_bytes("paca", r, d, d) == d * d * 2 + d * r * (2 + 4) + r * 8
    assert bench_paca.layer_bytes("qpaca_nf4", r, d, d) == d * d // 2 + (d * d // 64) * 4 + d * r * (2 + 4) + r * 8
    assert bench_paca.layer_bytes("qpaca_int8", r, d, d) == d * d + d * 4 + d * r * (2 + 4) + r * 8
    assert bench_paca.layer_bytes("lora", 8, d, d) == (d + 8) * d * 2 + d * 8 * 2
    assert bench_paca.layer_bytes("peft_lora", 8, d, d) == d * d * 2 + 2 * d * 8 * 4
    # LLaMA-7B: 6.74e9 parameters in bf16 are 12.55 GiB; an NF4 base (4.5 bits per weight) leaves ~3.9 GiB.
    assert bench_paca.llama7b_weight_bytes("frozen") == 6_738_415_616 * 2
    assert 3.7 * 2**30 < bench_paca.llama7b_weight_bytes() < 4.1 * 2**30
    with pytest.raises(ValueError, match="kind"):
        bench_paca.layer_bytes("dora", 8, d, d)


@pytest.mark.parametrize("provider", bench_paca.PROVIDERS)
def test_layer_bytes_match_the_modules(provider):
    kind, r, _ = bench_paca.parse_provider(provider)
    shape = bench_paca._shape(128, 64, b=1, t=1)
    case = bench_paca.make_case(provider, shape, torch.bfloat16, torch.device("cpu"))
    assert bench_paca.module_bytes(case.layer) == bench_paca.layer_bytes(kind, r, 128, 64)


def test_provider_names_and_flops():
    assert bench_paca.parse_provider("mmkernels_paca_r8:triton") == ("paca", 8, "triton")
    assert bench_paca.parse_provider("mmkernels_qpaca_int8") == ("qpaca_int8", 16, None)
    assert bench_paca.parse_provider("peft_lora_r16") == ("peft_lora", 16, None)
    assert bench_paca.parse_provider("frozen") == ("frozen", None, None)
    for bad in ("peft_lora_r8:triton", "paca_r4"):
        with pytest.raises(runner.Unavailable):
            bench_paca.parse_provider(bad)
    one = 2.0 * 8 * 2048 * 4096 * 4096
    assert bench_paca.flops(bench_paca.TARGET, "fwd") == one == bench_paca.flops(bench_paca.TARGET, "bwd")
    assert bench_paca.flops(bench_paca.TARGET, "fwd+bwd") == 2 * one
    n = 2 * 2048
    linear = 2.0 * n * 2 * (4 * 4096**2 + 3 * 4096 * 11008) + 2.0 * n * 4096 * 32000
    attn = 2 * 2.0 * 2 * 32 * 2048**2 * 128
    assert bench_paca_step.flops(bench_paca_step.TARGET) == 2 * linear + 3.5 * attn


def _check_rows(tmp_path, op, expected):
    rows = runner.read_rows(tmp_path / "test-gpu.jsonl")
    assert [r["op"] for r in rows[:2]] == ["copy", "matmul"]
    got = {(r["provider"], r["mode"]) for r in rows[2:]}
    assert got == expected
    for r in rows[2:]:
        assert tuple(r) == runner.ROW_KEYS and r["op"] == op and r["ms_p50"] == 1.0 and r["tflops"] > 0
    return rows[2:]


def test_paca_case_loop_plumbing_on_cpu(tmp_path, monkeypatch, capsys):
    """Drives bench_paca's GPU branch on CPU with a tiny shape and a fake clock: every provider x mode case
    builds, runs and writes a well-formed row."""
    fake_gpu(monkeypatch, runner)
    monkeypatch.setattr(bench_paca, "PRESETS", {"default": bench_paca.SMOKE_SHAPES[:1]})
    rc = bench_paca.main(["--out", str(tmp_path), "--quick", "--dtype", "fp32"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = _check_rows(tmp_path, "paca_linear", {(p, m) for p in bench_paca.PROVIDERS for m in runner.MODES})
    backends = {r["provider"]: r["backend"] for r in rows}
    assert backends["mmkernels_paca_r16"] == "reference" and backends["mmkernels_qpaca_nf4"] == "reference"
    assert backends["frozen"] is None and backends["peft_lora_r8"] is None
    assert "LLaMA-7B weights under QPaCA-NF4" in printed and "weights (MiB):" in printed


def test_step_case_loop_plumbing_on_cpu(tmp_path, monkeypatch, capsys):
    fake_gpu(monkeypatch, runner)
    monkeypatch.setattr(bench_paca_step, "PRESETS", {"default": [bench_paca_step.SMOKE_SHAPE]})
    rc = bench_paca_step.main(["--out", str(tmp_path), "--quick", "--dtype", "fp32"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    _check_rows(tmp_path, "paca_step", {(p, "step") for p in bench_paca_step.PROVIDERS})
    assert "trainable parameters" in printed
