"""The trainer: configuration, schedule, loss normalisation, checkpoints and resume, memory estimate, bad input.

Runs use the built-in tiny LLaMA (random init) on small synthetic demo sets so each takes seconds on CPU.
"""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _data import write_instructions
from mmkernels.train import config as train_config
from mmkernels.train import memory, trainer
from mmkernels.train.config import TrainConfig

SMALL = dict(vision="tiny", demo_samples=24, demo_eval_samples=12, batch_size=4, max_steps=4, progress=False,
             max_len=160, warmup_steps=1)


def _cfg(tmp_path, **kw):
    return TrainConfig(**{**SMALL, "out_dir": str(tmp_path / "run"), **kw})


def _params(run):
    return {n: p.detach().clone() for n, p in run.params.items()}


# -- configuration --------------------------------------------------------------------------------------------
def _parse(argv):
    from mmkernels.cli import build_parser

    return train_config.from_args(build_parser().parse_args(["train", *argv]))


def test_config_file_and_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('lr = 0.01\nbatch_size = 3\n[method_options]\nprompt_len = 4\nversion = 2\n')
    cfg = _parse(["--config", str(path), "--batch-size", "5", "--method-option", "gate_fn=raw"])
    assert (cfg.lr, cfg.batch_size) == (0.01, 5)
    assert cfg.method_options == {"prompt_len": 4, "version": 2, "gate_fn": "raw"}


def test_config_yaml_and_json(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"max_steps": 7}))
    assert _parse(["--config", str(tmp_path / "c.json")]).max_steps == 7
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("max_steps: 9\n")
    assert _parse(["--config", str(tmp_path / "c.yaml")]).max_steps == 9


