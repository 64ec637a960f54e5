"""Serving trained adapters: `mmkernels generate --adapter` and `mmkernels export --merge`."""

import pytest
import torch

from _data import write_instructions
from _multimodal import random_adapter_model
from mmkernels.cli import main
from mmkernels.models.generation import generate
from mmkernels.train import inference, method_specs, trainer
from mmkernels.train.config import TrainConfig
from mmkernels.train.data import Batch


def _train(tmp_path, method, **kw):
    cfg = TrainConfig(data=write_instructions(tmp_path / "d.jsonl"), data_format="instruction", method=method,
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
        want = run.model.eval()(ids, **spec.serve_inputs(run.model, run.vision, pixels, 1))
        got = model(ids, **spec.serve_inputs(model, vision, pixels, 1))
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


def _multimodal_model(method):
    model, vision, spec = random_adapter_model(method)
    return model.eval(), vision, spec


def _greedy_through_training_forward(spec, model, vision, prompt, pixels, steps):
    """Greedy tokens by re-running the trainer's forward (spec.inputs on a one-sample Batch) over the whole
    sequence at every step: no KV cache, no padding."""
    seq, out = list(prompt), []
    for _ in range(steps):
        ids = torch.tensor([seq])
        batch = Batch(ids, ids, torch.ones_like(ids, dtype=torch.bool), pixels,
                      torch.tensor([pixels is not None]))
        inputs = spec.inputs(model, vision, batch, torch.tensor([len(prompt) - 1]))
        with torch.no_grad(), inputs.context():
            logits = model(**inputs.kwargs)
        out.append(int(logits[0, -1 - inputs.suffix].argmax()))  # the last text position
        seq.append(out[-1])
    return out


@pytest.mark.parametrize("method", ["llama_adapter", "lavin", "hyperllava"])
@pytest.mark.parametrize("with_images", [True, False])
def test_generation_gives_each_prompt_its_training_forward(method, with_images):
    """A left-padded batch of prompts of different lengths (with images: each with its own) generates, for
    every prompt, the tokens that the trainer's forward of that sample alone predicts greedily."""
    model, vision, spec = _multimodal_model(method)
    prompts = [[256, 72, 105, 33, 9, 40], [256, 7], [256, 50, 51, 52]]
    size = vision.clip.config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2)) if with_images else None
    with torch.no_grad():
        batched = generate(model, prompts, max_new_tokens=4, **spec.serve_inputs(model, vision, pixels, 3))
    for b, prompt in enumerate(prompts):
        one = None if pixels is None else pixels[b : b + 1]
        assert batched[b] == _greedy_through_training_forward(spec, model, vision, prompt, one, 4), (method, b)
    if with_images:  # the images matter: other images give other tokens for some prompt
        with torch.no_grad():
            other = generate(model, prompts, max_new_tokens=4, **spec.serve_inputs(model, vision, -pixels, 3))
        assert other != batched


@pytest.mark.parametrize("method", ["lavin", "hyperllava"])
def test_generate_cli_serves_each_multimodal_method(tmp_path, capsys, method):
    cfg = TrainConfig(vision="tiny", method=method, demo_samples=12, demo_eval_samples=6, batch_size=4, max_steps=1,
                      progress=False, max_len=160, warmup_steps=1, out_dir=str(tmp_path / "run"))
    trainer.Run.build(cfg).train()
    image = next((tmp_path / "run/demo-data/images").glob("*.npy"))
    adapter = str(tmp_path / "run/adapter")
    assert main(["generate", "--adapter", adapter, "--prompt", "What colour is the circle?", "--image", str(image),
                 "--max-new-tokens", "3", "--no-stream"]) == 0
    assert main(["generate", "--adapter", adapter, "--prompt", "What colour is grass?", "--max-new-tokens", "3",
                 "--no-stream"]) == 0
    out = capsys.readouterr()
    assert "What colour is the circle?" in out.out and "What colour is grass?" in out.out and method in out.err


def test_generate_refuses_images_for_a_text_only_method(tmp_path):
    _train(tmp_path, "lora", method_options={"rank": 4})
    image = tmp_path / "img.npy"
    import numpy as np

    np.save(image, np.zeros((3, 8, 8), dtype=np.float32))
    with pytest.raises(SystemExit, match="without a vision tower"):
        main(["generate", "--adapter", str(tmp_path / "run/adapter"), "--prompt", "a", "--image", str(image)])
    with pytest.raises(ValueError, match="'lora' is text-only"):
        method_specs.get("lora").serve_inputs(None, None, torch.zeros(1, 3, 8, 8), 1)
