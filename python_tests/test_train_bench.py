"""benchmarks/bench_train_step.py: the CPU smoke of the script, that the smoke catches a wrong loss, a wrong
prompt path and a checkpointed path that differs, the providers' trainable parameters and dtypes, the FLOP and
tokens/s formulas, the depth extrapolation, and the GPU case loop driven on CPU with a fake clock (no timing)."""

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
import bench_train_step as bts  # noqa: E402

CPU = torch.device("cpu")


def test_script_runs_as_a_script():
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    bad = subprocess.run([sys.executable, str(BENCH / "bench_train_step.py"), "--providers", "nope"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown provider" in bad.stderr, bad.stderr


def test_smoke_on_cpu(tmp_path, monkeypatch, capsys):
    """main() on its CPU path (also on a GPU machine), in this process."""
    monkeypatch.setattr(runner, "HAS_CUDA", False)
    out = tmp_path / "results"
    rc = bts.main(["--quick", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert runner.NO_GPU_LINE in printed
    assert not out.exists(), "nothing may be written without a GPU"
    for checked in ("v2[reference]", "v2[triton]", "v2_ckpt[reference]", "v2_attn[reference]", "peft,",
                    "v2 in PEFT's form",
                    "against transformers (step 0) and PEFT AdaptionPrompt (every step)"):
        assert checked in printed, (checked, printed)
    for provider in bts.PROVIDERS:
        assert f"traced at 32 layers (estimate): {provider} peak" in printed, printed


def test_traced_peak_is_the_trace_of_the_providers_step():
    """traced_peak_bytes on a tiny shape: weights, three copies of the trainable parameters (gradient, two
    moments) and the step's traced peak, which on the meta device is the step's peak on CPU tensors; a
    checkpointed V2 step peaks lower than the plain one."""
    from mmkernels.train import memory

    shape = dict(bts.SMOKE_SHAPE, T=64, layers=3)
    for provider in bts.PROVIDERS:
        case = bts.make_case(provider, shape, torch.float32, CPU)
        ids = runner.step_ids(shape, CPU)
        peak = memory.trace_step(lambda: case.loss_fn(ids), case.model, [ids])
        held = sum(t.nbytes for t in [*case.model.parameters(), *case.model.buffers()])
        trainable = sum(p.nbytes for p in case.model.parameters() if p.requires_grad)
        assert bts.traced_peak_bytes(provider, shape, torch.float32) == held + 3 * trainable + peak.total, provider
    forced = bts.traced_peak_bytes("mmkernels_v2:triton", shape, torch.float32)  # on a GPU: the row's trace
    assert forced == bts.traced_peak_bytes("mmkernels_v2", shape, torch.float32)
    v2, part, ckpt = (bts.traced_peak_bytes(p, shape, torch.float32)
                      for p in ("mmkernels_v2", "mmkernels_v2_ckpt3of4", "mmkernels_v2_ckpt"))
    assert ckpt < v2 and part not in (ckpt, v2)  # at this size the partial one's peak need not lie between


def test_smoke_catches_a_wrong_loss_and_a_checkpointed_path_that_differs(monkeypatch):
    from mmkernels.models import llama
    from mmkernels.train import trainer

    loss_sum, checkpoint = trainer.token_loss_sum, llama.checkpoint
    monkeypatch.setattr(trainer, "token_loss_sum", lambda *a, **k: loss_sum(*a, **k) * 1.001)

    def wrong_checkpoint(block, *args, **kw):  # only the recomputed blocks see it
        x, residual = checkpoint(block, *args, **kw)
        return x * 1.01, residual  # 0.1% of a block's output moves the loss by less than the smoke tolerance

    monkeypatch.setattr(llama, "checkpoint", wrong_checkpoint)
    failures = bts.smoke(steps=2, backends=["reference"])
    for what in ("v2[reference] step-0 loss vs transformers", "v2_ckpt[reference] vs v2[reference] losses",
                 f"{bts.PARITY_OURS} vs {bts.PARITY_PEFT} losses"):
        assert any(what in f for f in failures), (what, failures)
    assert not any("peft step-0" in f or "PEFT's form step-0" in f for f in failures), failures


def test_smoke_catches_a_wrong_prompt_path(monkeypatch):
    """Zero-init gates hide the prompt path at step 0 from the checks against transformers; the parity pair's
    nonzero gates show it."""
    from mmkernels.methods import llama_adapter

    project = llama_adapter.AdaptionPrompt._project

    def wrong_project(self, attn, tokens, dtype):
        seg = project(self, attn, tokens, dtype)
        return seg._replace(v=seg.v * 1.01)

    monkeypatch.setattr(llama_adapter.AdaptionPrompt, "_project", wrong_project)
    failures = bts.smoke(steps=2, backends=["reference"])
    assert failures and all(f"{bts.PARITY_OURS} vs {bts.PARITY_PEFT} losses" in f for f in failures), failures


def test_parity_catches_a_wrong_norm_weight_gradient(monkeypatch):
    """A gradient off by a factor on some channels: AdamW's per-element normalisation would hide it; the
    parity pair's SGD steps do not."""
    import importlib

    rms_ops = importlib.import_module("mmkernels.ops.rms_norm")  # mmkernels.ops.rms_norm is also a function
    ids = runner.step_ids(bts.SMOKE_SHAPE, CPU)
    ours, peft = bts.parity_losses(bts.SMOKE_SHAPE, ids, steps=2)
    assert runner.compare_losses("parity", ours, peft) is None and peft[1] < peft[0] - 0.1, (ours, peft)
    right = rms_ops.ref.rms_norm_backward

    def wrong(dy, h, w, rstd, dh_extra=None):
        dh, dw = right(dy, h, w, rstd, dh_extra)
        return dh, torch.cat([dw[: len(dw) // 2] * 1.5, dw[len(dw) // 2:]])

    monkeypatch.setattr(rms_ops.ref, "rms_norm_backward", wrong)
    bad, _ = bts.parity_losses(bts.SMOKE_SHAPE, ids, steps=2)
    assert bad[0] == ours[0] and runner.compare_losses("parity", bad, peft) is not None, (bad, peft)


def _trainable(case):
    return {n: p for n, p in case.model.named_parameters() if p.requires_grad}


def test_providers_train_v2_and_its_peft_equivalent():
    """bf16 frozen weights; ours: float32 prompts, per-head gates, bias/scale of the seven linears and norms;
    PEFT: its prompts and scalar gates, transformers' linear biases and norms, in bf16."""
    s = bts.SMOKE_SHAPE
    layers, hid, inter, lp = s["layers"], s["hidden"], s["intermediate"], s["L_p"]
    kv = s["H_kv"] * hid // s["H"]
    outs = 2 * hid + 2 * kv + 2 * inter + hid  # q, o, k, v, gate, up, down
    norms = (2 * layers + 1) * hid
    for provider in ("mmkernels_v2", "mmkernels_v2_ckpt", "mmkernels_v2_ckpt3of4", "mmkernels_v2_attn"):
        case = bts.make_case(provider, s, torch.bfloat16, CPU)
        params = _trainable(case)
        assert case.trainable() == layers * (lp * hid + s["H"] + 2 * outs) + norms
        assert {p.dtype for p in params.values()} == {torch.float32}
        frozen = {p.dtype for p in case.model.parameters() if not p.requires_grad}
        assert frozen == {torch.bfloat16}
        assert case.model.gradient_checkpointing == ("_ckpt" in provider)
        assert case.model.checkpoint_blocks == (3 * layers // 4 if provider.endswith("3of4") else None)
        assert case.model.recompute_attention == provider.endswith("_attn")
        assert case.model.layers[0].self_attn.prompt.gate_fn == "tanh" and case.backend == "reference"
    peft = bts.make_case("peft_adaption_prompt", s, torch.bfloat16, CPU)
    params = _trainable(peft)
    assert peft.trainable() == layers * (lp * hid + 1 + outs) + norms
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert sum(n.endswith("_proj.bias") for n in params) == 7 * layers
    assert sum(n.endswith("adaption_gate") for n in params) == layers
    with pytest.raises(runner.Unavailable, match="only 'mmkernels_\\*' providers"):
        bts.make_case("peft_adaption_prompt:triton", s, torch.float32, CPU)
    with pytest.raises(runner.Unavailable, match="unknown provider"):
        bts.make_case("mmkernels_v1", s, torch.float32, CPU)


def test_flops_and_tokens_per_s():
    n, h, d, t = 2048, 32, 128, 2048
    linear = 2.0 * n * 4 * (4 * 4096**2 + 3 * 4096 * 11008) + 2.0 * n * 4096 * 32000
    attn = 4 * (2.0 * h * t * t * d + 4.0 * h * t * 10 * d)
    assert bts.flops(bts.TARGET) == 2 * linear + 3.5 * attn
    assert bts.TARGET["H_kv"] == 32 and bts.TARGET["B"] == 1 and bts.TARGET["layers"] == 4
    assert bts.tokens_per_s(bts.TARGET, 250.0) == pytest.approx(2048 / 0.25)


def _row(provider, layers, ms, mb):
    return {"provider": provider, "shape": dict(bts.TARGET, layers=layers), "ms_p50": ms, "peak_mem_mb": mb}


def test_depth_summary_extrapolates_per_layer_costs():
    rows = [_row("mmkernels_v2", 4, 100.0, 3000.0), _row("peft_adaption_prompt", 4, 150.0, 4000.0),
            _row("mmkernels_v2", 8, 180.0, 4000.0), _row("peft_adaption_prompt", 8, 290.0, 6000.0),
            _row("mmkernels_v2_ckpt", 4, 120.0, 2500.0)]  # one depth only: no line
    lines = bts.depth_summary(rows)
    assert len(lines) == 2
    # ours: 20 ms, 250 MiB per layer -> 660 ms, 10000 MiB at 32; PEFT: 35 ms, 500 MiB -> 1130 ms, 18000 MiB
    assert lines[0].startswith("mmkernels_v2: 20.00 ms and 250 MiB per layer") and "660.0 ms" in lines[0]
    assert "peak 10000 MiB" in lines[0] and "vs PEFT 1.71x tokens/s, 0.56x peak memory" in lines[0]
    assert "1130.0 ms" in lines[1] and "peak 18000 MiB" in lines[1] and "vs PEFT" not in lines[1]
    assert bts.depth_summary(rows[:2]) == []


def test_case_loop_plumbing_on_cpu(tmp_path, monkeypatch, capsys):
    """The GPU branch on CPU with a tiny shape at two depths and a fake clock: each case builds, steps and writes
    a well-formed row; the depth summary is printed. (mmkernels_v2_ckpt differs from mmkernels_v2 only by the
    flag that test_providers_train_v2_and_its_peft_equivalent checks.)"""

    fake_gpu(monkeypatch, runner)
    shapes = [dict(bts.SMOKE_SHAPE, layers=1), bts.SMOKE_SHAPE]
    monkeypatch.setattr(bts, "PRESETS", {"default": shapes})
    providers = ("mmkernels_v2", "peft_adaption_prompt")
    rc = bts.main(["--out", str(tmp_path), "--dtype", "fp32", "--providers", ",".join(providers)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = runner.read_rows(tmp_path / "test-gpu.jsonl")
    assert [r["op"] for r in rows[:2]] == ["copy", "matmul"]
    assert [(r["shape"]["layers"], r["provider"]) for r in rows[2:]] == [(s["layers"], p) for s in shapes
                                                                         for p in providers]
    for r in rows[2:]:
        assert tuple(r) == runner.ROW_KEYS and r["op"] == "train_step" and r["mode"] == "step"
        assert r["ms_p50"] == 1.0 and r["tflops"] == pytest.approx(bts.flops(r["shape"]) / 1e-3 / 1e12)
        assert r["backend"] == (None if r["provider"].startswith("peft") else "reference")
    assert "trainable parameters" in printed and "tokens/s" in printed
    assert "mmkernels_v2: 0.00 ms and 0 MiB per layer" in printed
