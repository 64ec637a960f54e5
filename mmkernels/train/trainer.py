"""The training loop of `mmkernels train`: build the model, method and data from a TrainConfig, train with
AdamW on the trainable parameters only, log, checkpoint, resume, evaluate and save the adapter.

The optimizer is torch.optim.AdamW plus the method's step hook (`attach`), or, with `fused_optimizer` and a
method that has one, the method's fused equivalent (PaCA: PaCAAdamW, which writes W_eff's columns in the same
pass as the AdamW step). Its name is printed at the start and recorded in summary.json ("optimizer").

    run = Run.build(cfg)        # model (+ vision tower), method applied, data, optimizer, schedule
    summary = run.train()       # returns the end-of-run summary (also printed and written to summary.json)

The loss of one optimizer step is the token-level mean over every trained token of the global batch (all
micro-batches, all processes): each micro-batch contributes its sum of token losses divided by the global
count, so gradient accumulation and data parallelism give the same update as one big batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import _checks
from mmkernels.models import Llama, LlamaConfig
from mmkernels.models.loading import atomic_write
from mmkernels.train import checkpoint as ckpt
from mmkernels.train import distributed as dist_utils
from mmkernels.train import method_specs
from mmkernels.train.config import TrainConfig

IGNORE = -100


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The learning-rate factor at optimizer step `step` (0-based): linear warmup from 1/warmup to 1 over
    `warmup` steps, then a cosine from 1 down to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_head_parts(model: Llama):
    """(weight, bias) such that logits = h W^T + b, differentiable in the lm_head's trainable parameters."""
    head = model.lm_head
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    folded = getattr(head, "folded", None)
    if folded is None:
        raise TypeError(f"fused_loss: the lm_head is a {type(head).__name__}, which has no folded() (W, b); "
                        "set fused_loss = false to use the module itself")
    return folded()


