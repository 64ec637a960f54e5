"""Benchmark one end-to-end training step of a LLaMA-7B-shaped model with LLaMA-Adapter V2: mmkernels vs
transformers + PEFT AdaptionPrompt.

The case is a full optimizer step on the causal-LM loss: forward, next-token cross-entropy (mean over the
B*(T-1) predicted tokens), backward, AdamW.step(), zero_grad(set_to_none=True). Rows have op "train_step" and
mode "step" (the runner's fwd/bwd/fwd+bwd do not apply; --modes is not used). Time and peak memory (weights,
optimizer state, activations, loss) of one step.

Model: LLaMA-7B widths with random weights (hidden 4096, intermediate 11008, 32 heads, 32 kv heads, vocab
32000), one sequence of T = 2048 tokens (B = 1), bf16 frozen weights. Depth is reduced so that a case fits a
short GPU session: preset target = 4 layers (also what --quick runs), deep = 8 layers, default = both. The
per-layer cost dominates the full 32-layer model (the embedding, final norm, lm_head and loss are paid once);
when a run has two depths the script prints each provider's per-layer slope and a linear extrapolation to 32
layers (an estimate, not a measured row). Every provider starts from the same seeded weights.

Each case also prints its peak as traced on the meta device (traced_peak_bytes: the step's allocations and
frees, as `mmkernels train --estimate` traces a run, plus weights, gradients and AdamW's moments), beside the
measured one; the CPU smoke prints every provider's traced peak at 32 layers and its ratio to PEFT's
(estimates, printed, never written as rows).

Target (a goal, bf16; only a GPU run's rows can show whether it is met): at the target shape mmkernels_v2
reaches >= 1.5x the tokens/s of peft_adaption_prompt with <= 0.7x its peak memory.

Providers:
    mmkernels_v2          mmkernels.models.Llama holding a copy of the transformers model's weights (bf16),
                          methods.llama_adapter.apply(LlamaAdapterConfig(version=2, prompt_len=10,
                          prompt_layers=None)): prompts and per-head tanh gates in every layer, bias/scale on
                          the seven block linears, RMSNorm weights trained. Trainable parameters are float32
                          (the norm weights are upcast; the rest are created float32). Loss: the trainer's
                          path, model(ids, hidden_only=True) then mmkernels.train.trainer.token_loss_sum
                          (fused chunked ops.linear_cross_entropy, never the full logits) / the token count,
                          under torch.autocast(bf16) on a GPU as the trainer runs it. torch.optim.AdamW on the
                          trainable parameters. Gradient checkpointing off. Row backend: the backend of
                          ops.gated_prompt_attention.
    mmkernels_v2_ckpt     the same with model.gradient_checkpointing = True (each block recomputed in the
                          backward).
    mmkernels_v2_ckpt3of4 the same recomputing the first three quarters of the blocks (model.checkpoint_blocks
                          = 3 * layers // 4, `--checkpoint-blocks` of the trainer: 24 of LLaMA-7B's 32), the
                          others saving their activations: memory traded for a quarter less recomputation.
    mmkernels_v2_attn     mmkernels_v2 with model.recompute_attention = True (`--recompute-attention`): every
                          attention's core (the q/k/v epilogues, rope, the attention) recomputed in the backward,
                          the blocks otherwise saving their activations.
    peft_adaption_prompt  transformers LlamaForCausalLM (bf16, sdpa attention) built with attention_bias=True
                          and mlp_bias=True, its biases zero (so the same function as the bias-free model) +
                          get_peft_model(AdaptionPromptConfig(adapter_len=10, adapter_layers=layers,
                          task_type="CAUSAL_LM")); then the seven block linears' biases and every RMSNorm weight
                          are made trainable. Loss: model(input_ids=ids, labels=ids, use_cache=False).loss.
                          torch.optim.AdamW on the trainable parameters (bf16: PEFT creates its prompt and
                          gate in the base weights' dtype, and transformers' biases and norms are bf16).
"mmkernels_*" providers take a ":<backend>" suffix (forces that backend for every op of the model); their
failures make the script exit 1. Optimizer: lr 1e-4, weight decay 0.

The PEFT side is the closest equivalent of V2 that transformers + PEFT express: PEFT's AdaptionPrompt is V1
(one raw scalar gate per layer, zero-init); V2's bias tuning becomes transformers' own trainable linear biases
(fused into the GEMM by addmm); V2's per-channel scales have no equivalent there and are left out, so the PEFT
side trains 5*4096 + 2*11008 fewer parameters per layer and skips the scale epilogue: any difference this
makes favours PEFT. PEFT applies o_proj, bias included, to the prompt term as well, so once trained its o_proj
bias enters twice (the same cost; a different function, which only the parity smoke below has to avoid).

Tokens/s: runner rows have a fixed schema (runner.ROW_KEYS) with no field for it; it is
tokens_per_s = B * T / (ms_p50 * 1e-3) from the row's shape and ms_p50 (printed with every row).

FLOP formula (matmul FLOPs; N = B*T tokens, L layers, D = hidden / H, L_p = 10; the base is frozen, so the
backward has input gradients only): linear = 2*N*L*(4*hidden^2 + 3*hidden*intermediate) + 2*N*hidden*vocab
(lm_head); attn = L * (2*B*H*T*T*D + 4*B*H*T*L_p*D) (causal tokens + prompt segment);
step = 2*linear + 3.5*attn. Every provider is measured against this count (PEFT's recomputed query
projection, gradient checkpointing's recompute, the prompt projections and the optimizer are overhead).
gbps is null.

Without a GPU it runs a correctness smoke (float32, tiny GQA config, three steps at lr 1e-2 through the same
Case.step that the timed closure calls): at step 0 every provider's loss equals the plain transformers
model's (zero-init gates, unit scales, zero biases); every provider's loss moves after a step; mmkernels_v2 on
the triton backend (interpreter), mmkernels_v2_ckpt and mmkernels_v2_attn give the losses of mmkernels_v2 on
the reference backend at every step; and ours in PEFT's form (gate_fn="raw", gate_per_head=False, PEFT's prompts
copied in, scales frozen; o_proj's bias frozen and the gates set to PARITY_GATE on both sides, so that the prompt
path counts from step 0) gives PEFT's losses at every step, both stepping with SGD (AdamW's per-element
normalisation would hide a gradient that is off by a factor; SGD's steps are the gradients themselves).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
import types
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels

OP = "train_step"
MODE = "step"
ATTN_OP = "gated_prompt_attention"  # the op whose backend an mmkernels row records
PROVIDERS = ("mmkernels_v2", "mmkernels_v2_ckpt", "mmkernels_v2_ckpt3of4", "mmkernels_v2_attn", "peft_adaption_prompt")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_LEN = 10
LR = 1e-4
FULL_DEPTH = 32  # LLaMA-7B
PARITY_GATE = 0.5  # the parity smoke's gate value: a zero gate would hide the prompt path until it has trained
# The parity smoke steps with SGD: AdamW's per-element normalisation would hide a gradient off by a factor.
PARITY_SGD_LR = 0.5


def _shape(layers=4, b=1, t=2048):
    return {"B": b, "T": t, "layers": layers, "hidden": 4096, "intermediate": 11008, "H": 32, "H_kv": 32,
            "vocab": 32000, "L_p": PROMPT_LEN}


TARGET = _shape()
PRESETS = {"default": [TARGET, _shape(layers=8)], "target": [TARGET], "deep": [_shape(layers=8)]}
SMOKE_SHAPE = {"B": 1, "T": 8, "layers": 2, "hidden": 64, "intermediate": 96, "H": 4, "H_kv": 2, "vocab": 97,
               "L_p": 3}
SPEC = types.SimpleNamespace(  # what runner.parse_args reads of a Bench
    op=OP, presets=PRESETS, provider_names=lambda: list(PROVIDERS),
    description="A LLaMA-7B-shaped training step with LLaMA-Adapter V2: mmkernels vs transformers + PEFT "
                "AdaptionPrompt.",
)


def flops(shape: Dict[str, Any]) -> float:
    b, t, layers, hid, inter = shape["B"], shape["T"], shape["layers"], shape["hidden"], shape["intermediate"]
    n, h, d = b * t, shape["H"], hid // shape["H"]
    linear = 2.0 * n * layers * (4 * hid * hid + 3 * hid * inter) + 2.0 * n * hid * shape["vocab"]
    attn = layers * (2.0 * b * h * t * t * d + 4.0 * b * h * t * shape["L_p"] * d)
    return 2 * linear + 3.5 * attn


def tokens_per_s(shape: Dict[str, Any], ms: float) -> float:
    return shape["B"] * shape["T"] / (ms * 1e-3)


def hf_config(shape: Dict[str, Any], bias: bool = False):
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["H"], num_key_value_heads=shape["H_kv"],
        max_position_embeddings=max(2048, shape["T"]), rms_norm_eps=1e-6, tie_word_embeddings=False,
        attention_bias=bias, mlp_bias=bias)


# ----------------------------------------------------------------------------------------------------
# The models, from the same seeded weights
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def build_hf(shape: Dict[str, Any], dtype, device, bias: bool = False, seed: int = 0):
    """A transformers LlamaForCausalLM with seeded random weights (norm weights non-trivial); with bias=True
    its linear layers have biases, all zero, and every other weight is the one of bias=False."""
    missing = [m for m in ("transformers", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise runner.Unavailable(f"{' and '.join(missing)} not installed")
    return runner.seeded_hf_llama(hf_config(shape, bias), dtype, device, seed)


ours_from_hf = runner.mmkernels_llama_from_hf


def adapter_config(peft_form: bool = False, prompt_len: int = PROMPT_LEN):
    """V2 with every layer adapted; peft_form: PEFT's gate (one raw scalar per layer) instead of tanh per head."""
    from mmkernels.methods.llama_adapter import LlamaAdapterConfig

    gate = dict(gate_fn="raw", gate_per_head=False) if peft_form else {}
    return LlamaAdapterConfig(version=2, prompt_len=prompt_len, prompt_layers=None, **gate)


