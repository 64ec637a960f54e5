"""Data-parallel training on CPU: 2 processes with the gloo backend (torchrun), under DDP and FSDP2.

Each rank reads half of every global batch; the adapters must end identical on both ranks and equal to a
single process trained on the whole global batch.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _data import write_instructions
from _processes import free_port, on_two_processes

STEPS = ["--max-steps", "3", "--no-progress", "--warmup-steps", "1", "--max-grad-norm", "0", "--no-fused-loss"]
COMMON = ["--vision", "tiny", "--demo-samples", "32", "--demo-eval-samples", "8", "--max-len", "160", *STEPS]


def _train(out, *extra, nproc=1, common=COMMON):
    if nproc == 1:
        cmd = [sys.executable, "-m", "mmkernels.cli", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "mmkernels.cli", "train"]
    proc = subprocess.run([*cmd, *common, "--out-dir", str(out), *extra], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), json.load(open(out / "summary.json"))


def _one_process(out, common=COMMON):
    """One process on the global batch of 8 in one step, and the same batch as 2 accumulated halves: the second
    sums the gradients in another order, as 2 processes do, and its distance from the first is float32's
    reduction-order noise for this model on this CPU (it differs between AVX2 and AVX-512 machines)."""
    ref = _train(out / "one", "--batch-size", "8", common=common)
    halves, _ = _train(out / "halves", "--batch-size", "4", "--grad-accum", "2", common=common)
    return ref, halves


def _assert_equal_to_one_process(got, ref, halves):
    """2 processes end at one process's adapters: within 4x the reordering noise of `halves` plus 2e-6
    (a wrongly reduced gradient is off by about a step, ~1e-3). LaVIN's routing gradients (routers, modality
    embedding) are small differences of large terms (two experts' softmax; zero at step 0), so the order of the
    reduction changes them by ~1e-3 relative, and Adam's normalised step passes that on."""
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        noise = float((halves[name] - t).abs().max())
        routing = ".router." in name or name.startswith("modality_embedding")
        atol = max(5e-3 * float(t.abs().max()) if routing else 0.0, 4 * noise + 2e-6)
        torch.testing.assert_close(got[name], t, rtol=2e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _one_process(tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_global_batch(tmp_path, single, mode):
    (ref, ref_summary), halves = single
    got, summary = _train(tmp_path, "--batch-size", "4", "--distributed", mode, nproc=2)
    assert summary["world_size"] == 2
    _assert_equal_to_one_process(got, ref, halves)
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], rel=1e-5)


def test_ranks_hold_identical_adapters(tmp_path):
    """The trainer compares every rank's trainable parameters with rank 0's at the end of a run."""
    _, summary = _train(tmp_path, "--batch-size", "4", "--distributed", "ddp", nproc=2)
    assert summary["rank_max_diff"] == 0.0


@pytest.fixture(scope="module")
def instructions(tmp_path_factory):
    return write_instructions(tmp_path_factory.mktemp("data") / "d.jsonl", repeat=8)


# PaCA writes W_eff's columns into row shards; LaVIN trains in one pass (its routing pass would run each block
# twice); Compacter's shared rule is held by the model alone; HyperLLaVA's guidance crosses blocks. Every method
# shards each block on its own.
@pytest.mark.parametrize("method", ["paca", "lavin", "compacter", "hyperllava"])
def test_fsdp_trains_every_method_like_one_process(tmp_path, instructions, method):
    text = ["--data", instructions, "--data-format", "instruction", "--method", method, "--max-len", "192", *STEPS]
    (ref, ref_summary), halves = _one_process(tmp_path, common=text)
    got, summary = _train(tmp_path / "two", "--batch-size", "4", "--distributed", "fsdp", nproc=2, common=text)
    assert summary["world_size"] == 2 and summary["rank_max_diff"] == 0.0
    assert summary["fsdp_block_groups"] == 2 and ref_summary["fsdp_block_groups"] == 0  # the tiny model's 2 blocks
    if method == "paca":  # the fused step, on each process's row shards
        assert summary["optimizer"] == ref_summary["optimizer"] == "PaCAAdamW"
    _assert_equal_to_one_process(got, ref, halves)
    assert sum(int(t.abs().sum() > 0) for t in ref.values()) > 0  # the runs trained something


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    """7 text-only conversations and 1 with an image: a global batch of 8 split over 2 processes always gives
    one process the image and the other none."""
    import numpy as np

    root = tmp_path_factory.mktemp("one_image")
    image = root / "red.npy"
    np.save(image, np.full((32, 32, 3), (200, 30, 30), dtype=np.uint8))
    rows = [{"conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
            for w in ("yes", "no", "maybe", "never", "now", "later", "soon")]
    rows.append({"image": str(image), "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                         {"from": "gpt", "value": "red"}]})
    path = root / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("mode,method", [("ddp", "lavin"), ("fsdp", "lavin"), ("fsdp", "hyperllava")])
def test_a_process_without_images_beside_one_with_images(tmp_path, one_image, mode, method):
    """DDP and FSDP2 need every process to agree on which parameters have gradients; a process whose samples
    are all text-only runs the visual path on placeholders (exact zero gradients) and the run equals one
    process on the global batch. Before, DDP stopped with unused parameters and FSDP2 called mismatched
    collectives."""
    common = ["--data", one_image, "--data-format", "multimodal", "--vision", "tiny", "--method", method,
              "--max-len", "96", *STEPS]
    (ref, _), halves = _one_process(tmp_path, common=common)
    got, summary = _train(tmp_path / "two", "--batch-size", "4", "--distributed", mode, nproc=2, common=common)
    assert summary["rank_max_diff"] == 0.0 and sorted(got) == sorted(ref)
    visual = [n for n in ref if n.startswith(("visual_projection.", "visual_projector.", "lavin_vision."))]
    assert visual and all(ref[n].abs().sum() > 0 for n in visual if ".weight" in n)
    _assert_equal_to_one_process(got, ref, halves)


def test_fsdp_resumes_a_one_process_checkpoint(tmp_path, instructions):
    """Checkpoints hold whole tensors by name, so a run resumes under another world size: FSDP2 on 2 processes
    continues a 1-process PaCA run from its step-2 checkpoint (optimizer state sharded on load, W_eff's columns
    re-synced in each row shard) to the uninterrupted run's losses and adapter."""
    import shutil

    common = ["--data", instructions, "--data-format", "instruction", "--method", "paca", "--max-len", "192",
              "--max-steps", "4", *STEPS[2:], "--save-every", "2", "--keep-checkpoints", "5"]
    ref, _ = _train(tmp_path / "one", "--batch-size", "8", common=common)
    resumed = tmp_path / "two"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "one/checkpoints/step_00000002", resumed / "checkpoints/step_00000002")
    (resumed / "checkpoints/latest").write_text("step_00000002")
    got, summary = _train(resumed, "--batch-size", "4", "--distributed", "fsdp", "--resume", nproc=2, common=common)
    assert summary["steps"] == 4 and summary["rank_max_diff"] == 0.0

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "loss" in r}

    want, have = losses(tmp_path / "one"), losses(resumed)
    assert sorted(have) == [3, 4] and [have[s] for s in (3, 4)] == pytest.approx([want[s] for s in (3, 4)], rel=1e-5)
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=2e-5, atol=2e-6, msg=name)


def test_compacter_rule_leaves_every_block_its_own_fsdp_group():
    """The shared phm rule is held by the model alone, so FSDP2 shards each block on its own; a rule held by
    the adapters themselves (PHMAdapter given the nn.Parameter) would put every block in the root group."""
    from mmkernels.methods import compacter as cp
    from mmkernels.models.config import LlamaConfig
    from mmkernels.models.llama import Llama
    from mmkernels.nn.phm_adapter import PHMAdapter, new_phm_rule
    from mmkernels.train.distributed import shares_parameters_across_blocks

    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = cp.apply(Llama(cfg), cp.CompacterConfig(reduction=8))
    assert not shares_parameters_across_blocks(model, list(model.layers))
    rule = new_phm_rule(4)
    for block in model.layers:
        block.mlp.compacter = PHMAdapter(64, 8, 4, phm_rule=rule)
    assert shares_parameters_across_blocks(model, list(model.layers))


def _qpaca_sharded(mesh, shards_integers):
    """On each of 2 processes: a QPaCA-NF4 model sharded per block as the trainer shards it, by a torch whose
    FSDP2 shards integer parameters or not; the storage this process holds of the first layer, the loss and
    the deltas' gradients (gathered)."""
    from torch.distributed.tensor import DTensor

    from mmkernels.methods import paca
    from mmkernels.train import distributed

    distributed.FSDP_SHARDS_INTEGERS = shards_integers
    model, ids = _qpaca_model_and_ids()
    distributed.fsdp_shard(model, list(model.layers), mesh=mesh)
    layer = model.layers[0].mlp.down_proj
    held = {n: (type(p).__name__, (p.to_local() if isinstance(p, DTensor) else p).numel(), p.numel()) for n, p in
            ((n, getattr(layer, n)) for n in layer.quantized_storage)}
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in paca.adapter_parameters(model).items()}
    return {"held": held, "loss": loss.item(), "grads": grads}


