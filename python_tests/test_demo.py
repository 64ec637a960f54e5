"""The main job on its embedded defaults: `mmkernels train` with no arguments learns the synthetic
multimodal task (about 100 s on a 2-core CPU)."""

import json

from mmkernels.cli import main


def test_default_train_learns_the_demo_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--no-progress"]) == 0
    summary = json.load(open(tmp_path / "mmkernels-run" / "summary.json"))
    before, after = summary["eval_before"], summary["eval_after"]
    assert after["chance"] < 0.3
    assert after["all"] >= 0.6 and after["all"] >= before["all"] + 0.3, (before, after)
    for kind in ("image", "text"):  # both paths learn: the visual prompts and the text-only questions
        assert after[kind] >= 0.5, (kind, after)
    assert summary["steps"] == 400 and summary["trainable_params"] == 121_480
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "after" in out