def test_config_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("learning_rate = 0.1\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        _parse(["--config", str(path)])


def test_config_bad_values():
    with pytest.raises(ValueError, match="batch_size: expected a positive integer, got 0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="method: expected one of"):
        TrainConfig(method="prefix_tuning")
    with pytest.raises(ValueError, match="--method-option: expected KEY=VALUE"):
        train_config.parse_method_options(["version"])
    with pytest.raises(ValueError, match="checkpoint_blocks: expected None or a non-negative integer, got -1"):
        TrainConfig(grad_checkpointing=True, checkpoint_blocks=-1)
    with pytest.raises(ValueError, match="checkpoint_blocks: applies with grad_checkpointing, which is off"):
        TrainConfig(checkpoint_blocks=1)
    assert _parse(["--grad-checkpointing", "--checkpoint-blocks", "1"]).checkpoint_blocks == 1


def test_checkpoint_blocks_beyond_the_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_blocks: expected at most the model's 2 blocks, got 3"):
        trainer.Run.build(_cfg(tmp_path, grad_checkpointing=True, checkpoint_blocks=3, **_instructions(tmp_path)))


def test_every_option_is_documented():
    from mmkernels.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    text = sub.format_help()
    for f in train_config.dataclasses.fields(TrainConfig):
        flag = {"method_options": "--method-option", "lr_multipliers": "--lr-multiplier"}.get(
            f.name, "--" + f.name.replace("_", "-"))
        assert flag in text, flag


def test_unknown_method_option_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['prompt_length'\]"):
        trainer.Run.build(_cfg(tmp_path, method_options={"prompt_length": 4}))


# -- schedule and loss normalisation ---------------------------------------------------------------------------
def test_warmup_cosine():
    f = [trainer.warmup_cosine(s, 4, 20, 0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    mid = 4 + (20 - 4 - 1) / 2
    assert trainer.warmup_cosine(int(mid * 2) // 2, 4, 20, 0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 15)))


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """The token-level mean over the global batch: 2 micro-batches of 4 give the loss and gradients of 1
    batch of 8 (gradients compared before the optimizer, whose normalisation would amplify rounding)."""
    runs = []
    for bs, accum in ((8, 1), (4, 2)):
        run = trainer.Run.build(_cfg(tmp_path / f"{bs}", batch_size=bs, grad_accum=accum, max_grad_norm=0.0,
                                     method_options={"gate_init": 0.5}))
        run.loader.shuffle = False
        loss = run.train_step()["loss"]
        runs.append((loss, {n: p.grad.clone() for n, p in run.params.items()}))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for name, g in runs[0][1].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(runs[1][1][name], g, rtol=1e-4, atol=1e-6 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("fused", [True, False])
def test_step_loss_and_gradients_are_the_shifted_token_mean(tmp_path, fused):
    """A step's loss and gradients are those of transformers' causal-LM loss on the model's logits: logits at i
    predict labels[i + 1], summed over the trained tokens of both micro-batches and divided by their count,
    with the fused lm_head loss and without it (an independent oracle: the other trainer tests compare runs of
    the trainer with each other)."""
    import copy

    from torch.nn import functional as F

    run = trainer.Run.build(_cfg(tmp_path, method="lora", fused_loss=fused, batch_size=2, grad_accum=2,
                                 max_grad_norm=0.0, **_instructions(tmp_path)))
    with torch.no_grad():
        for n, p in run.params.items():  # B = 0 at init would leave A without a gradient
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    upcoming = iter(copy.deepcopy(run.loader))  # the two micro-batches train_step will take
    batches = [next(upcoming), next(upcoming)]
    count = sum(int((b.labels[:, 1:] != trainer.IGNORE).sum()) for b in batches)
    total = sum(F.cross_entropy(run.model(b.input_ids)[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten(),
                                ignore_index=trainer.IGNORE, reduction="sum") for b in batches)
    (total / count).backward()  # the oracle's gradients, before the step replaces them
    expected = {n: p.grad.clone() for n, p in run.params.items()}
    row = run.train_step()
    assert row["trained_tokens"] == count
    assert row["loss"] == pytest.approx(total.item() / count, rel=1e-5)
    for name, g in expected.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(run.params[name].grad, g, rtol=1e-4, atol=1e-6 * g.abs().max().item(), msg=name)


def test_each_step_uses_and_logs_the_warmup_cosine_lr(tmp_path):
    """Optimizer step k (0-based) runs at lr * warmup_cosine(k) (times each group's multiplier), and the row it
    returns reports that lr: the scheduler and the logged value must agree with the schedule, not be one off."""
    kw = dict(method="lora", warmup_steps=2, max_steps=5, min_lr_ratio=0.1, lr_multipliers={"layers.0.": 0.5})
    cfg = _cfg(tmp_path, **kw, **_instructions(tmp_path))
    run = trainer.Run.build(cfg)
    for k in range(cfg.max_steps):
        expected = cfg.lr * trainer.warmup_cosine(k, 2, 5, 0.1)
        used = {g["lr_multiplier"]: g["lr"] for g in run.optimizer.param_groups}
        assert used == pytest.approx({1.0: expected, 0.5: 0.5 * expected}, rel=1e-12), k
        assert run.train_step()["lr"] == pytest.approx(expected, rel=1e-12), k


def test_only_trainable_parameters_change_and_have_optimizer_state(tmp_path):
    run = trainer.Run.build(_cfg(tmp_path))
    frozen = {n: p.detach().clone() for n, p in run.model.named_parameters() if not p.requires_grad}
    run.train_step()
    for n, p in run.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    state_params = {id(p) for p in run.optimizer.state}
    assert state_params == {id(p) for p in run.params.values()}


def _instructions(tmp_path):
    """Options for a text-only run on a small instruction file."""
    return dict(vision=None, data=write_instructions(tmp_path / "d.jsonl"), data_format="instruction")


# -- gradient checkpointing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["llama_adapter", "llama_adapter_v2", "lavin", "hyperllava", "lora", "paca",
                                    "compacter"])
def test_grad_checkpointing_changes_no_gradient(tmp_path, method):
    """Recomputing every block in the backward, only the first (checkpoint_blocks=1), every attention's core
    (recompute_attention), or the first block whole and the other's attention gives the losses and gradients of
    the run that saves the activations, for every method (LLaMA-Adapter V1 and V2): LaVIN's routing weights and
    HyperLLaVA's guidance live outside the blocks' arguments and are restored around the recomputation
    (Llama.recompute_contexts). The multimodal methods train on the demo set (batches mixing image and
    text-only samples), the others on instructions."""
    kw = dict(max_grad_norm=0.0, method=method.removesuffix("_v2"))
    if method == "llama_adapter":  # V1, text only
        kw["method_options"] = {"gate_init": 0.5, "version": 1}
    elif method == "llama_adapter_v2":  # with images; its scales' epilogues inside the recomputed attention core
        kw["method_options"] = {"gate_init": 0.5, "version": 2}
    if method not in ("llama_adapter_v2", "lavin", "hyperllava"):
        kw.update(_instructions(tmp_path))
    runs = []
    variants = [{}, dict(grad_checkpointing=True), dict(grad_checkpointing=True, checkpoint_blocks=1),
                dict(recompute_attention=True),
                dict(grad_checkpointing=True, checkpoint_blocks=1, recompute_attention=True)]
    for i, recompute in enumerate(variants):
        run = trainer.Run.build(_cfg(tmp_path / str(i), **recompute, **kw))
        assert run.model.gradient_checkpointing is recompute.get("grad_checkpointing", False)
        assert run.model.checkpoint_blocks == recompute.get("checkpoint_blocks")
        assert run.model.recompute_attention is recompute.get("recompute_attention", False)
        losses = [run.train_step()["loss"] for _ in range(2)]
        runs.append((losses, {n: p.grad.clone() for n, p in run.params.items()}))
    (ref_losses, ref), *others = runs
    assert any(g.abs().max() > 0 for g in ref.values())
    for losses, grads in others:
        assert losses == ref_losses
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


def test_master_weights_keep_a_shared_parameter_shared():
    """A trainable 16-bit parameter held by two modules gets one float32 master, not one per holder."""
    from torch import nn

    shared = nn.Parameter(torch.randn(4, dtype=torch.bfloat16))
    a, b = nn.Module(), nn.Module()
    a.w = b.w = shared
    root = nn.ModuleDict({"a": a, "b": b})
    root.frozen = nn.Parameter(torch.randn(3, dtype=torch.bfloat16), requires_grad=False)
    trainer.master_weights(root)
    assert a.w is b.w and a.w.dtype == torch.float32 and torch.equal(a.w, shared.float())
    assert root.frozen.dtype == torch.bfloat16
    assert len(list(root.parameters())) == 2


def test_bf16_compacter_trains_one_shared_rule(tmp_path):
    """On a 16-bit base the float32 masters keep Compacter's one shared rule (it was once split into a copy per
    adapter, the model's own rule then unused and the saved adapter not loadable)."""
    from mmkernels.methods import compacter as cp

    run = trainer.Run.build(_cfg(tmp_path, method="compacter", dtype="bfloat16", **_instructions(tmp_path)))
    assert [n for n in run.params if "phm_rule" in n] == [cp.RULE_NAME]
    assert sum(p.numel() for p in run.params.values()) == cp.count_parameters(run.model)["total"]
    run.train_step()
    assert all(a.rules[0] is run.params[cp.RULE_NAME] for a in run.model.modules() if isinstance(a, cp.PHMAdapter))


# -- checkpoints and resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["llama_adapter", "lavin", "hyperllava", "lora", "paca", "compacter"])
def test_resume_in_process_continues_exactly(tmp_path, method):
    """Every method resumes on the uninterrupted run's loss curve (what a forward derives from the trainable
    tensors, e.g. PaCA's W_eff columns, is rebuilt from the checkpoint)."""
    kw = dict(method=method, max_steps=6)
    if method not in ("llama_adapter", "lavin", "hyperllava"):
        kw.update(_instructions(tmp_path))
    full = trainer.Run.build(_cfg(tmp_path / "a", **kw))
    full.train()
    a = [json.loads(l) for l in open(tmp_path / "a/run/metrics.jsonl")]
    part = trainer.Run.build(_cfg(tmp_path / "b", save_every=3, **kw))
    for _ in range(3):
        part.history.append({"step": part.step + 1, "loss": part.train_step()["loss"]})
    part.save_checkpoint()
    resumed = trainer.Run.build(_cfg(tmp_path / "b", save_every=3, resume=True, **kw))
    assert resumed.resume() and resumed.step == 3
    losses = [resumed.train_step()["loss"] for _ in range(3)]
    expected = [r["loss"] for r in a if "loss" in r][3:6]
    assert losses == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_resume_restores_the_rng_state(tmp_path):
    """LoRA dropout draws from torch's RNG: a resumed run is on the uninterrupted run's losses only when the
    checkpoint's RNG state is restored (Run.build reseeds it, so without the restore the dropout masks of steps 3
    and 4 would be those of steps 1 and 2)."""
    kw = dict(method="lora", max_steps=4, method_options={"dropout": 0.3}, **_instructions(tmp_path))
    full = trainer.Run.build(_cfg(tmp_path / "a", **kw))
    expected = [full.train_step()["loss"] for _ in range(4)]
    part = trainer.Run.build(_cfg(tmp_path / "b", **kw))
    for _ in range(2):
        part.train_step()
    part.save_checkpoint()
    resumed = trainer.Run.build(_cfg(tmp_path / "b", resume=True, **kw))
    assert resumed.resume() and resumed.step == 2
    assert [resumed.train_step()["loss"] for _ in range(2)] == pytest.approx(expected[2:], rel=1e-6, abs=1e-7)


def _cli(*args):
    return [sys.executable, "-m", "mmkernels.cli", "train", *args]


def test_killed_run_resumes_to_the_same_loss_curve(tmp_path):
    """SIGKILL a run once it has written a checkpoint; --resume reaches the uninterrupted run's losses."""
    common = ["--vision", "tiny", "--demo-samples", "32", "--demo-eval-samples", "8", "--batch-size", "4",
              "--max-steps", "10", "--save-every", "2", "--no-progress", "--max-len", "160", "--no-fused-loss"]
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_cli(*common, "--out-dir", str(ref_dir)), check=True, capture_output=True)
    proc = subprocess.Popen(_cli(*common, "--out-dir", str(killed_dir)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed_dir / "checkpoints" / "latest").exists() and metrics.exists() and \
                sum(1 for l in open(metrics) if '"loss"' in l) >= 5:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_cli(*common, "--out-dir", str(killed_dir), "--resume"), check=True, capture_output=True)

    def curve(d):
        rows = [json.loads(l) for l in open(d / "metrics.jsonl") if '"loss"' in l]
        return {r["step"]: r["loss"] for r in rows}  # a resumed run rewrites the steps after its checkpoint

    ref, got = curve(ref_dir), curve(killed_dir)
    assert sorted(got) == list(range(1, 11))
    for step, loss in ref.items():
        assert got[step] == pytest.approx(loss, rel=1e-6, abs=1e-7), step
    a = json.load(open(ref_dir / "summary.json"))
    b = json.load(open(killed_dir / "summary.json"))
    assert b["eval_after"] == a["eval_after"]


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    from mmkernels.train import checkpoint as ckpt

    run = trainer.Run.build(_cfg(tmp_path, keep_checkpoints=2))
    for _ in range(3):
        run.train_step()
        run.save_checkpoint()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(root)) == ["latest", "step_00000002", "step_00000003"]
    assert ckpt.latest(str(tmp_path / "run")).endswith("step_00000003")


def test_resume_refuses_a_checkpoint_of_other_parameters(tmp_path):
    """A checkpoint's trainable tensors must be exactly this run's (a superset, from a run with more LoRA targets,
    is refused too: loading part of it would resume a different model), and a `latest` naming a missing
    checkpoint is an error, not a fresh start."""
    from mmkernels.train import checkpoint as ckpt

    kw = _instructions(tmp_path)
    run = trainer.Run.build(_cfg(tmp_path, method="lora", **kw))
    run.save_checkpoint()
    fewer = trainer.Run.build(_cfg(tmp_path, method="lora", method_options={"targets": ["q_proj"]}, **kw))
    with pytest.raises(ValueError, match="differ from this run's trainable parameters"):
        fewer.resume()
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000009\n")
    with pytest.raises(FileNotFoundError, match="step_00000009, which is incomplete or missing"):
        ckpt.latest(str(tmp_path / "run"))


# -- memory estimate -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recompute", [False, True])
def test_estimate_matches_the_model(tmp_path, recompute):
    """Weights, gradients and optimizer state are the built run's; activations, logits and backward are the
    peak of its training step on a batch of batch_size x max_len tokens (test_memory.py checks the trace method
    by method)."""
    cfg = _cfg(tmp_path, vision=None, grad_checkpointing=recompute, data=str(tmp_path / "d.jsonl"),
               data_format="instruction", max_len=256, batch_size=2)
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}))
    est = memory.estimate(cfg)
    run = trainer.Run.build(cfg)
    n = sum(p.numel() for p in run.params.values())
    assert est["optimizer"] == 8 * n and est["gradients"] == 4 * n
    assert est["weights"] == _weight_bytes(run.model)
    batch = memory.traced_batch(cfg, run.spec, run.vision, run.device)
    batch = batch._replace(input_ids=torch.randint(3, 200, batch.input_ids.shape))
    assert run.model.gradient_checkpointing == recompute
    peak = memory.step_peak(run.loss_module, batch)
    assert (est["activations"], est["logits"], est["backward"]) == peak[1:4]
    assert est["total"] == est["weights"] + est["gradients"] + est["optimizer"] + peak.total


