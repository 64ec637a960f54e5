"""`mmkernels train --method paca` steps with the fused PaCAAdamW (AdamW + the W_eff column write in one pass).

The oracle is the trainer's other path, torch.optim.AdamW over the deltas + methods.paca.sync after every
step (`--no-fused-optimizer`). On CPU, float32, the fused reference backend runs torch's single-tensor AdamW
operations, so the two paths must agree bit for bit (losses, deltas, weights, optimizer state) with lr
multipliers and gradient clipping active. The Triton kernel (interpreter) differs from torch's CPU AdamW only
in its correctly rounded square root, so it agrees to a few ulps of the update per step.
"""

import json
import subprocess
import sys

import pytest
import torch

import mmkernels
from _processes import free_port, on_two_processes
from mmkernels import backend
from mmkernels.methods import paca
from mmkernels.nn import paca_adamw as paca_adamw_module
from mmkernels.nn.paca_adamw import PaCAAdamW
from mmkernels.nn.paca_linear import PaCALinear
from mmkernels.reference import paca as ref_paca
from mmkernels.train import method_specs, trainer
from mmkernels.train.config import TrainConfig

# A multiplier on the first block's deltas gives two param groups; max_grad_norm is below the gradient norm
# of every step (checked), so clipping rescales each gradient.
OPTS = dict(data_format="multimodal", method="paca", batch_size=4, max_len=48, warmup_steps=1, progress=False,
            device="cpu", dtype="float32", lr=2e-2, weight_decay=0.05, beta2=0.99, max_grad_norm=0.05,
            lr_multipliers={"layers.0.": 3.0}, method_options={"rank": 4, "scaling": 0.5}, fused_loss=False)
STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    words = ("yes", "no", "maybe", "never", "always", "sometimes")
    rows = [{"conversations": [{"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w}]}
            for w in words] * 4
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _cfg(data, out, **kw):
    return TrainConfig(**{**OPTS, "data": data, "out_dir": str(out), **kw})


def _paca_layers(run):
    return {n: m for n, m in paca.layers(run.model).items() if isinstance(m, PaCALinear)}


def _assert_weights_hold_w_eff(run, base):
    """Every PaCALinear's weight is W with its columns I = orig + s delta (one rounding), the rest untouched."""
    for name, layer in _paca_layers(run).items():
        w = layer.weight.detach()
        expect = base[name].clone()
        expect[:, layer.idx] = ref_paca.synced_columns(layer.orig_cols, layer.delta.detach(), layer.scaling, w.dtype)
        assert torch.equal(w, expect), name


def _train(run, steps):
    """The rows of `steps` train_step calls, with the W_eff invariant checked after every step."""
    base = {n: m.weight.detach().clone() for n, m in _paca_layers(run).items()}
    rows = []
    for _ in range(steps):
        rows.append(run.train_step())
        _assert_weights_hold_w_eff(run, base)
    return rows


# -- the fused step equals AdamW + sync ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, data):
    """The oracle: a run of STEPS steps with AdamW + sync, and its train_step rows."""
    run = trainer.Run.build(_cfg(data, tmp_path_factory.mktemp("plain"), fused_optimizer=False))
    return run, _train(run, STEPS)


@pytest.mark.parametrize("optimizer_backend", ["reference", "triton"])
def test_fused_training_equals_adamw_plus_sync(tmp_path, data, plain_run, monkeypatch, optimizer_backend):
    if optimizer_backend == "triton" and not backend.triton_interpret():
        pytest.skip("the CPU comparison runs Triton through the interpreter (TRITON_INTERPRET=1)")
    # The fused step runs `optimizer_backend`; the forward and backward keep the automatic choice (reference).
    fused_step, calls = paca_adamw_module.paca_adamw_sync, []

    def forced(*args, **kwargs):
        calls.append(1)
        with mmkernels.use_backend(optimizer_backend):
            return fused_step(*args, **kwargs)

    monkeypatch.setattr(paca_adamw_module, "paca_adamw_sync", forced)
    plain, want = plain_run
    fused = trainer.Run.build(_cfg(data, tmp_path / "fused"))
    assert type(plain.optimizer) is torch.optim.AdamW and type(fused.optimizer) is PaCAAdamW
    # the lr multiplier: two groups of deltas, at lr and 3 lr, the same in both optimizers
    lrs = sorted(g["lr"] for g in fused.optimizer.param_groups)
    assert lrs == pytest.approx([OPTS["lr"], 3 * OPTS["lr"]])
    assert [[id(p) for p in g["params"]] for g in fused.optimizer.param_groups] == \
        [[id(fused.params[n]) for n in names] for names in _group_names(plain)]
    got = _train(fused, STEPS)
    assert len(calls) == STEPS * len(fused.params)  # every delta, every step, through the fused op
    assert all(r["grad_norm"] > OPTS["max_grad_norm"] for r in want)  # clipping was active on every step
    exact = optimizer_backend == "reference"
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    if exact:
        assert [r["loss"] for r in got] == [r["loss"] for r in want]
        assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in want]
    else:
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-6)
    layers_plain, layers_fused = _paca_layers(plain), _paca_layers(fused)
    moved = 0
    for name, a in layers_plain.items():
        b = layers_fused[name]
        moved += int(a.delta.abs().max() > 0)
        sa, sb = plain.optimizer.state[a.delta], fused.optimizer.state[b.delta]
        assert torch.equal(sa["step"], sb["step"]) and sb["step"].item() == STEPS
        if exact:
            assert torch.equal(b.delta, a.delta), name
            assert torch.equal(b.weight, a.weight), name
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(sb[k], sa[k]), (name, k)
        else:
            # a few ulps of the update (<= lr_max per step) per step, on deltas of size ~STEPS * lr_max
            atol = STEPS * 8 * torch.finfo(torch.float32).eps * 3 * OPTS["lr"]
            torch.testing.assert_close(b.delta, a.delta, rtol=1e-5, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
            # the weights hold orig + s delta of their own deltas (checked every step): off by s times the deltas'
            # difference and a rounding
            w_tol = a.scaling * float((b.delta - a.delta).detach().abs().max()) + float(a.weight.abs().max()) * 2 ** -23
            torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=w_tol, msg=lambda m, name=name: f"{name}: {m}")
    assert moved == len(layers_plain)


def _group_names(run):
    index = {id(p): n for n, p in run.params.items()}
    return [[index[id(p)] for p in g["params"]] for g in run.optimizer.param_groups]


# -- checkpoint and resume -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    """The losses and final deltas of 4 uninterrupted fused steps (AdamW + sync gives the same bits, see above)."""
    run = trainer.Run.build(_cfg(data, tmp_path_factory.mktemp("full"), max_steps=4))
    losses = [run.train_step()["loss"] for _ in range(4)]
    return losses, {n: p.detach().clone() for n, p in run.params.items()}


@pytest.mark.parametrize("save_fused,resume_fused", [(True, True), (False, False), (True, False)],
                         ids=["fused", "plain", "fused-then-plain"])
def test_resume_continues_exactly(tmp_path, data, uninterrupted, save_fused, resume_fused):
    """A run resumed from a checkpoint at step 2 gives the uninterrupted run's losses and deltas; the state
    dict moves between PaCAAdamW and AdamW (a fused run resumed with --no-fused-optimizer)."""
    expected, final = uninterrupted
    part = trainer.Run.build(_cfg(data, tmp_path, max_steps=4, fused_optimizer=save_fused))
    for _ in range(2):
        part.history.append({"step": part.step + 1, "loss": part.train_step()["loss"]})
    part.save_checkpoint()
    resumed = trainer.Run.build(_cfg(data, tmp_path, max_steps=4, resume=True, fused_optimizer=resume_fused))
    assert type(resumed.optimizer) is (PaCAAdamW if resume_fused else torch.optim.AdamW)
    assert resumed.resume() and resumed.step == 2
    losses = [r["loss"] for r in _train(resumed, 2)]
    assert losses == expected[2:]
    for name, p in final.items():
        assert torch.equal(resumed.params[name], p), name


# -- where the old path stays ----------------------------------------------------------------------------------
def test_option_off_and_quantized_base_use_adamw_with_sync(tmp_path, data):
    for kw in ({"fused_optimizer": False}, {"method_options": {"rank": 4, "quantize": "int8", "block": 32}}):
        run = trainer.Run.build(_cfg(data, tmp_path / "run", **kw))
        assert type(run.optimizer) is torch.optim.AdamW, kw
        assert len(run.optimizer._optimizer_step_post_hooks) == 1, kw  # paca.sync_after_step
    # a method without a fused optimizer: AdamW whatever the option
    spec = method_specs.get("lora")
    assert spec.optimizer is None


def _step_row_shards(mesh, out_features):
    """On each of 2 processes: PaCA layers of the given widths, sharded by rows with fully_shard, take 3
    PaCAAdamW steps on seeded whole gradients (each process given its rows); the gathered weights and
    deltas."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    model = _row_shard_layers(out_features)
    for m in model:
        fully_shard(m, mesh=mesh)
    assert all(hasattr(m.delta, "device_mesh") and hasattr(m.weight, "device_mesh") for m in model)
    opt = PaCAAdamW(list(model), lr=3e-2, weight_decay=0.1)
    for grads in _row_shard_grads(out_features):
        for m, g in zip(model, grads):
            m.delta.grad = distribute_tensor(g, mesh, [Shard(0)])
        opt.step()
    return [(m.weight.full_tensor(), m.delta.detach().full_tensor()) for m in model]


def _row_shard_layers(out_features):
    torch.manual_seed(0)
    return [PaCALinear(torch.nn.Linear(12, d), 3, scaling=0.5, name=f"l{d}") for d in out_features]


def _row_shard_grads(out_features, steps=3):
    gen = torch.Generator().manual_seed(1)
    return [[torch.randn(d, 3, generator=gen) for d in out_features] for _ in range(steps)]


def test_fsdp_row_shards_step_like_whole_tensors():
    """Under FSDP2 the fused step runs on each process's rows (torch.chunk's pieces: 5 rows as 3 + 2, and a
    1-row layer that leaves the second process none) and ends bit-identical to the step on whole tensors."""
    widths = (1, 5, 8)
    sharded = on_two_processes(_step_row_shards, widths)
    whole = _row_shard_layers(widths)
    opt = PaCAAdamW(whole, lr=3e-2, weight_decay=0.1)
    for grads in _row_shard_grads(widths):
        for m, g in zip(whole, grads):
            m.delta.grad = g
        opt.step()
    for i, m in enumerate(whole):
        weight, delta = sharded[i]
        assert torch.equal(delta, m.delta.detach()) and delta.abs().sum() > 0, m.name
        assert torch.equal(weight, m.weight.detach()), m.name


def test_ddp_steps_fused_like_one_process(tmp_path, data):
    """Under DDP (gradients all-reduced before the step) the fused optimizer runs on every rank: two processes
    of 4 samples end with one process's adapter on the global batch of 8, and identical on both ranks."""
    from safetensors.torch import load_file

    one = trainer.Run.build(_cfg(data, tmp_path / "one", batch_size=8, max_steps=3, max_grad_norm=0.0))
    one.train()
    args = ["--data", data, "--data-format", "multimodal", "--method", "paca", "--method-option", "rank=4",
            "--max-len", "48", "--max-steps", "3", "--warmup-steps", "1", "--lr", str(OPTS["lr"]), "--no-progress",
            "--max-grad-norm", "0", "--no-fused-loss", "--device", "cpu", "--dtype", "float32", "--batch-size", "4",
            "--distributed", "ddp", "--out-dir", str(tmp_path / "two"), "--weight-decay", str(OPTS["weight_decay"]),
            "--beta2", str(OPTS["beta2"]), "--lr-multiplier", "layers.0.=3.0", "--method-option", "scaling=0.5"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "mmkernels.cli", "train", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["optimizer"] == "PaCAAdamW" and summary["world_size"] == 2 and summary["rank_max_diff"] == 0.0
    ref = load_file(str(tmp_path / "one" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "two" / "adapter" / "adapter_model.safetensors"))
    assert sorted(got) == sorted(ref)
    for name, t in ref.items():
        torch.testing.assert_close(got[name], t, rtol=2e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


# -- the run names its optimizer -------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [True, False])
def test_summary_names_the_optimizer(tmp_path, data, capsys, fused):
    run = trainer.Run.build(_cfg(data, tmp_path, max_steps=1, fused_optimizer=fused))
    summary = run.train()
    name = "PaCAAdamW" if fused else "AdamW"
    assert summary["optimizer"] == name
    assert json.load(open(tmp_path / "summary.json"))["optimizer"] == name
    out = capsys.readouterr().out
    assert f"; optimizer {name}" in out.splitlines()[0] and f", optimizer {name}" in out


# -- PaCAAdamW's param groups --------------------------------------------------------------------------------
def test_param_groups_of_modules_equal_torch_adamw_groups():
    gen = torch.Generator().manual_seed(0)
    layers = [PaCALinear(torch.nn.Linear(12, 5 + i), 3, scaling=0.5, name=f"l{i}") for i in range(3)]
    deltas = [torch.nn.Parameter(torch.zeros_like(m.delta)) for m in layers]
    opt = PaCAAdamW([{"params": layers[:2], "lr": 3e-2, "tag": 1}, {"params": layers[2], "weight_decay": 0.0}],
                    lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)
    torch_opt = torch.optim.AdamW([{"params": deltas[:2], "lr": 3e-2}, {"params": deltas[2:], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1, foreach=False)
    assert opt.param_groups[0]["tag"] == 1 and opt.param_groups[1]["lr"] == 1e-2
    with mmkernels.use_backend("reference"):
        for _ in range(3):
            for m, d in zip(layers, deltas):
                g = torch.randn(m.delta.shape, generator=gen)
                m.delta.grad, d.grad = g.clone(), g.clone()
            opt.step()
            torch_opt.step()
    for m, d in zip(layers, deltas):
        assert torch.equal(m.delta, d)
        assert torch.equal(m.weight[:, m.idx], ref_paca.synced_columns(m.orig_cols, d.detach(), 0.5, m.weight.dtype))


def test_param_group_errors():
    layer = PaCALinear(torch.nn.Linear(8, 4), 2)
    with pytest.raises(ValueError, match=r"modules\[0\]: a param group needs a 'params' entry"):
        PaCAAdamW([{"lr": 1e-3}])
    with pytest.raises(TypeError, match=r"modules\[0\]\['params'\]\[0\]: expected a PaCALinear, got Parameter"):
        PaCAAdamW([{"params": [layer.delta]}])
    with pytest.raises(ValueError, match=r"modules\[1\]: lr: expected a number >= 0, got -1.0"):
        PaCAAdamW([{"params": [layer]}, {"params": [PaCALinear(torch.nn.Linear(8, 4), 2)], "lr": -1.0}])
    with pytest.raises(TypeError, match="got a mix of both"):
        PaCAAdamW([layer, {"params": [PaCALinear(torch.nn.Linear(8, 4), 2)]}])
    with pytest.raises(ValueError, match="listed twice"):
        PaCAAdamW([{"params": [layer]}, {"params": [layer]}])
