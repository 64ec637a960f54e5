"""The benchmark scripts: CPU smoke path, row arithmetic, JSON-lines output, commit helper, plot grouping.

No timing happens here: the scripts are run with CUDA hidden, where they only run their correctness
smoke. Rows built below use made-up milliseconds to check arithmetic; they are written to tmp_path only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import runner  # noqa: E402
from _fake_gpu import ENV, fake_gpu  # noqa: E402
import plot  # noqa: E402

NO_GPU = "no GPU: timings are measured only on a GPU; correctness smoke passed"


def _cpu_env():
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke path, even on a GPU machine
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself
    env.pop("MMK_BACKEND", None)
    return env


# Scripts whose op's Triton kernel module is not in the tree yet: skipped until it is (the smoke runs the
# triton backend through the interpreter and would fail on the missing module).
NEEDS = {"attention": REPO / "mmkernels" / "ops" / "attention.py",
         "decode_attention": REPO / "mmkernels" / "kernels" / "decode_attention.py"}


def _skip_if_missing(op):
    if op in NEEDS and not NEEDS[op].exists():
        pytest.skip(f"{NEEDS[op].relative_to(REPO)} does not exist yet")


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "swiglu_scale_bias", "scale_bias", "rope", "attention", "gated_attention", "decode_attention",
                                "llama_adapter_layer"])
def test_script_quick_on_cpu(op, tmp_path):
    _skip_if_missing(op)
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"bench_{op}.py"), "--quick", "--out", str(out)],
        cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert NO_GPU in proc.stdout
    assert "mmkernels[triton]" in proc.stdout  # the interpreter path was checked, not only the reference
    assert not out.exists(), "nothing may be written without a GPU"


def test_cli_rejects_unknown_provider_and_mode():
    for flag in (["--providers", "mmkernels,nope"], ["--modes", "fwd,sideways"]):
        proc = subprocess.run(
            [sys.executable, str(BENCH / "bench_swiglu.py"), *flag],
            cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 2 and "unknown" in proc.stderr, proc.stderr


def test_smoke_catches_a_wrong_op():
    import bench_swiglu

    wrong = dataclasses.replace(bench_swiglu.BENCH, ours=lambda g, u: bench_swiglu.ours(g, u) * 1.001)
    failures = runner.smoke(wrong)
    assert failures and any("output" in f for f in failures) and any("grad" in f for f in failures)


def test_rows_name_the_library_knobs_they_ran_with(monkeypatch):
    """A run that sets a tagged knob (the attention backward's tiles) says so in every row's provider."""
    kwargs = dict(op="x", provider="mmkernels", backend="triton", mode="fwd+bwd", shape={"n": 1}, dtype="bf16",
                  ms=(2.0, 1.5, 2.5), flops=None, nbytes=None, copy_gbps=None, peak_mem_mb=None, env=ENV)
    monkeypatch.delenv("MMK_ATTN_BWD_TILES", raising=False)
    assert runner.make_row(**kwargs)["provider"] == "mmkernels"
    monkeypatch.setenv("MMK_ATTN_BWD_TILES", "64,64,8,3/64,64,8,3")
    assert runner.make_row(**kwargs)["provider"] == "mmkernels[MMK_ATTN_BWD_TILES=64,64,8,3/64,64,8,3]"


def test_make_row_arithmetic():
    row = runner.make_row(
        op="x", provider="mmkernels", backend="triton", mode="fwd", shape={"n": 1}, dtype="bf16",
        ms=(2.0, 1.5, 2.5), flops=4e9, nbytes=3e9, copy_gbps=3000.0, peak_mem_mb=12.5, env=ENV,
        matmul_tflops=8.0,
    )
    assert tuple(row) == runner.ROW_KEYS
    schema = {"op", "provider", "mode", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "tflops", "gbps",
              "peak_mem_mb", "gpu", "torch", "triton", "commit"}  # the DESIGN.md schema
    assert schema <= set(row)
    assert row["tflops"] == pytest.approx(2.0)  # 4e9 FLOP / 2 ms = 2e12 FLOP/s
    assert row["gbps"] == pytest.approx(1500.0)  # 3e9 B / 2 ms
    assert row["pct_of_copy_bw"] == pytest.approx(50.0)
    assert row["pct_of_matmul_flops"] == pytest.approx(25.0)  # 2 of 8 TFLOP/s
    assert (row["ms_p50"], row["ms_p20"], row["ms_p80"]) == (2.0, 1.5, 2.5)
    assert row["commit"] == "abc1234" and row["gpu"] == "Test GPU"

    nulls = runner.make_row(
        op="x", provider="eager", backend=None, mode="bwd", shape={}, dtype="bf16",
        ms=(1.0, 1.0, 1.0), flops=None, nbytes=None, copy_gbps=3000.0, peak_mem_mb=None, env=ENV,
    )
    assert nulls["tflops"] is None and nulls["gbps"] is None and nulls["pct_of_copy_bw"] is None
    assert nulls["pct_of_matmul_flops"] is None
    no_copy = runner.make_row(
        op="x", provider="eager", backend=None, mode="bwd", shape={}, dtype="bf16",
        ms=(1.0, 1.0, 1.0), flops=None, nbytes=1e9, copy_gbps=None, peak_mem_mb=None, env=ENV,
    )
    assert no_copy["gbps"] == pytest.approx(1000.0) and no_copy["pct_of_copy_bw"] is None
    with pytest.raises(ValueError):
        runner.make_row(op="x", provider="p", backend=None, mode="fwd", shape={}, dtype="bf16", ms=(0, 0, 0),
                        flops=1.0, nbytes=None, copy_gbps=None, peak_mem_mb=None, env=ENV)


def test_append_rows_jsonl(tmp_path):
    path = tmp_path / "sub" / "gpu.jsonl"
    mk = lambda p: runner.make_row(  # noqa: E731
        op="swiglu", provider=p, backend=None, mode="fwd", shape={"tokens": 2, "hidden": 3}, dtype="bf16",
        ms=(1.0, 0.9, 1.1), flops=None, nbytes=1e6, copy_gbps=2.0, peak_mem_mb=1.0, env=ENV,
    )
    runner.append_rows(path, [mk("eager")])
    runner.append_rows(path, [mk("compile"), mk("mmkernels")])
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    rows = [json.loads(line) for line in lines]
    assert [r["provider"] for r in rows] == ["eager", "compile", "mmkernels"]
    assert all(list(r) == list(runner.ROW_KEYS) for r in rows)
    assert runner.read_rows(path) == rows


def test_results_path():
    assert runner.results_path(None, "NVIDIA H100 80GB HBM3") == runner.RESULTS_DIR / "nvidia-h100-80gb-hbm3.jsonl"
    assert runner.results_path("/tmp/r", "NVIDIA H100") == Path("/tmp/r/nvidia-h100.jsonl")
    assert runner.results_path("/tmp/r/x.jsonl", "NVIDIA H100") == Path("/tmp/r/x.jsonl")


def test_slug():
    assert runner.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert runner.slug("  ") == "unknown"


def test_git_commit(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    env_backup = os.environ.get("GIT_CEILING_DIRECTORIES")
    os.environ["GIT_CEILING_DIRECTORIES"] = str(tmp_path)  # never find a repository above tmp_path
    try:
        assert runner.git_commit(outside) == "unknown"
        if shutil.which("git") is None:
            pytest.skip("git is not installed")
        repo = tmp_path / "repo"
        repo.mkdir()
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        subprocess.run(git + ["init", "-q"], cwd=repo, check=True)
        (repo / "f.txt").write_text("a\n")
        subprocess.run(git + ["add", "f.txt"], cwd=repo, check=True)
        subprocess.run(git + ["commit", "-q", "-m", "m"], cwd=repo, check=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        (repo / "untracked.txt").write_text("u\n")  # untracked files do not make the tree dirty
        assert runner.git_commit(repo) == head
        (repo / "f.txt").write_text("b\n")
        assert runner.git_commit(repo) == head + "-dirty"
    finally:
        if env_backup is None:
            os.environ.pop("GIT_CEILING_DIRECTORIES", None)
        else:
            os.environ["GIT_CEILING_DIRECTORIES"] = env_backup


def test_work_formulas():
    import bench_attention
    import bench_rms_norm
    import bench_rope
    import bench_swiglu
    import torch

    a = bench_attention.TARGET
    fwd = 2.0 * 4 * 32 * 2048 * 2048 * 128
    assert bench_attention.flops(a, "fwd") == fwd
    assert bench_attention.flops(a, "bwd") == 2.5 * fwd
    assert bench_attention.flops(a, "fwd+bwd") == 3.5 * fwd
    assert bench_attention.flops(dict(a, causal=False), "fwd") == 2 * fwd
    assert bench_attention.nbytes(a, "fwd", torch.bfloat16) is None

    m, n, e = 16384, 4096, 2
    r = bench_rms_norm.TARGET
    assert bench_rms_norm.nbytes(r, "fwd", torch.bfloat16) == 2 * m * n * e + n * e + 4 * m  # + rstd
    assert bench_rms_norm.nbytes(r, "bwd", torch.bfloat16) == 3 * m * n * e + 2 * n * e + 4 * m
    rr = dict(r, residual=True)
    assert bench_rms_norm.nbytes(rr, "fwd+bwd", torch.float32) == (
        (4 * m * n * 4 + n * 4 + 4 * m) + (4 * m * n * 4 + 2 * n * 4 + 4 * m))
    assert bench_rms_norm.flops(r, "fwd") is None

    s = bench_swiglu.TARGET
    assert bench_swiglu.nbytes(s, "fwd+bwd", torch.bfloat16) == 8 * 16384 * 11008 * 2

    p = bench_rope.TARGET
    one = 2 * 4 * 2048 * (32 + 8) * 128 * 2 + 2048 * 128 * 4
    assert bench_rope.nbytes(p, "fwd", torch.bfloat16) == one
    assert bench_rope.nbytes(p, "fwd+bwd", torch.bfloat16) == 2 * one

    import bench_decode_attention
    import bench_gated_attention
    import bench_llama_adapter_layer

    g = bench_gated_attention.TARGET
    gfwd = fwd + 4.0 * 4 * 32 * 2048 * 10 * 128  # causal main segment + the L_p=10 prompt segment
    assert bench_gated_attention.flops(g, "fwd") == gfwd
    assert bench_gated_attention.flops(g, "fwd+bwd") == 3.5 * gfwd
    assert bench_gated_attention.nbytes(g, "fwd", torch.bfloat16) is None

    d = bench_decode_attention.TARGET  # B=8, T=1, S=2048, L_p=10
    cache, qo, prompt = 2 * 8 * 2048 * 8 * 128 * 2, 2 * 8 * 1 * 32 * 128 * 2, 2 * 10 * 8 * 128 * 2 + 4 * 32
    assert bench_decode_attention.nbytes(d, "fwd", torch.bfloat16) == cache + qo + prompt
    assert bench_decode_attention.nbytes(dict(d, L_p=0), "fwd", torch.bfloat16) == cache + qo
    assert bench_decode_attention.flops(d, "fwd") is None

    a = bench_llama_adapter_layer.TARGET
    n = 4 * 2048
    proj = 2.0 * n * 4096 * (4096 + 2 * 1024) + 2.0 * n * 4096 * 4096
    attn = gfwd
    prompt = 4.0 * 10 * 4096 * 1024
    assert bench_llama_adapter_layer.flops(a, "fwd") == proj + attn + prompt
    assert bench_llama_adapter_layer.flops(a, "bwd") == proj + 2.5 * attn + prompt
    assert bench_llama_adapter_layer.flops(a, "fwd+bwd") == 2 * proj + 3.5 * attn + 2 * prompt


def _rows_for_plot():
    rows = [runner.make_row(op="copy", provider="torch", backend=None, mode="fwd", shape={"bytes": 8},
                            dtype="bf16", ms=(1.0, 1.0, 1.0), flops=None, nbytes=2e9, copy_gbps=None,
                            peak_mem_mb=1.0, env=ENV)]
    for mode in runner.MODES:
        for prov, be, ms in (("mmkernels", "triton", 1.0), ("eager", None, 2.0), ("mmkernels", "triton", 3.0)):
            rows.append(runner.make_row(op="swiglu", provider=prov, backend=be, mode=mode,
                                        shape={"tokens": 2, "hidden": 3}, dtype="bf16", ms=(ms, ms, ms),
                                        flops=None, nbytes=1e9, copy_gbps=2000.0, peak_mem_mb=1.0, env=ENV))
    return rows


def test_flop_failures_name_each_shape_and_mode():
    presets = {"default": [{"d": 8}], "target": [{"d": 0}]}
    assert runner.flop_failures("op", presets, lambda shape, mode: shape["d"] * (mode == "fwd"), ("fwd", "bwd")) == [
        "op {'d': 8} bwd: non-positive FLOP count", "op {'d': 0} fwd: non-positive FLOP count",
        "op {'d': 0} bwd: non-positive FLOP count"]
    assert runner.flop_failures("step", presets, lambda shape: shape["d"]) == ["step {'d': 0}: non-positive FLOP count"]


def test_plot_grouping_last_row_wins():
    figures, refs = plot.group_rows(_rows_for_plot())
    assert list(refs["Test GPU"]) == ["copy"]
    (key, by_mode), = figures.items()
    assert key == ("Test GPU", "swiglu", "tokens2_hidden3", "bf16")
    assert set(by_mode) == set(runner.MODES)
    assert set(by_mode["fwd"]) == {"mmkernels[triton]", "eager"}
    assert by_mode["fwd"]["mmkernels[triton]"]["ms_p50"] == 3.0  # the later row


def test_plot_labels_and_metric():
    row = dict(_rows_for_plot()[1])
    assert plot.provider_label(row) == "mmkernels[triton]"
    assert plot.provider_label(dict(row, provider="eager", backend=None)) == "eager"
    assert plot.bottom_metric([row])[0] == "pct_of_copy_bw"
    flops_row = dict(row, gbps=None, pct_of_copy_bw=None, tflops=2.0, pct_of_matmul_flops=40.0)
    assert plot.bottom_metric([flops_row])[0] == "pct_of_matmul_flops"
    assert plot.bottom_metric([dict(flops_row, pct_of_matmul_flops=None)])[0] == "tflops"


def test_plot_script(tmp_path):
    runner.append_rows(tmp_path / "test-gpu.jsonl", _rows_for_plot())
    proc = subprocess.run([sys.executable, str(BENCH / "plot.py"), "--results", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert proc.returncode == 2 and "needs matplotlib" in proc.stderr, proc.stdout + proc.stderr
        return
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "plots" / "test-gpu" / "swiglu__tokens2_hidden3__bf16.png").is_file()


# The row's `backend` on CPU, per provider (None for the others).
CPU_BACKEND = {"mmkernels": "reference", "attention_no_prompt": "reference", "sdpa": "flash", "sdpa_no_prompt": "flash",
               "sdpa_two_pass": "flash", "peft": "sdpa"}


@pytest.mark.parametrize("op,providers", [("swiglu", "mmkernels,eager,liger"),
                                          ("rms_norm", "mmkernels,mmkernels:reference,eager"),
                                          ("attention", "mmkernels,eager,sdpa"),
                                          ("gated_attention",
                                           "mmkernels,eager,attention_no_prompt,sdpa_no_prompt,sdpa_two_pass")])
def test_timing_loop_plumbing_on_cpu(op, providers, tmp_path, monkeypatch, capsys):
    """Drives runner.main's GPU branch on CPU with tiny shapes and a fake clock (no timing happens):
    checks that every provider x mode case builds, runs and yields a well-formed row."""
    _skip_if_missing(op)
    import importlib
    import importlib.util

    if "liger" in providers and importlib.util.find_spec("liger_kernel") is not None:
        providers = providers.replace(",liger", "")  # the skip note is checked only where Liger is absent
    mod = importlib.import_module(f"bench_{op}")
    calls = []
    fake_gpu(monkeypatch, runner, calls)
    bench = dataclasses.replace(mod.BENCH, presets={"default": mod.BENCH.smoke_shapes[:1]})
    rc = runner.main(bench, ["--out", str(tmp_path), "--providers", providers, "--quick"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert [p.name for p in tmp_path.iterdir()] == ["test-gpu.jsonl"]  # <out>/<gpu-name-slug>.jsonl
    rows = runner.read_rows(tmp_path / "test-gpu.jsonl")
    assert [r["op"] for r in rows[:2]] == ["copy", "matmul"]
    assert rows[0]["gbps"] == pytest.approx(2 * (1 << 12) / 1e-3 / 1e9)  # bytes read + written / 1 ms
    assert rows[1]["tflops"] == pytest.approx(2 * 16**3 / 1e-3 / 1e12)
    assert rows[0]["pct_of_copy_bw"] == 100.0 and rows[1]["pct_of_matmul_flops"] == 100.0
    op_rows = rows[2:]
    expect = [p.partition(":")[0] for p in providers.split(",") if p != "liger"]
    assert [r["provider"] for r in op_rows] == [p for p in expect for _ in runner.MODES]
    assert [r["mode"] for r in op_rows] == list(runner.MODES) * len(expect)
    for r in op_rows:
        assert list(r) == list(runner.ROW_KEYS)
        assert r["op"] == bench.op and r["dtype"] == "bf16" and r["shape"] == bench.presets["default"][0]
        assert (r["ms_p50"], r["ms_p20"], r["ms_p80"]) == (1.0, 0.5, 2.0)
        assert r["backend"] == CPU_BACKEND.get(r["provider"])
        if r["gbps"] is not None:
            assert r["pct_of_copy_bw"] == pytest.approx(100 * r["gbps"] / rows[0]["gbps"])
        else:
            assert r["pct_of_matmul_flops"] == pytest.approx(100 * r["tflops"] / rows[1]["tflops"])
    if "liger" in providers:
        assert "note: provider liger skipped" in printed
    # bwd and fwd+bwd reset the input gradients before every timed call; fwd has none to reset.
    assert len(calls) == 2 + len(op_rows)
    for i, grad_to_none in enumerate(calls[2:]):
        assert (grad_to_none is None) == (runner.MODES[i % 3] == "fwd")


@pytest.mark.parametrize("script,providers,modes", [
    ("decode_attention", "mmkernels,eager,sdpa_two_pass", ("fwd",)),
    ("llama_adapter_layer", "mmkernels,mmkernels:reference,peft", runner.MODES),
])
def test_own_main_timing_loop_on_cpu(script, providers, modes, tmp_path, monkeypatch, capsys):
    """The scripts with their own main (decode: fwd only; the layer: a module benchmark with its own case
    loop) driven through their GPU branch on CPU with a fake clock: one well-formed row per provider x mode.
    (mmkernels runs its reference backend here: no Triton kernel is needed.)"""
    import importlib

    mod = importlib.import_module(f"bench_{script}")
    if script == "llama_adapter_layer":
        pytest.importorskip("peft")
        shapes = mod.SMOKE_SHAPES[:1]
        monkeypatch.setitem(mod.PRESETS, "default", shapes)
        monkeypatch.setitem(mod.PRESETS, "target", shapes)
    else:
        shapes = mod.BENCH.smoke_shapes[:2]  # with and without the prompt
        monkeypatch.setattr(mod, "BENCH", dataclasses.replace(mod.BENCH, presets={"default": shapes, "target": shapes}))
    calls = []
    fake_gpu(monkeypatch, runner, calls)
    rc = mod.main(["--out", str(tmp_path), "--providers", providers, "--quick"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = runner.read_rows(tmp_path / "test-gpu.jsonl")
    assert [r["op"] for r in rows[:2]] == ["copy", "matmul"]
    op_rows = rows[2:]
    expect = [(sh, p.partition(":")[0], m) for sh in shapes for p in providers.split(",") for m in modes]
    assert [(r["shape"], r["provider"], r["mode"]) for r in op_rows] == expect
    for r in op_rows:
        assert list(r) == list(runner.ROW_KEYS)
        assert r["op"] == mod.OP and r["dtype"] == "bf16"
        assert r["backend"] == CPU_BACKEND.get(r["provider"])
        if script == "decode_attention":
            assert r["gbps"] > 0 and r["tflops"] is None and r["pct_of_copy_bw"] is not None
        else:
            assert r["tflops"] > 0 and r["gbps"] is None and r["pct_of_matmul_flops"] is not None
    for i, grad_to_none in enumerate(calls[2:]):
        mode = op_rows[i]["mode"]
        assert (grad_to_none is None) == (mode == "fwd")
        if script == "llama_adapter_layer" and mode != "fwd":
            assert len(grad_to_none) == 3  # x, the prompt and the gate


def test_decode_script_is_fwd_only():
    proc = subprocess.run([sys.executable, str(BENCH / "bench_decode_attention.py"), "--modes", "fwd,bwd"],
                          cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "inference-only" in proc.stderr, proc.stdout + proc.stderr


def test_do_bench_accepts_the_runner_arguments():
    """time_fn calls triton.testing.do_bench(fn, warmup=, rep=, grad_to_none=, quantiles=): the installed
    triton must accept those (its signature has changed across releases)."""
    import inspect

    triton_testing = pytest.importorskip("triton.testing")
    inspect.signature(triton_testing.do_bench).bind(
        lambda: None, warmup=1, rep=1, grad_to_none=None, quantiles=runner.QUANTILES
    )
    assert runner.QUANTILES == [0.5, 0.2, 0.8]  # the order make_row reads them in: p50, p20, p80


def test_compile_bwd_disables_donated_buffers():
    """The bwd mode times backward(retain_graph=True), which AOTAutograd's donated buffers forbid."""
    import torch._functorch.config as functorch_config

    if not hasattr(functorch_config, "donated_buffer"):
        pytest.skip("this torch has no donated buffers")
    with runner._autograd_context("compile", "bwd"):
        assert functorch_config.donated_buffer is False
    for provider, mode in (("compile", "fwd+bwd"), ("eager", "bwd")):
        before = functorch_config.donated_buffer
        with runner._autograd_context(provider, mode):
            assert functorch_config.donated_buffer == before


def _gpu_session_benches():
    """(script name, arguments) of every `bench NAME CAP ARGS...` stage in gpu_session.sh, and the tile strings
    its attention_bwd_tiles stage loops over."""
    import shlex

    text = (BENCH / "gpu_session.sh").read_text().replace("\\\n", " ")
    benches = []
    for line in text.splitlines():
        if line.startswith("bench "):
            words = shlex.split(line, comments=True)
            benches.append((words[1], words[3:]))
    tiles = text.split("for tiles in ", 1)[1].split(";", 1)[0].split()
    return benches, tiles


def test_gpu_session_stages_pass_their_scripts_argument_checks():
    """A stage whose providers or flags its script rejects would spend scarce GPU time on an argparse error:
    every bench stage's arguments go through that script's own parser, and the tile strings through
    parse_bwd_tiles."""
    import importlib

    from mmkernels.backend import BACKENDS
    from mmkernels.kernels.attention import parse_bwd_tiles

    benches, tiles = _gpu_session_benches()
    assert len(benches) >= 15 and tiles
    for name, args in benches:
        mod = importlib.import_module(f"bench_{name}")
        argv = [*args, "--out", "unused"]
        if hasattr(mod, "SPEC") or hasattr(mod, "BENCH"):
            args = runner.parse_args(getattr(mod, "SPEC", None) or mod.BENCH, argv)
            for provider in args.providers:  # a forced backend must be one mmkernels has
                assert provider.partition(":")[2] in ("", *BACKENDS), (name, provider)
        else:
            mod.parse_args(argv)
    for t in tiles:
        parse_bwd_tiles(t)