def _weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_qpaca_estimate_and_counts_hold_the_quantized_base(tmp_path):
    """QPaCA keeps its base as NF4 codes and scales beside full-precision columns: the estimate's weights
    count them, and the trainable percentage counts the base as the d_out x d_in elements it stands for, as
    PaCA's nn.Linear weights are (the built-in model's 344-wide MLP is not a multiple of the NF4 block)."""
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "x", "output": "y"}))
    runs = {}
    for quantize in (None, "nf4"):
        cfg = _cfg(tmp_path, vision=None, data=str(tmp_path / "d.jsonl"), data_format="instruction",
                   method="paca", method_options={"rank": 4, "quantize": quantize})
        run = runs[quantize] = trainer.Run.build(cfg)
        assert memory.estimate(cfg)["weights"] == _weight_bytes(run.model)
    assert trainer.model_numel(runs["nf4"].model) == trainer.model_numel(runs[None].model)
    assert _weight_bytes(runs["nf4"].model) < 0.4 * _weight_bytes(runs[None].model)


def test_step_tokens_leave_the_padding_out(tmp_path):
    """A step's `tokens` (hence tokens/s) counts the text tokens of its batch, not the padded batch size."""
    rows = [{"instruction": "x" * n, "output": "y"} for n in (1, 12, 5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = trainer.Run.build(_cfg(tmp_path, vision=None, data=str(tmp_path / "d.jsonl"), data_format="instruction",
                                 batch_size=3, max_steps=1))
    lengths = [len(s.input_ids) for s in run.loader.samples]
    assert len(set(lengths)) == 3  # the batch is padded to the longest
    row = run.train_step()
    assert row["tokens"] == sum(lengths) < 3 * max(lengths)


def test_estimate_command(capsys):
    from mmkernels.cli import main

    assert main(["train", "--estimate", "--vision", "tiny"]) == 0
    out = capsys.readouterr().out
    for key in ("weights", "gradients", "optimizer", "activations", "logits", "total"):
        assert key in out
    assert "gathered" not in out  # FSDP2's all-gathered parameters: only when there are shards


def test_estimate_per_process(capsys, monkeypatch):
    """With several processes (--processes, default WORLD_SIZE as torchrun sets it) --estimate prints one
    process's share: FSDP2 shards the weights and the optimizer state and gathers blocks (checked against an
    FSDP2 run in test_distributed.py); DDP holds everything and doubles the gradients (its buckets are a copy).
    A mode that cannot run on that many processes is refused, naming where the count came from."""
    from mmkernels.cli import main

    cfg = TrainConfig(vision="tiny")
    one = memory.estimate(cfg)
    fsdp = memory.estimate(dataclasses.replace(cfg, distributed="fsdp"), processes=4)
    assert fsdp["weights"] < one["weights"] and fsdp["gathered"] > 0
    assert fsdp["optimizer"] == pytest.approx(one["optimizer"] / 4, rel=0.02)
    ddp = memory.estimate(cfg, processes=4)  # auto: ddp for several processes
    assert ddp["weights"] == one["weights"] and ddp["gradients"] == 2 * one["gradients"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert memory.estimate(cfg) == ddp
    assert main(["train", "--estimate", "--vision", "tiny", "--distributed", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "on each of 4 processes (fsdp)" in out and "gathered" in out
    with pytest.raises(ValueError, match="WORLD_SIZE=4"):
        main(["train", "--estimate", "--distributed", "none"])
    with pytest.raises(ValueError, match="--processes=1"):
        main(["train", "--estimate", "--processes", "1", "--distributed", "fsdp"])
    with pytest.raises(ValueError, match="--processes: expected at least 1"):
        main(["train", "--estimate", "--processes", "0"])
    with pytest.raises(ValueError, match="--processes: only with --estimate"):
        main(["train", "--processes", "2"])


# -- bad input ---------------------------------------------------------------------------------------------------
def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(ValueError, match=rf"{path}:2"):
        trainer.Run.build(_cfg(tmp_path, vision=None, data=str(path), data_format="instruction"))


def test_missing_image_is_named(tmp_path):
    path = tmp_path / "mm.jsonl"
    path.write_text(json.dumps({"question": "q?", "choices": ["a", "b"], "answer": 0, "image": "nope.npy"}) + "\n")
    with pytest.raises(ValueError, match=r"mm.jsonl:1.*nope.npy"):
        trainer.Run.build(_cfg(tmp_path, data=str(path), data_format="scienceqa"))


def test_tokenizer_model_mismatch(tmp_path):
    from mmkernels.models import Llama, LlamaConfig

    cfg = LlamaConfig.tiny()
    cfg.vocab_size = 200  # smaller than the byte tokenizer's 259 ids
    cfg.pad_token_id = cfg.bos_token_id = cfg.eos_token_id = 0
    Llama(cfg).save_pretrained(str(tmp_path / "m"))
    with pytest.raises((ValueError, OSError), match="tokenizer"):
        trainer.Run.build(_cfg(tmp_path, model=str(tmp_path / "m"), vision=None))


def test_images_with_a_text_only_method(tmp_path):
    with pytest.raises(ValueError, match="'lora' is text-only"):
        run = trainer.Run.build(_cfg(tmp_path, method="lora"))
        run.train_step()


def test_lr_multipliers_by_longest_prefix():
    from torch import nn

    params = {n: nn.Parameter(torch.zeros(1)) for n in ("visual_projection.a", "visual_projection.out.b", "layers.0.c")}
    groups = trainer.param_groups(params, 0.1, {"visual_projection": 0.5, "visual_projection.out": 0.0})
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr == {0.05: {id(params["visual_projection.a"])}, 0.0: {id(params["visual_projection.out.b"])},
                     0.1: {id(params["layers.0.c"])}}
    with pytest.raises(ValueError, match=r"prefixes \['vision'\] match no trainable parameter"):
        trainer.param_groups(params, 0.1, {"vision": 2.0})
    assert _parse(["--lr-multiplier", "visual_projection=0.3"]).lr_multipliers == {"visual_projection": 0.3}


def test_prompt_ends_is_the_position_before_the_first_trained_label():
    """prompt_end (a method's conditioning position, HyperLLaVA's guidance) is the last prompt position: the one
    whose logits predict the first trained token, as evaluation's len(prompt_ids) - 1; a row with no trained
    label gives its last position."""
    I = trainer.IGNORE
    labels = torch.tensor([[I, I, I, 5, 6], [I, 7, 8, I, I], [I, I, I, I, I]])
    assert trainer.prompt_ends(labels).tolist() == [2, 0, 4]
