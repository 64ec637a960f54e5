"""Peak GPU memory of QPaCA training on a LLaMA-7B-shaped model: does it fit in 12 GiB?

Model: mmkernels.models.Llama with 32 layers, hidden 4096, intermediate 11008, 32 heads (MHA), vocab 32000, bf16,
random seeded weights (linear ~ N(0, 1/d_in), embeddings ~ N(0, 1), norms ~ N(1, 0.3)); embeddings, lm_head and
norms frozen in bf16. QPaCA (methods.paca, PaCAConfig(rank=16, quantize="nf4")) on q, k, v, o, gate, up, down.
The model is built on the meta device and materialised, filled and quantized one block at a time on the GPU, so
the whole bf16 model (12.6 GiB) is never resident: the measured peak is the training peak, not the build's.

Step: the trainer's loss path (train.trainer.LossModule: hidden states through the chunked fused
linear_cross_entropy, never the N x V logits; gradient checkpointing on; bf16 autocast), divided by the token
count, backward, torch AdamW over the float32 deltas, zero_grad(set_to_none=True). B x T = 1 x 2048.
Flags: --layers (4 gives a quick look), --seq, --batch, --rank, --quantize nf4|int8, --steps.

Reported (one row, op "qpaca_memory", mode "step"): max_memory_allocated / max_memory_reserved over the steps
(peak stats reset after the build), the resident weight bytes after the build against the formula
(weight_bytes + the rotary frequencies; for 32 layers weight_bytes is bench_paca.llama7b_weight_bytes; the
script exits 1 when they differ), optimizer state bytes, ms per step
(quantiles over the steps after the first) and tokens/s. "fits" is peak reserved <= target_bytes (12 GiB):
reserved, not allocated, because that is what the process holds from the device (the CUDA context comes on top).
"estimate": what `mmkernels train --estimate` expects for the same run (train.memory.estimate, by category and
"total"), so the row also measures the estimate.

Without a GPU it runs a correctness smoke through the same build and step code (float32, tiny config, CPU):
(a) every target is a QPaCALinear, the block-by-block build equals building the whole model and calling
paca.apply, and the bytes of every tensor the model references equal the formula (no full-precision copy of a
target weight is left behind); (b) the step-0 loss (zero deltas) equals the plain cross-entropy of the same model
with each QPaCALinear replaced by a dense nn.Linear holding its dequantized weight; (c) a few steps lower the loss.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import bench_paca
from mmkernels import backend as mmk_backend
from mmkernels.methods import paca
from mmkernels.methods.lora import _targets
from mmkernels.models import Llama, LlamaConfig
from mmkernels.nn.qpaca_linear import QPaCALinear
from mmkernels.nn.rms_norm import RMSNorm
from mmkernels.train import memory, method_specs
from mmkernels.train.config import TrainConfig
from mmkernels.train.data import Batch
from mmkernels.train.trainer import LossModule

OP = "qpaca_memory"
MODE = "step"
TARGET_BYTES = 12 * 2**30
DEVICE = "cuda"
DTYPE = torch.bfloat16
SEVEN_B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32000)
TINY = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=96)


def config(layers: int, seq: int, hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max(seq, 2048))


# ----------------------------------------------------------------------------------------------------
# Byte accounting
# ----------------------------------------------------------------------------------------------------


def weight_bytes(cfg: LlamaConfig, pcfg: paca.PaCAConfig, elem: int) -> int:
    """Parameters and buffers of the model under QPaCA: the seven quantized targets per layer (bench_paca.layer_bytes)
    + two norms per layer, the final norm, embeddings and lm_head in the base dtype (`elem` bytes per element)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim

    def target(d_in: int, d_out: int) -> int:
        return bench_paca.layer_bytes(f"qpaca_{pcfg.quantize}", min(pcfg.rank, d_in), d_in, d_out, elem, pcfg.block)

    per_layer = target(h, q) + 2 * target(h, kv) + target(q, h) + 2 * target(h, i) + target(i, h) + 2 * h * elem
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h * elem
    return cfg.num_hidden_layers * per_layer + cfg.vocab_size * h * elem + head + h * elem


