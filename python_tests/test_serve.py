"""Serving trained adapters: `mmkernels generate --adapter` and `mmkernels export --merge`."""

import json

import pytest
import torch

from mmkernels.cli import main
from mmkernels.train import inference, trainer
from mmkernels.train.config import TrainConfig


def _instruction_data(path):
    rows = [{"instruction": f"Say {w}.", "output": w} for w in ("yes", "no", "maybe", "never")] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _train(tmp_path, method, **kw):
    cfg = TrainConfig(data=_instruction_data(tmp_path / "d.jsonl"), data_format="instruction", method=method,
                      out_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, progress=False, max_len=192,
                      warmup_steps=1, lr=0.05, **kw)
    run = trainer.Run.build(cfg)
    run.train()
    return run


@pytest.mark.parametrize("method, options", [("lora", {"rank": 4}), ("paca", {"rank": 8})])
def test_export_merge_loads_in_transformers(tmp_path, method, options):
    transformers = pytest.importorskip("transformers")
    run = _train(tmp_path, method, method_options=options)
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        want = run.model.eval()(ids)
    assert main(["export", "--adapter", str(tmp_path / "run/adapter"), "--merge", "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(ids).logits
    assert (got - want).abs().max() <= 2e-5 * want.abs().max()
    base = trainer.build_model(None, None, 0, torch.device("cpu"), torch.float32)[0]
    with torch.no_grad():
        assert (base(ids) - want).abs().max() > 1e-3  # the adapter changed the model: the check can fail


def test_export_refuses_what_a_llama_checkpoint_cannot_hold(tmp_path):
    _train(tmp_path, "llama_adapter")
    with pytest.raises(ValueError, match="cannot hold"):
        main(["export", "--adapter", str(tmp_path / "run/adapter"), "--merge", "--out", str(tmp_path / "hf")])


def test_loaded_adapter_reproduces_the_trained_model(tmp_path):
    """inference.load rebuilds the base model, the vision tower and the adapter of a multimodal run."""
    cfg = TrainConfig(vision="tiny", demo_samples=12, demo_eval_samples=6, batch_size=4, max_steps=2, progress=False,
                      max_len=160, warmup_steps=1, out_dir=str(tmp_path / "run"), method_options={"gate_init": 0.3})
    run = trainer.Run.build(cfg)
    summary = run.train()
    model, tok, vision, spec = inference.load(str(tmp_path / "run/adapter"))
    pixels = torch.stack([it.image for it in run.eval_set[:2] if it.image is not None] or [torch.zeros(3, 32, 32)])
    ids = torch.tensor([run.eval_set[0].prompt_ids[:20]] * pixels.shape[0])
    with torch.no_grad():
        want = run.model.eval()(ids, visual_prompts=inference.visual_inputs(spec, run.model, run.vision, pixels)["visual_prompts"])
        got = model(ids, visual_prompts=inference.visual_inputs(spec, model, vision, pixels)["visual_prompts"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert summary["eval_after"] is not None


def test_generate_with_adapter_and_image(tmp_path, capsys):
    cfg = TrainConfig(vision="tiny", demo_samples=12, demo_eval_samples=6, batch_size=4, max_steps=1, progress=False,
                      max_len=160, warmup_steps=1, out_dir=str(tmp_path / "run"))
    trainer.Run.build(cfg).train()
    image = next((tmp_path / "run/demo-data/images").glob("*.npy"))
    assert main(["generate", "--adapter", str(tmp_path / "run/adapter"), "--prompt", "What colour is the circle?",
                 "--image", str(image), "--max-new-tokens", "4", "--no-stream"]) == 0
    out = capsys.readouterr()
    assert "What colour is the circle?" in out.out and "llama_adapter" in out.err
    with pytest.raises(SystemExit, match="one image per prompt"):
        main(["generate", "--adapter", str(tmp_path / "run/adapter"), "--prompt", "a", "--prompt", "b",
              "--image", str(image)])
