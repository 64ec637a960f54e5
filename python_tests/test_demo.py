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


def test_demo_files_appear_whole(tmp_path, monkeypatch):
    """Every process of a torchrun run writes the demo data set while others may read it (a 2-process run read
    an empty eval.jsonl once): its files are only ever renamed into place, never opened for writing under
    their own names."""
    import builtins
    import os

    from mmkernels.train import demo

    written = []

    def spy(path, mode="r", *args, **kwargs):
        if "w" in mode:
            written.append(os.path.basename(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(demo, "open", spy, raising=False)
    paths = demo.write_dataset(str(tmp_path), 6, 3, seed=0, image_size=16)
    assert written and not {"train.jsonl", "eval.jsonl", "settings.json"} & set(written)
    assert sorted(os.listdir(tmp_path)) == ["eval.jsonl", "images", "settings.json", "train.jsonl"]
    assert [len(open(paths[s]).readlines()) for s in ("train", "eval")] == [6, 3]