def rope_bytes(cfg: LlamaConfig) -> int:
    return cfg.head_dim // 2 * 4  # Llama._inv_freq: float32, not a buffer


def model_bytes(model: nn.Module) -> int:
    """Bytes of every storage the model references (parameters, buffers, plain tensor attributes), each once. A whole
    storage counts even when only a view of it is referenced: the view keeps all of it alive."""
    seen, total = set(), 0
    for m in model.modules():
        tensors = [*m._parameters.values(), *m._buffers.values(), *(v for v in vars(m).values() if torch.is_tensor(v))]
        for t in tensors:
            if t is None:
                continue
            s = t.untyped_storage()
            key = (str(t.device), s.data_ptr())
            if key not in seen:
                seen.add(key)
                total += s.nbytes()
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))


# ----------------------------------------------------------------------------------------------------
# Build and step (shared by the GPU run and the CPU smoke)
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def _fill(module: nn.Module, device, gen: torch.Generator) -> None:
    """Materialise `module` on `device` and fill its weights with seeded values."""
    module.to_empty(device=device)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, RMSNorm)):
            w = m.weight
            mean, std = ((1.0, 0.3) if isinstance(m, RMSNorm) else
                         (0.0, 1.0) if isinstance(m, nn.Embedding) else (0.0, w.shape[1] ** -0.5))
            w.copy_(mean + std * torch.randn(w.shape, device=device, generator=gen))


def build(cfg: LlamaConfig, pcfg: paca.PaCAConfig, device, dtype: torch.dtype, seed: int = 0,
          per_block: bool = True) -> Llama:
    """The model with QPaCA applied. per_block: materialise and quantize one block at a time (never the whole
    model in `dtype`); otherwise materialise everything, then paca.apply (the same result, used as the check)."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to(dtype).requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    targets = _targets(model, pcfg.targets)
    _fill(model.embed_tokens, device, gen)
    for i, block in enumerate(model.layers):
        _fill(block, device, gen)
        if per_block:  # paca.apply's layers, for this block's targets only
            for name, (owner, attr) in targets.items():
                if name.startswith(f"layers.{i}."):
                    setattr(owner, attr, paca.make_layer(getattr(owner, attr), name, pcfg))
    _fill(model.norm, device, gen)
    _fill(model.lm_head, device, gen)
    model.to(device)  # the rotary frequencies (already-placed weights are not copied)
    if per_block:
        model.paca_config = pcfg
    else:
        paca.apply(model, pcfg)
    model.gradient_checkpointing = True
    return model.train()


def make_batch(cfg: LlamaConfig, batch: int, seq: int, device) -> Batch:
    gen = torch.Generator(device=device).manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device, generator=gen)
    return Batch(ids, ids.clone(), torch.ones_like(ids, dtype=torch.bool), None,
                 torch.zeros(batch, dtype=torch.bool, device=device))


def make_step(model: Llama, batch: Batch, lr: float):
    """(step, optimizer): step() runs one training step as the trainer does and returns the mean token loss."""
    loss_module = LossModule(model, method_specs.get("paca"), None, fused=True, chunk=None)
    opt = torch.optim.AdamW(paca.adapter_parameters(model).values(), lr=lr, weight_decay=0.0)
    tokens = int((batch.labels[:, 1:] != -100).sum())
    device = batch.input_ids.device
    autocast = (torch.autocast("cuda", dtype=DTYPE) if device.type == "cuda" and DTYPE != torch.float32
                else torch.autocast("cpu", enabled=False))

    def step() -> torch.Tensor:
        with autocast:
            loss = loss_module(batch) / tokens
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


# ----------------------------------------------------------------------------------------------------
# GPU: the measurement
# ----------------------------------------------------------------------------------------------------


def estimated(cfg: LlamaConfig, args) -> Dict[str, int]:
    """`mmkernels train --estimate` for this run (the same model shape, method, micro-batch and recomputation),
    to be set beside the measured peak."""
    with tempfile.TemporaryDirectory() as model_dir:
        with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg.to_hf_dict(), f)
        # instruction data (never read): the demo's default would add its vision tower
        train_cfg = TrainConfig(model=model_dir, data=os.path.join(model_dir, "train.jsonl"), method="paca",
                                method_options={"rank": args.rank, "quantize": args.quantize},
                                batch_size=args.batch, max_len=args.seq, grad_checkpointing=True,
                                dtype=str(DTYPE).removeprefix("torch."), device=DEVICE, distributed="none")
        return memory.estimate(train_cfg, processes=1)


def _settle() -> int:
    """Free what the build left in the allocator's cache; the bytes allocated now."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def _peaks_reset() -> None:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()