def fp32_trainable(model: nn.Module) -> None:
    """Give every trainable parameter a float32 master copy (V2 unlocks the RMSNorm weights in the model dtype)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and p.dtype != torch.float32:
                setattr(module, name, nn.Parameter(p.detach().float()))


def peft_adaption_prompt(hf, layers: int, prompt_len: int = PROMPT_LEN):
    """PEFT AdaptionPrompt on all `layers`, plus transformers' own trainable linear biases and RMSNorm weights."""
    from peft import AdaptionPromptConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(hf, AdaptionPromptConfig(adapter_len=prompt_len, adapter_layers=layers,
                                                        task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if (name.endswith(".bias") and name.rsplit(".", 2)[-2] in LINEARS) or name.endswith("norm.weight"):
            p.requires_grad_(True)
    return model


def _autocast(device: torch.device, dtype: torch.dtype):
    """The trainer's autocast (Run._autocast): the model dtype on a GPU, nothing on CPU."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


Case = runner.StepCase


def _adamw(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def make_case(provider: str, shape: Dict[str, Any], dtype, device, lr: float = LR, peft_form: bool = False) -> Case:
    """peft_form (mmkernels providers): the adapter in PEFT's gate form, for the parity smoke."""
    from mmkernels import backend as mmk_backend
    from mmkernels.methods import llama_adapter
    from mmkernels.train.trainer import token_loss_sum

    name, _, forced = provider.partition(":")
    if name not in PROVIDERS:
        raise runner.Unavailable(f"unknown provider {provider!r}; expected one of {list(PROVIDERS)}")
    if forced and not name.startswith("mmkernels"):
        raise runner.Unavailable(f"provider {provider!r}: only 'mmkernels_*' providers take a ':<backend>' suffix")
    device = torch.device(device)
    if name == "peft_adaption_prompt":
        model = peft_adaption_prompt(build_hf(shape, dtype, device, bias=True), shape["layers"], shape["L_p"])
        return Case(model, lambda ids: model(input_ids=ids, labels=ids, use_cache=False).loss, _adamw(model, lr),
                    None)

    hf = build_hf(shape, dtype, device)
    model = ours_from_hf(hf, dtype, device)
    del hf
    torch.manual_seed(1)  # the prompts' init: the same in every mmkernels case
    llama_adapter.apply(model, adapter_config(peft_form, shape["L_p"]))
    fp32_trainable(model)
    model.gradient_checkpointing = name in ("mmkernels_v2_ckpt", "mmkernels_v2_ckpt3of4")
    if name == "mmkernels_v2_ckpt3of4":
        model.checkpoint_blocks = 3 * shape["layers"] // 4
    model.recompute_attention = name == "mmkernels_v2_attn"
    if forced:
        ok, why = mmk_backend.availability(forced, ATTN_OP, device)
        if not ok:
            raise runner.Unavailable(why)

    @contextlib.contextmanager
    def context():
        with (mmkernels.use_backend(forced) if forced else contextlib.nullcontext()), _autocast(device, dtype):
            yield

    def loss_fn(ids):
        hidden = model(ids, hidden_only=True)
        return token_loss_sum(model, hidden, ids, fused=True, chunk=None) / (ids.shape[0] * (ids.shape[1] - 1))

    backend = forced or mmk_backend.select(ATTN_OP, device)
    return Case(model, loss_fn, _adamw(model, lr), backend, context)


# ----------------------------------------------------------------------------------------------------
# GPU: the case loop
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _unpacked_positions():
    """transformers reads the position ids' values to find packed sequences, which meta tensors do not have;
    the benchmark's positions are 0..T-1 in every row, one sequence each: nothing is packed."""
    import transformers.masking_utils as masking

    original = getattr(masking, "find_packed_sequence_indices", None)
    if original is not None:
        masking.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        if original is not None:
            masking.find_packed_sequence_indices = original


def traced_peak_bytes(provider: str, shape: Dict[str, Any], dtype) -> int:
    """The provider's step traced on the meta device as `mmkernels train --estimate` traces a run: its weights
    and buffers, each trainable parameter's gradient and AdamW's two moments (in the parameter's dtype), and
    the peak of one forward and backward (train.memory.trace_step; no autocast on meta tensors). An estimate
    to set beside the measured peak_mem_mb, not a measurement."""
    from mmkernels.train import memory

    case = make_case(provider.partition(":")[0], shape, dtype, "meta")  # a backend suffix: the same shapes
    ids = torch.zeros(shape["B"], shape["T"], dtype=torch.long, device="meta")
    with _unpacked_positions():
        peak = memory.trace_step(lambda: case.loss_fn(ids), case.model, [ids])
    held = sum(t.nbytes for t in [*case.model.parameters(), *case.model.buffers()])
    return held + 3 * sum(p.nbytes for p in case.model.parameters() if p.requires_grad) + peak.total


def traced_summary(depth: int = FULL_DEPTH) -> List[str]:
    """Each provider's traced peak (traced_peak_bytes, bf16) at `depth` layers of the target shape, and its
    ratio to peft_adaption_prompt's: what the GPU run's peak_mem_mb is expected to show."""
    shape = {**TARGET, "layers": depth}
    peaks = {p: traced_peak_bytes(p, shape, torch.bfloat16) for p in PROVIDERS}
    peft = peaks["peft_adaption_prompt"]
    return [f"traced at {depth} layers (estimate): {p} peak {b / 2**20:,.0f} MiB"
            + ("" if p == "peft_adaption_prompt" else f", {b / peft:.2f}x PEFT's") for p, b in peaks.items()]


def run_case(provider: str, shape, dtype, warmup: int, rep: int, copy_gbps, env, matmul_tflops=None):
    device = torch.device(runner.DEVICE)
    try:
        traced = f"{traced_peak_bytes(provider, shape, dtype) / 2**20:,.0f} MiB"
    except Exception as exc:  # the trace is a side note: it must not cost the measured row
        traced = f"n/a ({type(exc).__name__}: {exc})"
    case = make_case(provider, shape, dtype, device)
    ms, row = runner.time_step_case(case, op=OP, mode=MODE, provider=provider, shape=shape, dtype=dtype,
                                    warmup=warmup, rep=rep, copy_gbps=copy_gbps, env=env,
                                    matmul_tflops=matmul_tflops, flops=flops(shape))
    print(f"{provider}: {case.trainable():,} trainable parameters; {tokens_per_s(shape, ms[0]):,.0f} tokens/s; "
          f"peak {row['peak_mem_mb']:,.0f} MiB (traced on meta: {traced})")
    return row


def depth_summary(rows: List[Dict[str, Any]], depth: int = FULL_DEPTH) -> List[str]:
    """Per provider with rows at two depths (else nothing): the per-layer cost and a linear extrapolation to
    `depth` layers, and each provider's ratio to peft_adaption_prompt there. Estimates, not measurements."""
    fits: Dict[str, tuple] = {}
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = sorted((r for r in rows if r["provider"] == provider), key=lambda r: r["shape"]["layers"])
        if len(mine) < 2 or mine[0]["shape"]["layers"] == mine[-1]["shape"]["layers"]:
            continue
        a, b = mine[0], mine[-1]
        span = b["shape"]["layers"] - a["shape"]["layers"]
        per_ms, per_mb = (b["ms_p50"] - a["ms_p50"]) / span, (b["peak_mem_mb"] - a["peak_mem_mb"]) / span
        extra = depth - a["shape"]["layers"]
        fits[provider] = (per_ms, per_mb, a["ms_p50"] + extra * per_ms, a["peak_mem_mb"] + extra * per_mb, a["shape"])
    lines = []
    peft = fits.get("peft_adaption_prompt")
    for provider, (per_ms, per_mb, ms, mb, shape) in fits.items():
        line = (f"{provider}: {per_ms:.2f} ms and {per_mb:.0f} MiB per layer; at {depth} layers (estimate) "
                f"{ms:.1f} ms, {tokens_per_s(shape, ms):,.0f} tokens/s, peak {mb:.0f} MiB")
        if peft is not None and provider != "peft_adaption_prompt" and ms > 0 and peft[3] > 0:
            line += f"; vs PEFT {peft[2] / ms:.2f}x tokens/s, {mb / peft[3]:.2f}x peak memory"
        lines.append(line)
    return lines


def run(args) -> int:
    s = runner.begin(args, PRESETS, step_mode=MODE)
    errors, noted, rows = 0, set(), []

    for shape in s.shapes:
        print(f"--- {OP} {shape} {args.dtype}")
        for provider in args.providers:

            def measure(provider=provider, shape=shape):
                row = run_case(provider, shape, s.dtype, s.warmup, s.rep, s.copy_gbps, s.env, s.matmul_tflops)
                rows.append(row)
                return row

            errors += runner.record_case(s.out, noted, provider, MODE, shape, measure)
    for line in depth_summary(rows):
        print(line)
    return runner.finish(errors)


# ----------------------------------------------------------------------------------------------------
# CPU: correctness smoke
# ----------------------------------------------------------------------------------------------------

_PEFT_PROMPT = re.compile(r"\.layers\.(\d+)\.self_attn\.adaption_prompt$")
PARITY_OURS, PARITY_PEFT = "v2 in PEFT's form", f"peft (gate {PARITY_GATE}, o_proj bias frozen)"


@torch.no_grad()
def to_peft_form(ours: Case, peft: Case) -> None:
    """Make ours the same trained function as PEFT's: its prompts copied in, its scales frozen (PEFT has none),
    o_proj's bias frozen on both sides (PEFT adds o_proj's bias to the prompt term too) and every gate set to
    PARITY_GATE on both sides."""
    from mmkernels.nn import ScaleBiasLinear

    prompts = {}
    for n, p in peft.model.named_parameters():
        match = _PEFT_PROMPT.search(n)
        if match:
            prompts[int(match.group(1))] = p
        elif n.endswith("o_proj.bias"):
            p.requires_grad_(False)
        elif n.endswith("adaption_gate"):
            p.fill_(PARITY_GATE)
    for i, block in enumerate(ours.model.layers):
        block.self_attn.prompt.prompt.copy_(prompts[i][0])
        block.self_attn.prompt.gate.fill_(PARITY_GATE)
    for n, m in ours.model.named_modules():
        if isinstance(m, ScaleBiasLinear):
            m.scale.requires_grad_(False)
            if n.endswith("o_proj"):
                m.bias.requires_grad_(False)


def parity_losses(shape: Dict[str, Any], ids: torch.Tensor, steps: int, backend: str = "reference"):
    """(ours, PEFT's) float32 CPU losses over `steps` SGD steps of ours in PEFT's form and PEFT (to_peft_form)."""
    device, dtype = torch.device("cpu"), runner.SMOKE_DTYPE
    peft = make_case("peft_adaption_prompt", shape, dtype, device)
    ours = make_case(f"mmkernels_v2:{backend}", shape, dtype, device, peft_form=True)
    to_peft_form(ours, peft)
    for case in (peft, ours):
        case.optimizer = torch.optim.SGD([p for p in case.model.parameters() if p.requires_grad], lr=PARITY_SGD_LR)
    return ours.losses(ids, steps), peft.losses(ids, steps)


def smoke(steps: int = 3, lr: float = 1e-2, backends: Optional[List[str]] = None) -> List[str]:
    """The failures (empty when the smoke passed). backends: those mmkernels_v2 runs on (default: reference,
    and triton where available); the checkpointed and PEFT-form runs use reference. lr is high enough that
    one step moves the loss well beyond the tolerance."""
    device, dtype, shape = torch.device("cpu"), runner.SMOKE_DTYPE, SMOKE_SHAPE
    failures: List[str] = []
    ids = runner.step_ids(shape, device)
    try:
        with torch.no_grad():
            base_loss = build_hf(shape, dtype, device)(input_ids=ids, labels=ids, use_cache=False).loss.item()
    except runner.Unavailable as exc:
        print(f"smoke: no transformers/PEFT: {OP} not checked against them ({exc})")
        base_loss = None
    if backends is None:
        backends = runner.smoke_backends(ATTN_OP, device)

    runs: Dict[str, List[float]] = {}

    def record(label: str, make: Callable[[], Any]) -> None:
        try:
            runs[label] = make()
        except Exception as exc:
            failures.append(f"{OP} {label}: {type(exc).__name__}: {exc}")

    for b in backends:
        record(f"v2[{b}]", lambda: make_case(f"mmkernels_v2:{b}", shape, dtype, device, lr=lr).losses(ids, steps))
    record("v2_ckpt[reference]",
           lambda: make_case("mmkernels_v2_ckpt:reference", shape, dtype, device, lr=lr).losses(ids, steps))
    record("v2_attn[reference]",
           lambda: make_case("mmkernels_v2_attn:reference", shape, dtype, device, lr=lr).losses(ids, steps))
    if base_loss is not None:
        record("peft", lambda: make_case("peft_adaption_prompt", shape, dtype, device, lr=lr).losses(ids, steps))

        def pair():
            ours, runs[PARITY_PEFT] = parity_losses(shape, ids, steps)
            return ours

        record(PARITY_OURS, pair)

    for label, got in runs.items():
        # Zero-init gates, unit scales, zero biases: step 0 is the plain model (not in the parity pair).
        if base_loss is not None and label not in (PARITY_OURS, PARITY_PEFT):
            err = runner.compare_losses(f"{OP} {label} step-0 loss vs transformers", got[:1], [base_loss])
            if err:
                failures.append(err)
        if len(got) > 1 and runner.compare_losses("", got[1:2], got[:1]) is None:
            failures.append(f"{OP} {label}: the loss did not move after an optimizer step: {got}")
    pairs = [(f"v2[{b}]", "v2[reference]") for b in backends if b != "reference"]
    pairs += [("v2_ckpt[reference]", "v2[reference]"), ("v2_attn[reference]", "v2[reference]"),
              (PARITY_OURS, PARITY_PEFT)]
    for label, want in pairs:
        if label in runs and want in runs:
            err = runner.compare_losses(f"{OP} {label} vs {want} losses over {steps} steps", runs[label], runs[want])
            if err:
                failures.append(err)
    print(f"smoke: {OP} {shape}: checked {', '.join(runs) or 'nothing'}"
          + ("" if base_loss is None else " against transformers (step 0) and PEFT AdaptionPrompt (every step)"))
    if base_loss is not None:
        try:
            for line in traced_summary():
                print(line)
        except Exception as exc:
            failures.append(f"{OP} traced peaks: {type(exc).__name__}: {exc}")
    return failures + runner.flop_failures(OP, PRESETS, flops)


def main(argv: Optional[List[str]] = None) -> int:
    args = runner.parse_args(SPEC, argv)
    return runner.run_or_smoke(run, args, smoke)


if __name__ == "__main__":
    sys.exit(main())