def token_loss_sum(model: Llama, hidden: torch.Tensor, labels: torch.Tensor, fused: bool,
                   chunk: Optional[int]) -> torch.Tensor:
    """Sum over the trained tokens of the next-token cross-entropy; hidden (B, T, d), labels (B, T)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    if fused:
        from mmkernels.ops.linear_cross_entropy import linear_cross_entropy

        weight, bias = lm_head_parts(model)
        return linear_cross_entropy(h, weight.to(h.dtype), target, bias=None if bias is None else bias.to(h.dtype),
                                        ignore_index=IGNORE, reduction="sum", chunk_size=chunk)
    logits = model.lm_head(h).float()
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")


class LossModule(nn.Module):
    """The model with its method's inputs and its loss, as one module: what DDP wraps and FSDP2 shards as the
    root, so that every trainable weight (the visual projection that turns images into the method's inputs,
    the lm_head weight the fused loss reads directly) is used inside the root's forward."""

    def __init__(self, model: Llama, spec: method_specs.MethodSpec, vision: Optional[nn.Module], fused: bool,
                 chunk: Optional[int]) -> None:
        super().__init__()
        self.model, self.fused, self.chunk = model, fused, chunk
        self.spec = spec
        self._vision = [vision]  # not a submodule: the frozen tower is neither sharded nor saved with the model

    def inputs(self, batch, prompt_end: Optional[torch.Tensor] = None) -> method_specs.ModelInputs:
        """The model's forward arguments for a batch (the method turns images into its visual inputs).
        prompt_end (B,): each row's last prompt position (default: before its first trained label)."""
        if prompt_end is None:
            prompt_end = prompt_ends(batch.labels)
        inputs = self.spec.inputs(self.model, self._vision[0], batch, prompt_end)
        for name in ("positions", "segment_ids"):  # unless the method has set them (from the batch's)
            if getattr(batch, name) is not None and name not in inputs.kwargs:
                inputs.kwargs[name] = getattr(batch, name)
        return inputs

    def forward(self, batch, last: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The summed token loss of the batch; with last (B,): float32 logits at those text positions instead."""
        inputs = self.inputs(batch, prompt_end=last)
        with inputs.context():
            hidden = self.model(**inputs.kwargs, hidden_only=True)
        if last is None:
            labels = batch.labels
            if inputs.prefix or inputs.suffix:
                labels = F.pad(labels, (inputs.prefix, inputs.suffix), value=IGNORE)
            return token_loss_sum(self.model, hidden, labels, self.fused, self.chunk)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last + inputs.prefix]
        weight, bias = lm_head_parts(self.model)
        logits = h.float() @ weight.float().t()
        return logits if bias is None else logits + bias.float()


def set_checkpointing(model: Llama, cfg: TrainConfig) -> None:
    """cfg's gradient checkpointing on the model: every block recomputed, or the first cfg.checkpoint_blocks;
    and cfg.recompute_attention."""
    blocks = len(model.layers)
    if cfg.checkpoint_blocks is not None and cfg.checkpoint_blocks > blocks:
        raise ValueError(f"checkpoint_blocks: expected at most the model's {blocks} blocks, got "
                         f"{cfg.checkpoint_blocks}")
    model.gradient_checkpointing = cfg.grad_checkpointing
    model.checkpoint_blocks = cfg.checkpoint_blocks
    model.recompute_attention = cfg.recompute_attention


def master_weights(model: nn.Module) -> None:
    """Trainable parameters in float32 (AdamW's master weights) on a 16-bit base: a method may unlock weights of
    the base's dtype (LLaMA-Adapter V2's norms); the ops take float32 weights with 16-bit activations."""
    masters: Dict[int, Tuple[nn.Parameter, nn.Parameter]] = {}  # id -> (16-bit parameter, its master)
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and p.dtype != torch.float32:
                if id(p) not in masters:  # a parameter held by several modules keeps one master
                    masters[id(p)] = (p, nn.Parameter(p.detach().float()))
                setattr(module, name, masters[id(p)][1])


def param_groups(params: Dict[str, nn.Parameter], lr: float, multipliers: Dict[str, float]) -> List[Dict[str, Any]]:
    """AdamW groups: one per learning rate, each parameter under the multiplier of its longest matching name
    prefix (1 without one). A prefix that matches no trainable parameter is an error."""
    unused = [p for p in multipliers if not any(name.startswith(p) for name in params)]
    if unused:
        raise ValueError(f"lr_multipliers: prefixes {unused} match no trainable parameter (some names: "
                         f"{sorted(params)[:4]})")
    groups: Dict[float, List[nn.Parameter]] = {}
    for name, p in params.items():
        hits = [k for k in multipliers if name.startswith(k)]
        factor = float(multipliers[max(hits, key=len)]) if hits else 1.0
        groups.setdefault(factor, []).append(p)
    return [{"params": ps, "lr": lr * f, "lr_multiplier": f} for f, ps in groups.items()]


def build_optimizer(spec: method_specs.MethodSpec, model: Llama, groups: List[Dict[str, Any]],
                    cfg: TrainConfig) -> torch.optim.Optimizer:
    """The method's fused optimizer over `groups` when cfg.fused_optimizer and the method has one that applies
    (spec.optimizer), else torch.optim.AdamW over them with the method's step hook (spec.attach)."""
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.fused_optimizer and spec.optimizer is not None:
        fused = spec.optimizer(model, groups, **adamw)
        if fused is not None:
            return fused
    optimizer = torch.optim.AdamW(groups, **adamw)
    if spec.attach is not None:
        spec.attach(optimizer, model)
    return optimizer


def model_numel(model: nn.Module) -> int:
    """The model's parameter count, with a quantized base weight (QPaCA: packed codes, scales and kept columns,
    a module's `quantized_storage`) counted as the elements it stands for (`quantized_numel`), so trainable
    percentages compare across methods."""
    total = 0
    for m in model.modules():
        storage = getattr(m, "quantized_storage", ())
        total += sum(p.numel() for name, p in m.named_parameters(recurse=False) if name not in storage)
        total += getattr(m, "quantized_numel", 0)
    return total


def optimizer_name(optimizer: torch.optim.Optimizer) -> str:
    return type(optimizer).__name__


def prompt_ends(labels: torch.Tensor) -> torch.Tensor:
    """(B,) the position before each row's first trained label (the row's last position when none is)."""
    trained = labels != IGNORE
    first = trained.float().argmax(dim=1)
    first = torch.where(trained.any(dim=1), first, torch.full_like(first, labels.shape[1]))
    return (first - 1).clamp_min(0)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB (process RSS)


@dataclasses.dataclass
class Run:
    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype
    model: Llama
    loss_module: LossModule
    module: nn.Module  # what forward runs: the LossModule, or its DDP wrapper (FSDP2 shards it in place)
    tokenizer: Any
    vision: Optional[nn.Module]
    spec: method_specs.MethodSpec
    params: Dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loader: Any
    eval_set: Any
    dist: dist_utils.DistInfo
    step: int = 0
    history: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    # -- building -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, cfg: TrainConfig) -> "Run":
        from mmkernels.train import data as data_mod

        dist = dist_utils.init(cfg.distributed)
        device = dist.device if dist.world_size > 1 else _checks.device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, device)
        model, tokenizer = build_model(cfg.model, cfg.tokenizer, cfg.seed, device, dtype)
        vision = build_vision(cfg.vision, cfg.seed, device, dtype)
        data_mod.check_tokenizer(tokenizer, model.config.vocab_size)
        spec = method_specs.get(cfg.method)
        torch.manual_seed(cfg.seed)  # the adapter init
        spec.apply(model, cfg.method_options, vision)
        master_weights(model)
        set_checkpointing(model, cfg)
        train_samples, eval_set = build_data(cfg, tokenizer, vision, model)
        if vision is None and any(s.image is not None for s in train_samples):
            raise ValueError("data: the samples have images but no vision tower is configured (set `vision`)")
        loss_module = LossModule(model, spec, vision, cfg.fused_loss, cfg.loss_chunk)
        module = dist_utils.wrap(loss_module, dist, some_unused=spec.multimodal and vision is not None)
        # After wrapping: FSDP2 replaces the parameters by sharded ones.
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise ValueError(f"method {cfg.method!r} left no trainable parameter with options {cfg.method_options}")
        for name, p in params.items():
            if p.dtype != torch.float32:
                raise TypeError(f"trainable parameter {name}: expected float32 (master weights), got {p.dtype}")
        optimizer = build_optimizer(spec, model, param_groups(params, cfg.lr, cfg.lr_multipliers), cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: warmup_cosine(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
        loader = data_mod.Loader(train_samples, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=True,
                                 pad_id=pad_id(tokenizer, model), packed=cfg.pack, max_len=cfg.max_len,
                                 rank=dist.rank, world_size=dist.world_size)
        return cls(cfg, device, dtype, model, loss_module, module, tokenizer, vision, spec, params, optimizer,
                   scheduler, loader, eval_set, dist)

    # -- one step -------------------------------------------------------------------------------------------
    def _next_batch(self):
        """The loader's next batch on the device; epochs follow each other without end."""
        for _ in range(2):
            if getattr(self, "_iter", None) is None:
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
                break
            except StopIteration:
                self._iter = None
        else:
            raise RuntimeError("data: the loader yields no batch")
        return batch_to(batch, self.device)

    def _autocast(self):
        if self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", dtype=self.dtype)
        return torch.autocast("cpu", enabled=False)

    def _with_visual_path(self, batches: List[Any]) -> List[Any]:
        """Processes must agree on which parameters have gradients: FSDP2 reduces only those that have one, so
        a process whose samples are all text-only while another's have images would call a different
        collective. Such a process gives its last micro-batch placeholder images (zeros, has_image False):
        the methods run text-only samples of a mixed batch exactly as alone (their visual positions hidden or
        gated off, tested), so nothing changes but the visual path's gradients, which become exact zeros.
        When no process has an image, none runs the visual path (its gradients stay None everywhere, as in
        one process, and DDP finds them unused)."""
        if self.dist.world_size == 1 or self.vision is None or not self.spec.multimodal:
            return batches
        local = int(any(b.images is not None for b in batches))
        anywhere = dist_utils.all_reduce_sum(local, self.dist)  # a collective: every process calls it
        if local or not anywhere:
            return batches
        last = batches[-1]  # not packed: packing refuses samples with images, so no process would have one
        size = image_size(self.vision)
        images = torch.zeros(last.input_ids.shape[0], 3, size, size, device=last.input_ids.device)
        return [*batches[:-1], last._replace(images=images)]

    def train_step(self) -> Dict[str, float]:
        cfg = self.cfg
        batches = self._with_visual_path([self._next_batch() for _ in range(cfg.grad_accum)])
        local_tokens = sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in batches)
        global_tokens = dist_utils.all_reduce_sum(local_tokens, self.dist)
        total = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(batches):
            with dist_utils.no_sync_unless_last(self.module, i == len(batches) - 1), self._autocast():
                loss_sum = self.module(batch)
            # Data-parallel gradients are averaged over processes: scale back to a sum over the global batch.
            (loss_sum * (self.dist.world_size / max(global_tokens, 1))).backward()
            total += float(loss_sum.detach())
        grad_norm = 0.0
        if cfg.max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm))
        lr = cfg.lr * warmup_cosine(self.step, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)  # before multipliers
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        loss = dist_utils.all_reduce_sum(total, self.dist) / max(global_tokens, 1)
        # Throughput counts the text tokens the step processed: padding is left out (a padded batch would
        # otherwise report the same tokens/s however short its samples were).
        tokens = dist_utils.all_reduce_sum(sum(int(b.attention_mask.sum()) for b in batches), self.dist)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "trained_tokens": global_tokens}

    # -- the loop -------------------------------------------------------------------------------------------
    def trainable_state(self) -> Dict[str, torch.Tensor]:
        return dist_utils.full_tensors(self.params)

    def save_checkpoint(self) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "config": self.cfg.to_dict(), "history": self.history}
        trainable = self.trainable_state()
        optim = dist_utils.optimizer_state(self.model, self.optimizer, self.params)
        if self.dist.rank == 0:
            ckpt.save(self.cfg.out_dir, self.step, trainable, optim, state, self.cfg.keep_checkpoints)
        dist_utils.barrier(self.dist)

    def resume(self) -> bool:
        path = ckpt.latest(self.cfg.out_dir)
        if path is None:
            return False
        saved = ckpt.load(path)
        names = set(self.params)
        if set(saved["trainable"]) != names:
            raise ValueError(f"resume: {path} holds parameters {sorted(set(saved['trainable']) ^ names)[:5]}... that "
                             "differ from this run's trainable parameters (a different method or model?)")
        with torch.no_grad():
            for name, p in self.params.items():
                dist_utils.copy_full_into(p, saved["trainable"][name])
        if self.spec.after_load is not None:
            self.spec.after_load(self.model)
        dist_utils.load_optimizer_state(self.model, self.optimizer, self.params, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.loader.load_state_dict(saved["loader"])
        self._iter = None
        ckpt.set_rng_state(saved["rng"])
        self.step = saved["step"]
        self.history = saved["history"]
        return True

    def _log(self, row: Dict[str, Any]) -> None:
        if self.dist.rank != 0:
            return
        with open(os.path.join(self.cfg.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def evaluate(self) -> Optional[Dict[str, float]]:
        if self.eval_set is None:
            return None
        from mmkernels.train import evaluate as ev

        with self._autocast():
            return ev.choice_accuracy(self, self.eval_set)

    def train(self) -> Dict[str, Any]:
        cfg = self.cfg
        os.makedirs(cfg.out_dir, exist_ok=True)
        resumed = cfg.resume and self.resume()
        say = self.dist.rank == 0
        if cfg.resume and not resumed and say:
            print(f"resume: no checkpoint in {ckpt.checkpoint_dir(cfg.out_dir)}; starting at step 0", flush=True)
        n_train = sum(p.numel() for p in self.params.values())
        n_all = model_numel(self.model)
        if say:
            print(f"mmkernels train: {cfg.method} on {self.model.config.num_hidden_layers}-layer LLaMA "
                  f"(hidden {self.model.config.hidden_size}) on {self.device}, {self.dtype}; trainable "
                  f"{n_train:,} of {n_all:,} ({100 * n_train / n_all:.3f}%); optimizer {optimizer_name(self.optimizer)}"
                  + (f"; resumed at step {self.step}" if resumed else ""), flush=True)
        before = None if resumed else self.evaluate()
        if before is not None and say:
            print(f"held-out accuracy before training: {_fmt_acc(before)}", flush=True)
            self._log({"step": self.step, "eval": before})
        start, tokens_done, loss = time.perf_counter(), 0, float("nan")
        while self.step < cfg.max_steps:
            row = self.train_step()
            tokens_done += row["tokens"]
            loss = row["loss"]
            elapsed = time.perf_counter() - start
            row.update(step=self.step, time_s=round(elapsed, 3), tokens_per_s=tokens_done / max(elapsed, 1e-9),
                       peak_mem_mb=round(peak_memory_mb(self.device), 1))
            self.history.append({"step": self.step, "loss": loss})
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log(row)
            if say and cfg.progress:
                _progress(self.step, cfg.max_steps, row)
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                acc = self.evaluate()
                if acc is not None:
                    self._log({"step": self.step, "eval": acc})
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        if say and cfg.progress:
            print(file=sys.stderr)
        elapsed = time.perf_counter() - start
        after = self.evaluate()
        self.save_checkpoint()
        dist_utils.save_adapter(self.spec, self.module, self.model, self.params, os.path.join(cfg.out_dir, "adapter"),
                                self.dist)
        if say:
            from mmkernels.train.inference import write_run_info

            write_run_info(os.path.join(cfg.out_dir, "adapter"), cfg)
        summary = {"method": cfg.method, "steps": self.step, "trainable_params": n_train,
                   "trainable_pct": 100 * n_train / n_all, "time_s": round(elapsed, 2),
                   "tokens_per_s": round(tokens_done / max(elapsed, 1e-9), 1),
                   "peak_mem_mb": round(peak_memory_mb(self.device), 1), "final_loss": loss,
                   "eval_before": before, "eval_after": after, "device": str(self.device),
                   "world_size": self.dist.world_size, "optimizer": optimizer_name(self.optimizer),
                   "rank_max_diff": dist_utils.max_rank_difference(self.params, self.dist),
                   "fsdp_block_groups": dist_utils.sharded_blocks(self.model)}
        if say:
            self._log({"step": self.step, "eval": after, "summary": True})
            atomic_write(os.path.join(cfg.out_dir, "summary.json"),
                         lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(summary, indent=2)))
            print_summary(summary, cfg.out_dir)
        return summary


def _fmt_acc(acc: Dict[str, float]) -> str:
    parts = [f"{k} {100 * v:.1f}%" for k, v in acc.items() if not k.startswith("chance")]
    chance = acc.get("chance")
    return ", ".join(parts) + (f" (chance {100 * chance:.1f}%)" if chance is not None else "")


def _progress(step: int, total: int, row: Dict[str, Any]) -> None:
    width = 24
    done = int(width * step / total)
    print(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{total} loss {row['loss']:.4f} "
          f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s peak {row['peak_mem_mb']:.0f} MB",
          end="", file=sys.stderr, flush=True)


def print_summary(summary: Dict[str, Any], out_dir: str) -> None:
    print(f"trained {summary['steps']} steps in {summary['time_s']} s: final loss {summary['final_loss']:.4f}, "
          f"{summary['tokens_per_s']:,.0f} tokens/s, peak memory {summary['peak_mem_mb']:,.0f} MB, trainable "
          f"{summary['trainable_params']:,} ({summary['trainable_pct']:.3f}%), optimizer {summary['optimizer']}")
    if summary["eval_before"] is not None:
        print(f"held-out accuracy: before {_fmt_acc(summary['eval_before'])}")
    if summary["eval_after"] is not None:
        print(f"                   after  {_fmt_acc(summary['eval_after'])}")
    print(f"adapter: {os.path.join(out_dir, 'adapter')}; metrics: {os.path.join(out_dir, 'metrics.jsonl')}")


# -- model, vision tower and data ---------------------------------------------------------------------------
def batch_to(batch, device: torch.device):
    """A data Batch with every tensor on `device`."""
    return batch._replace(**{k: v.to(device) for k, v in batch._asdict().items() if torch.is_tensor(v)})


def build_model(model_dir: Optional[str], tokenizer_dir: Optional[str], seed: int, device: torch.device,
                dtype: torch.dtype):
    """(model, tokenizer): a HF checkpoint directory, or the built-in tiny model (random weights from `seed`)
    with the byte tokenizer."""
    from mmkernels.models.tokenizer import ByteTokenizer, load_tokenizer

    if model_dir is None:
        torch.manual_seed(seed)  # the built-in model's random weights depend on the seed only
        model = Llama(LlamaConfig.tiny()).to(device=device, dtype=dtype)
        tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir else ByteTokenizer()
    else:
        model = Llama.from_pretrained(model_dir, dtype=dtype, device=device)
        tokenizer = load_tokenizer(tokenizer_dir or model_dir)
    return model, tokenizer


def tiny_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=64)


def build_vision(vision: Optional[str], seed: int, device: torch.device, dtype: torch.dtype) -> Optional[nn.Module]:
    """None, the tiny random CLIP tower ('tiny', weights from seed + 1) or a local CLIP vision directory."""
    from mmkernels.models.vision import VisionTower

    if vision is None:
        return None
    if vision == "tiny":
        torch.manual_seed(seed + 1)
        tower = VisionTower.from_config(tiny_vision_config())
    else:
        tower = VisionTower.from_pretrained(vision)
    return tower.to(device=device, dtype=dtype).eval()


def image_size(vision: Optional[nn.Module]) -> int:
    return vision.clip.config.image_size if vision is not None else 224


def pad_id(tokenizer, model: Llama) -> int:
    for source in (tokenizer, model.config):
        for attr in ("pad_id", "pad_token_id", "eos_id", "eos_token_id"):
            value = getattr(source, attr, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if isinstance(value, int):
                return value
    return 0


def build_data(cfg: TrainConfig, tokenizer, vision, model):
    """(training samples, held-out multiple-choice set or None)."""
    from mmkernels.train import data as data_mod

    if cfg.data is None:
        from mmkernels.train import demo

        data_dir = os.path.join(cfg.out_dir, "demo-data")
        paths = demo.write_dataset(data_dir, cfg.demo_samples, cfg.demo_eval_samples, cfg.seed,
                                   image_size(vision))
        train_path, eval_path, fmt = paths["train"], paths["eval"], "scienceqa"
    else:
        train_path, eval_path, fmt = cfg.data, cfg.eval_data, cfg.data_format
    size = image_size(vision)
    if fmt == "instruction":
        samples = data_mod.instruction_samples(train_path, tokenizer, cfg.max_len)
    elif fmt == "multimodal":
        samples = data_mod.multimodal_samples(train_path, tokenizer, cfg.max_len, size, image_root=cfg.image_root)
    else:
        samples = data_mod.scienceqa_samples(train_path, tokenizer, cfg.max_len, size, image_root=cfg.image_root)
    eval_set = None
    if eval_path is not None:
        eval_set = data_mod.scienceqa_choices(eval_path, tokenizer, size, image_root=cfg.image_root)
    return samples, eval_set