def _peaks() -> Dict[str, int]:
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def run(args) -> int:
    device = torch.device(DEVICE)
    cfg = config(args.layers, args.seq, **SEVEN_B)
    pcfg = paca.PaCAConfig(rank=args.rank, quantize=args.quantize)
    env = runner.env_info()
    out = runner.results_path(args.out, env["gpu"])
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  -> {out}")
    t0 = time.perf_counter()
    model = build(cfg, pcfg, device, DTYPE)
    resident = _settle()
    counted, expected = model_bytes(model), weight_bytes(cfg, pcfg, DTYPE.itemsize) + rope_bytes(cfg)
    llama7b = bench_paca.llama7b_weight_bytes(f"qpaca_{args.quantize}", args.rank, DTYPE.itemsize)
    print(f"build: {time.perf_counter() - t0:.1f} s; weights {counted / 2**30:.3f} GiB counted, "
          f"{expected / 2**30:.3f} GiB by formula, {resident / 2**30:.3f} GiB allocated "
          f"(a 32-layer LLaMA-7B: {llama7b / 2**30:.3f} GiB)")
    step, opt = make_step(model, make_batch(cfg, args.batch, args.seq, device), args.lr)
    _peaks_reset()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step().item())  # .item() waits for the step
        times.append(1e3 * (time.perf_counter() - start))
    peaks = _peaks()
    timed = torch.tensor(times[1:] or times, dtype=torch.float64)  # the first step autotunes and allocates state
    ms = timed.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    shape = {"layers": args.layers, "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
             "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "vocab": cfg.vocab_size,
             "B": args.batch, "T": args.seq, "rank": args.rank, "quantize": args.quantize}
    row = runner.make_row(op=OP, provider=f"mmkernels_qpaca_{args.quantize}",
                          backend=mmk_backend.select("quantized_linear", device), mode=MODE, shape=shape,
                          dtype=runner.dtype_name(DTYPE), ms=ms, flops=None, nbytes=None, copy_gbps=None,
                          peak_mem_mb=peaks["allocated"] / 2**20, env=env)
    row.update(peak_mem_bytes=peaks["allocated"], peak_reserved_bytes=peaks["reserved"], weight_bytes=counted,
               weight_bytes_expected=expected, weight_bytes_allocated=resident, llama7b_weight_bytes=llama7b,
               optimizer_state_bytes=optimizer_state_bytes(opt), tokens_per_s=args.batch * args.seq / (ms[0] * 1e-3),
               losses=losses, target_bytes=TARGET_BYTES, fits=peaks["reserved"] <= TARGET_BYTES,
               estimate=estimated(cfg, args))
    runner.append_rows(out, [row])
    gib = 2**30
    print(f"{OP}: {args.layers}-layer LLaMA-7B-shaped, QPaCA-{args.quantize} r={args.rank}, B={args.batch} "
          f"T={args.seq}: peak {peaks['allocated'] / gib:.2f} GiB allocated, {peaks['reserved'] / gib:.2f} GiB "
          f"reserved; weights {counted / gib:.2f} GiB, optimizer state {row['optimizer_state_bytes'] / 2**20:.1f} MiB; "
          f"{ms[0]:.0f} ms/step, {row['tokens_per_s']:.0f} tokens/s -> "
          f"{'FITS' if row['fits'] else 'DOES NOT FIT'} in {TARGET_BYTES / gib:.0f} GiB; `train --estimate` "
          f"expected {row['estimate']['total'] / gib:.2f} GiB")
    if counted != expected:
        print(f"weight bytes differ from the formula by {counted - expected} B")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------
