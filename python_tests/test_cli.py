import json
import os
import re
import subprocess
import sys

import pytest

from mmkernels import cli


def _run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "mmkernels.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


def test_info_reports_every_op_and_backend(capsys):
    assert cli.main(["info", "-v"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "triton" in out and "_C" in out
    for op in ("rms_norm", "rope", "swiglu", "attention"):
        assert f"  {op}" in out
    assert "reference" in out


def test_generate_embedded_default_runs():
    res = _run("generate", "--max-new-tokens", "4")
    assert res.returncode == 0, res.stderr
    assert "3 prompts, 12 new tokens" in res.stderr
    assert res.stdout.count("->") == 3


def test_generate_reads_prompts_from_stdin_and_is_deterministic():
    first = _run("generate", "--prompts-file", "-", "--max-new-tokens", "5", "--no-stream", stdin="hello\nworld\n")
    second = _run("generate", "--prompts-file", "-", "--max-new-tokens", "5", "--no-stream", stdin="hello\nworld\n")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.count("->") == 2


@pytest.mark.parametrize("flag,value,message", [
    ("--device", "tpu9", "--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu9'"),
    ("--max-new-tokens", "0", "--max-new-tokens: expected a positive integer"),
    ("--top-p", "1.5", "--top-p: expected a number in (0, 1]"),
    ("--temperature", "-1", "--temperature: expected a number >= 0"),
])
def test_generate_bad_arguments(flag, value, message):
    res = _run("generate", flag, value)
    assert res.returncode != 0 and message in res.stderr


def test_input_error_is_one_line_without_traceback(tmp_path):
    """The command reports bad input in one line with exit status 2; MMK_TRACEBACK=1 shows the traceback."""
    missing = tmp_path / "none.jsonl"
    res = _run("train", "--data", str(missing), "--data-format", "instruction")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "mmkernels train: error: " in res.stderr and str(missing) in res.stderr
    env = {**os.environ, "MMK_TRACEBACK": "1"}
    res = subprocess.run([sys.executable, "-m", "mmkernels.cli", "train", "--data", str(missing)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 1 and "Traceback" in res.stderr and str(missing) in res.stderr


def test_bench_unknown_op():
    res = _run("bench", "no_such_op")
    assert res.returncode == 2 and "no benchmark 'no_such_op'" in res.stderr


def test_params_prints_the_llama_adapter_counts_of_methods_md(capsys):
    assert cli.main(["params"]) == 0  # V1 on the LLaMA-7B shape, last 30 layers, L_p = 10
    assert re.search(r"trainable +1,229,760\n", capsys.readouterr().out)
    assert cli.main(["params", "--version", "2", "--bias-scale-targets", "all"]) == 0
    assert re.search(r"trainable +4,279,744\n", capsys.readouterr().out)


def test_params_reads_a_model_config(tmp_path, capsys):
    from mmkernels.models import LlamaConfig

    (tmp_path / "config.json").write_text(json.dumps(LlamaConfig.tiny().to_hf_dict()))
    assert cli.main(["params", "--model", str(tmp_path), "--prompt-layers", "0", "--prompt-len", "4"]) == 0
    # 2 layers x (4 prompt tokens x 128 + 4 gates)
    assert re.search(r"trainable +1,032\n", capsys.readouterr().out)