def _qpaca_model_and_ids():
    from mmkernels.methods import paca
    from mmkernels.models.config import LlamaConfig
    from mmkernels.models.llama import Llama

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = paca.apply(Llama(cfg), paca.PaCAConfig(rank=4, quantize="nf4", block=32))
    with torch.no_grad():  # a nonzero delta, so that the columns take part in the check
        for p in paca.adapter_parameters(model).values():
            p.normal_(0.0, 0.05)
    return model, torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _fsdp_shards_integers():
    from mmkernels.train import distributed

    return distributed.FSDP_SHARDS_INTEGERS


@pytest.mark.parametrize("shards_integers", [
    pytest.param(True, marks=pytest.mark.skipif(not _fsdp_shards_integers(),
                                                reason="this torch's FSDP2 cannot shard integer parameters")),
    False])
def test_fsdp_shards_the_quantized_base_of_qpaca(shards_integers):
    """QPaCA's NF4 codes, scales and kept columns are frozen parameters, so FSDP2 shards them (buffers would
    stay whole on every process); the sharded model's loss and delta gradients equal the unsharded model's.
    FSDP2 before torch 2.13 cannot shard integer parameters: then the uint8 codes stay whole (ignored by
    FSDP2) and the float scales and columns are sharded, with the same loss and gradients."""
    from mmkernels.methods import paca

    got = on_two_processes(_qpaca_sharded, shards_integers)
    for name, (kind, local, whole) in got["held"].items():
        if name == "qdata" and not shards_integers:
            assert kind == "Parameter" and local == whole, (name, kind, local, whole)
        else:
            assert kind == "DTensor" and local == -(-whole // 2), (name, kind, local, whole)
    model, ids = _qpaca_model_and_ids()
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-6)
    for name, p in paca.adapter_parameters(model).items():
        torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def _held_by_fsdp_process(mesh, cfg):
    """On each of 2 processes: a trainer's FSDP2 run of cfg and the bytes this process holds: its parameters
    between steps (shards, buffers, the vision tower), its unsharded parameters while block 1 computes, and
    its gradients and AdamW moments after a step; with the whole sizes of the root's and each block's
    trainable parameters."""
    import os

    from torch.distributed.tensor import DTensor

    from mmkernels.train import memory, trainer

    os.environ["WORLD_SIZE"] = "2"  # the process group is already joined; the trainer reads its size
    run = trainer.Run.build(cfg)

    def local(ts):
        ts = [t.to_local() if isinstance(t, DTensor) else t for t in ts]
        return sum(t.numel() * t.element_size() for t in ts)

    def whole(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    def gathered(ts):  # FSDP2 all-gathers 2 equal shards: dim 0 padded to even
        return sum(2 * memory.shard_bytes(t, 2) for t in ts)

    model = run.model
    vision = [*run.vision.parameters(), *run.vision.buffers()]
    out = {"weights": local(model.parameters()) + whole(model.buffers()) + whole(vision)}
    seen = {}

    def inside_block_1(module, args):
        params = list(model.parameters())
        seen["unsharded"] = gathered(p for p in params if not isinstance(p, DTensor))
        seen["block 0 sharded"] = all(isinstance(p, DTensor) for p in model.layers[0].parameters())

    model.layers[1].input_layernorm.register_forward_pre_hook(inside_block_1)
    run.train_step()
    trainable = list(run.params.values())
    in_blocks = {id(p) for b in model.layers for p in b.parameters()}
    out.update(seen, gradients=local(p.grad for p in trainable),
               moments=local(t for p in trainable for k, t in run.optimizer.state[p].items() if k != "step"),
               block_1=gathered(model.layers[1].parameters()),
               trainable_root=whole(p for p in trainable if id(p) not in in_blocks),
               trainable_blocks=[whole(p for p in b.parameters() if p.requires_grad) for b in model.layers])
    return out


def test_estimate_under_fsdp_is_one_process_share(tmp_path):
    """`--estimate` with 2 processes under FSDP2 (LLaMA-Adapter V2, the tiny vision tower): the weights are
    this process's shards plus the buffers and the frozen tower; the gathered set is what FSDP2 holds whole
    while a block computes (the root group and that block; block 0 resharded) plus the next block, which a
    GPU prefetches; the optimizer is the moments' shards, and the gradients the gradient shards plus the
    unsharded gradients of the root and two blocks. Each figure is the trainer's own after one step."""
    from mmkernels.train import memory
    from mmkernels.train.config import TrainConfig

    cfg = TrainConfig(vision="tiny", demo_samples=16, demo_eval_samples=4, batch_size=2, max_steps=1,
                      progress=False, max_len=160, distributed="fsdp", out_dir=str(tmp_path / "run"))
    got = on_two_processes(_held_by_fsdp_process, cfg)
    est = memory.estimate(cfg, processes=2)
    assert got["block 0 sharded"]
    assert est["weights"] == got["weights"]
    assert est["gathered"] == got["unsharded"] + got["block_1"]
    assert est["optimizer"] == got["moments"]
    assert est["gradients"] == got["gradients"] + got["trainable_root"] + sum(sorted(got["trainable_blocks"])[-2:])
    one = memory.estimate(dataclasses.replace(cfg, distributed="none"), processes=1)
    assert est["weights"] < one["weights"] and est["optimizer"] * 2 == one["optimizer"]


def test_finish_leaves_the_group_and_skips_teardown(tmp_path):
    """A finished `mmkernels train` under torchrun leaves the process group (after a barrier) and exits with
    status 0 without the interpreter's teardown (where a finished gloo process was seen to abort): its output
    is flushed, an atexit handler does not run; without a group, shutdown does nothing."""
    script = f"""
import atexit, torch.distributed as dist
from mmkernels.train import distributed
distributed.shutdown()
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
atexit.register(lambda: print("teardown ran"))
print("group", dist.is_initialized(), end=" ")
distributed.shutdown()
print("then", dist.is_initialized())
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store2'}", rank=0, world_size=1)
print("finishing", end="")
distributed.finish()
print("after finish")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "group True then False\nfinishing", proc.stdout