# CPU: correctness smoke
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def dense_loss(model: Llama, batch: Batch) -> float:
    """Mean next-token cross-entropy of a copy of `model` whose QPaCALinear layers are dense nn.Linear layers
    holding their dequantized weights, from the full logits."""
    dense = copy.deepcopy(model)
    for owner in list(dense.modules()):
        for attr, child in list(owner.named_children()):
            if isinstance(child, QPaCALinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=False, dtype=child.cols.dtype)
                lin.weight.copy_(child.dequantized_weight(child.cols.dtype))
                setattr(owner, attr, lin)
    logits = dense(batch.input_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten()).item()


def smoke(steps: int = 3, lr: float = 1e-2, layers: int = 2, seq: int = 24, kinds=("nf4", "int8")) -> List[str]:
    """The failures (empty when the smoke passed)."""
    device, dtype = torch.device("cpu"), runner.SMOKE_DTYPE
    cfg = config(layers, seq, **TINY)
    failures: List[str] = []
    for kind in kinds:
        pcfg = paca.PaCAConfig(rank=16, quantize=kind)
        model = build(cfg, pcfg, device, dtype)
        # (a) every target quantized, the same model as paca.apply on the whole model, no stray weight copy
        missing = [n for n, (o, a) in _targets(model, pcfg.targets).items() if not isinstance(getattr(o, a), QPaCALinear)]
        if missing:
            failures.append(f"{OP} {kind}: targets that are not QPaCALinear: {missing}")
        whole = build(cfg, pcfg, device, dtype, per_block=False).state_dict()
        mine = model.state_dict()
        if mine.keys() != whole.keys() or not all(torch.equal(mine[k], whole[k]) for k in mine):
            failures.append(f"{OP} {kind}: the block-by-block build differs from paca.apply on the whole model")
        counted, expected = model_bytes(model), weight_bytes(cfg, pcfg, dtype.itemsize) + rope_bytes(cfg)
        if counted != expected:
            failures.append(f"{OP} {kind}: the model references {counted} B of tensors, expected {expected} B")
        # (b) step 0 runs the dequantized model through the trainer's loss path; (c) the steps lower the loss
        batch = make_batch(cfg, 2, seq, device)
        want = dense_loss(model, batch)
        step, _ = make_step(model, batch, lr)
        losses = [step().item() for _ in range(steps)]
        err = runner._compare(f"{OP} {kind} step-0 loss vs the dense dequantized model", [torch.tensor(losses[0])],
                              [torch.tensor(want)])
        if err:
            failures.append(err)
        if not losses[-1] < losses[0]:
            failures.append(f"{OP} {kind}: {steps} steps did not lower the loss: {losses}")
        print(f"smoke: {OP} {kind} {layers} layers T={seq}: {counted} B resident, losses "
              + ", ".join(f"{v:.4f}" for v in losses) + f" (dense step 0: {want:.4f})")
    return failures


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_qpaca_memory.py", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder layers (default 32; 4 for a quick look)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--rank", type=int, default=16, help="QPaCA columns per layer (default 16)")
    p.add_argument("--quantize", choices=("nf4", "int8"), default="nf4", help="base quantization (default nf4)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (default 4; the first is not timed)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--out", default=None, help="results folder, or a .jsonl file (default: benchmarks/results)")
    args = p.parse_args(argv)
    for name in ("layers", "seq", "batch", "rank", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return runner.run_or_smoke(run, args, smoke)


if __name__ == "__main__":
    sys.exit(main())
