"""The main job's demo task learns: `mmkernels train` on its embedded defaults, cut to half the steps and
fewer samples to keep the suite short (the full default run: 400 steps, about 100 s on a 2-core CPU)."""

import json

from mmkernels.cli import main


def test_default_train_learns_the_demo_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress", "--max-steps", "200", "--demo-samples", "1600"]) == 0
    summary = json.load(open(tmp_path / "mmkernels-run" / "summary.json"))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["chance"] < 0.3
    assert after["all"] >= 0.45 and after["all"] >= before["all"] + 0.15, (before, after)
    for kind in ("image", "text"):  # both paths learn: the visual prompts and the text-only questions
        assert after[kind] >= 0.4, (kind, after)
    assert summary["steps"] == 200 and summary["trainable_params"] == 121_480
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "after" in out
