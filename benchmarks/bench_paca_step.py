"""Benchmark one training step of a LLaMA-7B-wide decoder stack: PaCA (mmkernels) vs LoRA (PEFT and mmkernels).

The case is a full optimizer step on a causal-LM loss: forward, cross-entropy on the next token, backward,
optimizer.step(), zero_grad(set_to_none=True). Rows have mode "step" (the runner's fwd/bwd/fwd+bwd do not
apply; --modes is not used). Time and peak memory (weights, optimizer state, activations) per step.

Model: a LLaMA-7B-wide stack of few layers with random weights (hidden 4096, intermediate 11008, 32 heads, MHA,
vocab 32000), input B x T = 2 x 2048 tokens, bf16. Presets: default = 2 and 4 layers; target = 2 layers
(also what --quick runs). Every provider starts from the same seeded transformers LlamaForCausalLM.

Providers:
    peft_lora_r8        transformers LlamaForCausalLM (sdpa attention) + get_peft_model(LoraConfig(r=8,
                        lora_alpha=16, lora_dropout=0.0, target_modules=[q,k,v,o,gate,up,down]_proj,
                        task_type="CAUSAL_LM")) with PEFT's defaults (float32 adapter weights on a bf16 base);
                        torch.optim.AdamW over the trainable parameters
    mmkernels_paca_r16  mmkernels.models.Llama with the same weights (copied from the HF state dict) +
                        methods.paca.apply(PaCAConfig(rank=16)) on the same seven targets; nn.PaCAAdamW (AdamW
                        fused with the W_eff column sync) over the deltas
    mmkernels_lora_r8   the same Llama + methods.lora.apply(LoRAConfig(rank=8, alpha=16)); torch.optim.AdamW
"mmkernels_*" providers take a ":<backend>" suffix (forces that backend for every op of the model); their
failures make the script exit 1. Optimizer: lr 1e-4, weight decay 0.

FLOP formula (matmul FLOPs; N = B*T tokens, L layers, D = hidden / H; the base is frozen, so the backward has
input gradients only): linear = 2*N*L*(4*hidden^2 + 3*hidden*intermediate) + 2*N*hidden*vocab (lm_head);
attn = L * 2*B*H*T*T*D (causal); step = 2*linear + 3.5*attn. Every provider is measured against this count
(adapter GEMMs and optimizer work are their own overhead). gbps is null.

Without a GPU it runs a correctness smoke (float32, tiny config, two steps at lr 1e-2, through the same
Case.step that the timed closure calls): at step 0 every provider's loss equals the plain transformers
model's (all adapters start as the identity); our LoRA (A copied from PEFT's) and PEFT's LoRA give the same
losses at every step; PaCA lowers the loss, with the same losses on the reference and triton backends and with
torch AdamW + methods.paca.sync_after_step instead of PaCAAdamW.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import warnings
from typing import Any, Dict, List, Optional

import torch
from torch.nn import functional as F

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels

OP = "paca_step"
MODE = "step"
PROVIDERS = ("peft_lora_r8", "mmkernels_paca_r16", "mmkernels_lora_r8")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LR = 1e-4


def _shape(layers=2, b=2, t=2048):
    return {"B": b, "T": t, "layers": layers, "hidden": 4096, "intermediate": 11008, "H": 32, "H_kv": 32,
            "vocab": 32000}


TARGET = _shape()
PRESETS = {"default": [TARGET, _shape(layers=4)], "target": [TARGET]}
SMOKE_SHAPE = {"B": 1, "T": 8, "layers": 2, "hidden": 64, "intermediate": 96, "H": 4, "H_kv": 2, "vocab": 97}
SPEC = types.SimpleNamespace(  # what runner.parse_args reads of a Bench
    op=OP, presets=PRESETS, provider_names=lambda: list(PROVIDERS),
    description="A training step of a LLaMA-7B-wide stack: PaCA r=16 (mmkernels) vs LoRA r=8 (PEFT, mmkernels).",
)


def flops(shape: Dict[str, Any]) -> float:
    n, layers, hid, inter = shape["B"] * shape["T"], shape["layers"], shape["hidden"], shape["intermediate"]
    d = hid // shape["H"]
    linear = 2.0 * n * layers * (4 * hid * hid + 3 * hid * inter) + 2.0 * n * hid * shape["vocab"]
    attn = layers * 2.0 * shape["B"] * shape["H"] * shape["T"] ** 2 * d
    return 2 * linear + 3.5 * attn


def hf_config(shape: Dict[str, Any]):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["H"], num_key_value_heads=shape["H_kv"],
        max_position_embeddings=max(2048, shape["T"]), rms_norm_eps=1e-6, tie_word_embeddings=False)


# ----------------------------------------------------------------------------------------------------
# The models, from the same seeded weights
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_hf(shape: Dict[str, Any], dtype, device, seed: int = 0):
    """A transformers LlamaForCausalLM with seeded random weights (norm weights non-trivial)."""
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise runner.Unavailable(f"{' and '.join(missing)} not installed")
    return runner.seeded_hf_llama(hf_config(shape), dtype, device, seed)


ours_from_hf = runner.mmkernels_llama_from_hf


def peft_lora(hf, rank: int = 8):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(hf, LoraConfig(r=rank, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS),
                                             task_type="CAUSAL_LM"))


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


Case = runner.StepCase


def make_case(provider: str, shape: Dict[str, Any], dtype, device, fused_optimizer: bool = True, lr: float = LR) -> Case:
    """fused_optimizer=False: PaCA steps with torch.optim.AdamW + methods.paca.sync_after_step."""
    from mmkernels import backend as mmk_backend

    name, _, forced = provider.partition(":")
    if name not in PROVIDERS:
        raise runner.Unavailable(f"unknown provider {provider!r}; expected one of {list(PROVIDERS)}")
    if forced and not name.startswith("mmkernels"):
        raise runner.Unavailable(f"provider {provider!r}: only 'mmkernels_*' providers take a ':<backend>' suffix")
    hf = build_hf(shape, dtype, device)
    if name == "peft_lora_r8":
        model = peft_lora(hf, 8)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        return Case(model, lambda ids: lm_loss(model(input_ids=ids).logits, ids), opt, None)

    from mmkernels.methods import lora, paca

    model = ours_from_hf(hf, dtype, device)
    del hf
    op = "paca_linear" if name == "mmkernels_paca_r16" else "attention"  # the op whose backend the row records
    context = contextlib.nullcontext
    if forced:
        ok, why = mmk_backend.availability(forced, op, device)
        if not ok:
            raise runner.Unavailable(why)
        context = lambda: mmkernels.use_backend(forced)  # noqa: E731
    if name == "mmkernels_paca_r16":
        paca.apply(model, paca.PaCAConfig(rank=16, targets=TARGETS))
        if fused_optimizer:
            from mmkernels.nn.paca_adamw import PaCAAdamW

            opt = PaCAAdamW(paca.layers(model).values(), lr=lr, weight_decay=0.0)
        else:
            opt = torch.optim.AdamW(paca.adapter_parameters(model).values(), lr=lr, weight_decay=0.0)
            paca.sync_after_step(opt, model)
    else:
        lora.apply(model, lora.LoRAConfig(rank=8, alpha=16.0, targets=TARGETS))
        opt = torch.optim.AdamW(lora.adapter_parameters(model).values(), lr=lr, weight_decay=0.0)
    backend = forced or mmk_backend.select(op, device)
    return Case(model, lambda ids: lm_loss(model(ids), ids), opt, backend, context)


# ----------------------------------------------------------------------------------------------------
# GPU: the case loop
# ----------------------------------------------------------------------------------------------------


def run_case(provider: str, shape, dtype, warmup: int, rep: int, copy_gbps, env, matmul_tflops=None):
    device = torch.device(runner.DEVICE)
    case = make_case(provider, shape, dtype, device)
    ms, row = runner.time_step_case(case, op=OP, mode=MODE, provider=provider, shape=shape, dtype=dtype,
                                    warmup=warmup, rep=rep, copy_gbps=copy_gbps, env=env,
                                    matmul_tflops=matmul_tflops, flops=flops(shape))
    print(f"{provider}: {case.trainable():,} trainable parameters")
    return row


def run(args) -> int:
    s = runner.begin(args, PRESETS, step_mode=MODE)
    errors, noted = 0, set()
    for shape in s.shapes:
        print(f"--- {OP} {shape} {args.dtype}")
        for provider in args.providers:
            errors += runner.record_case(s.out, noted, provider, MODE, shape, lambda: run_case(
                provider, shape, s.dtype, s.warmup, s.rep, s.copy_gbps, s.env, s.matmul_tflops))
    return runner.finish(errors)


# ----------------------------------------------------------------------------------------------------
# CPU: correctness smoke
# ----------------------------------------------------------------------------------------------------


def smoke(steps: int = 2, lr: float = 1e-2, backends: Optional[List[str]] = None) -> List[str]:
    """The failures (empty when the smoke passed). backends: PaCA's runs (default: reference, and triton
    where available). lr is high enough that one step moves the loss well beyond the tolerance."""
    device, dtype, shape = torch.device("cpu"), runner.SMOKE_DTYPE, SMOKE_SHAPE
    failures: List[str] = []
    ids = runner.step_ids(shape, device)
    try:
        with torch.no_grad():
            hf = build_hf(shape, dtype, device)
            base_loss = lm_loss(hf(input_ids=ids).logits, ids).item()
    except runner.Unavailable as exc:
        print(f"smoke: no transformers/PEFT: {OP} not checked against them ({exc})")
        base_loss = None
    if backends is None:
        backends = runner.smoke_backends("paca_linear", device)

    def losses(provider, **kw) -> Optional[List[float]]:
        try:
            return make_case(provider, shape, dtype, device, lr=lr, **kw).losses(ids, steps)
        except Exception as exc:
            failures.append(f"{OP} {provider} {kw or ''}: {type(exc).__name__}: {exc}")
            return None

    checked = []
    runs: Dict[str, Optional[List[float]]] = {}
    for b in backends:
        runs[f"paca[{b}]"] = losses(f"mmkernels_paca_r16:{b}")
    runs["paca[reference, torch AdamW + sync]"] = losses("mmkernels_paca_r16:reference", fused_optimizer=False)
    runs["lora"] = losses("mmkernels_lora_r8")
    # PEFT LoRA, and ours with PEFT's A (both B start at zero): the same model, the same steps.
    peft_case = None
    if base_loss is not None:
        try:
            peft_case = make_case("peft_lora_r8", shape, dtype, device, lr=lr)
            ours_case = make_case("mmkernels_lora_r8", shape, dtype, device, lr=lr)
            with torch.no_grad():
                peft_a = {n: p for n, p in peft_case.model.named_parameters() if "lora_A" in n}
                for n, p in ours_case.model.named_parameters():
                    if n.endswith(".lora_A"):
                        p.copy_(peft_a[f"base_model.model.model.{n[:-len('.lora_A')]}.lora_A.default.weight"])
            runs["peft"] = peft_case.losses(ids, steps)
            runs["lora with PEFT's A"] = ours_case.losses(ids, steps)
        except Exception as exc:
            failures.append(f"{OP} PEFT vs ours LoRA: {type(exc).__name__}: {exc}")
    for name, got in runs.items():
        if got is None:
            continue
        checked.append(name)
        if base_loss is not None:  # zero-init adapters: step 0 is the plain model
            err = runner.compare_losses(f"{OP} {name} step-0 loss vs transformers", got[:1], [base_loss])
            if err:
                failures.append(err)
    if runs.get("peft") is not None and runs.get("lora with PEFT's A") is not None:
        err = runner.compare_losses(f"{OP} mmkernels LoRA vs PEFT LoRA losses over {steps} steps",
                                    runs["lora with PEFT's A"], runs["peft"])
        if err:
            failures.append(err)
    paca_ref = runs.get("paca[reference]")
    if paca_ref is not None:
        if not paca_ref[-1] < paca_ref[0]:
            failures.append(f"{OP} PaCA did not lower the loss: {paca_ref}")
        for name in ("paca[triton]", "paca[reference, torch AdamW + sync]"):
            if runs.get(name) is not None:
                err = runner.compare_losses(f"{OP} {name} vs paca[reference] losses", runs[name], paca_ref)
                if err:
                    failures.append(err)
    print(f"smoke: {OP} {shape}: checked {', '.join(checked) or 'nothing'}"
          + ("" if base_loss is None else " against transformers (step 0) and PEFT LoRA (every step)"))
    return failures + runner.flop_failures(OP, PRESETS, flops)


def main(argv: Optional[List[str]] = None) -> int:
    args = runner.parse_args(SPEC, argv)
    return runner.run_or_smoke(run, args, smoke)


if __name__ == "__main__":
    sys.exit(main())
