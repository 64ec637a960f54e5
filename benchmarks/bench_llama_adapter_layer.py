"""Benchmark one LLaMA-7B-shaped attention layer with LLaMA-Adapter, training (fwd+bwd): mmkernels vs PEFT.

The case is the layer's self-attention module as a method trains it: frozen q/k/v/o projections, RoPE, causal
attention plus the gated attention over the adaption prompt (L_p=10), and the backward to the layer input x
and the adapter parameters (prompt and gate; with V2 also the bias/scale of q, k, v, o).

Target: bf16, B=4, T=2048, hidden 4096, H=32, H_kv=8, D=128 (a LLaMA-7B layer with GQA 4), L_p=10.
Presets: default = V1 and V2 at the target shape; target = V1 only (also what --quick runs).
Target (issue; a goal, only a GPU run's rows can show whether it is met): ms_p50(peft) / ms_p50(mmkernels)
>= 2 in the fwd+bwd mode at the target shape (V1).

Providers:
    mmkernels     `model.layers[0].self_attn` of a one-layer mmkernels Llama (LlamaConfig(vocab_size=32000,
                  hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                  num_key_value_heads=8)) after methods.llama_adapter.apply(model, LlamaAdapterConfig(
                  version=1 or 2, prompt_len=10)); V2 with bias_scale_targets=(q_proj, k_proj, v_proj,
                  o_proj). Called as attn(x, cos, sin, 0, None, None) with cos, sin =
                  ops.rope_cos_sin(arange(T), model._inv_freq): rope, the fused gated prompt attention
                  (ops.gated_prompt_attention, gate per head, tanh), the prompt's keys/values projected in
                  the call (training: once per step). Row backend: the gated_prompt_attention backend.
    peft          HF PEFT's AdaptedAttention: a one-layer transformers LlamaForCausalLM of the same config
                  wrapped by get_peft_model(model, AdaptionPromptConfig(adapter_len=10, adapter_layers=1,
                  task_type="CAUSAL_LM")), its layers[0].self_attn called as attn(hidden_states=x,
                  position_embeddings=(cos, sin) from the model's rotary_emb, attention_mask=None)[0]
                  (row backend: the HF attention implementation, "sdpa"). PEFT recomputes the rotated
                  queries (q_proj and v_proj again), attends to the prompt with matmuls and applies o_proj to
                  the prompt term separately. PEFT has no V2: for version 2 its q/k/v/o are wrapped in the
                  same nn.ScaleBiasLinear (plain PyTorch) that mmkernels' V2 uses; since PEFT applies o_proj
                  to both terms, o_proj's bias enters twice (the benchmark's o_proj bias values are zero).
    peft_compile  the same AdaptedAttention under torch.compile(dynamic=False), compiled afresh per case
                  (two untimed calls first); bwd with donated buffers off, as in runner.
Both providers get identical weights, prompt and scale/bias values (seeded); the adapter's gate is nonzero
(ours: per head (H,) float32, tanh; PEFT: one raw scalar in the model dtype, its only form). The adapter
parameters are float32 in mmkernels (its default) and in the model dtype in PEFT (its default).

FLOP formula (matmul FLOPs only; N = B*T tokens, q = H*D, kv = H_kv*D; the base weights are frozen, so the
backward computes no weight gradients):
    proj    2*N*hidden*(q + 2*kv) + 2*N*q*hidden          (q, k, v, o projections)
    attn    2*B*H*T*T*D + 4*B*H*T*L_p*D                   (causal main segment + prompt segment)
    prompt  4*L_p*hidden*kv                               (the prompt's k and v projections)
    fwd = proj + attn + prompt;  bwd = proj + 2.5*attn + prompt (input gradients only);  fwd+bwd = sum
Every provider is measured against this count (PEFT's recomputed projections are its own overhead). gbps is
null.

The runner's Bench (one functional op with its reference) does not describe a module benchmark, so this
script has its own case loop built from runner's pieces (CLI flags, copy/matmul rows, build_mode,
time_fn, peak_memory_mb, make_row, append_rows): the same rows, flags and CPU behaviour as the others.
Without a GPU it runs a correctness smoke instead (float32, tiny config): ours (reference and triton
backends, gate_fn="raw", gate_per_head=False, PEFT's form) against PEFT, output and the gradients of x and
of every adapter parameter, V1 and V2; then every mode's closure of mmkernels and peft once, untimed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from mmkernels import backend as mmk_backend

OP = "llama_adapter_layer"
ATTN_OP = "gated_prompt_attention"  # the backend recorded in mmkernels rows
PROVIDERS = ("mmkernels", "peft", "peft_compile")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _shape(version=1, b=4, t=2048):
    return {"B": b, "T": t, "hidden": 4096, "H": 32, "H_kv": 8, "D": 128, "L_p": 10, "version": version}


TARGET = _shape()
PRESETS = {"default": [TARGET, _shape(version=2)], "target": [TARGET]}
# vocab / intermediate only size the unused embedding and MLP; LLaMA-7B's unless a shape says otherwise.
SMOKE_SHAPES = [
    {"B": 2, "T": 13, "hidden": 64, "H": 4, "H_kv": 2, "D": 16, "L_p": 5, "version": 1, "vocab": 97,
     "intermediate": 96},
    {"B": 1, "T": 9, "hidden": 64, "H": 4, "H_kv": 1, "D": 16, "L_p": 3, "version": 2, "vocab": 97,
     "intermediate": 96},
]
SPEC = types.SimpleNamespace(  # what runner.parse_args reads of a Bench
    op=OP, presets=PRESETS, provider_names=lambda: list(PROVIDERS),
    description="One LLaMA-7B attention layer with LLaMA-Adapter V1/V2, fwd+bwd, against PEFT's AdaptedAttention.",
)


def flops(shape: Dict[str, Any], mode: str) -> float:
    b, t, hid, h, h_kv, d, lp = (shape[k] for k in ("B", "T", "hidden", "H", "H_kv", "D", "L_p"))
    n, qd, kvd = b * t, h * d, h_kv * d
    proj = 2.0 * n * hid * (qd + 2 * kvd) + 2.0 * n * qd * hid
    attn = 2.0 * b * h * t * t * d + 4.0 * b * h * t * lp * d
    prompt = 4.0 * lp * hid * kvd
    fwd, bwd = proj + attn + prompt, proj + 2.5 * attn + prompt
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    return None  # compute-bound: no meaningful GB/s


# ----------------------------------------------------------------------------------------------------
# The two layers, with the same (seeded) values
# ----------------------------------------------------------------------------------------------------


def adapter_names(shape: Dict[str, Any]) -> List[str]:
    """The trainable parameters in a fixed order (the gradient order of a case)."""
    extra = [f"{lin}.{p}" for lin in LINEARS for p in ("scale", "bias")] if shape["version"] == 2 else []
    return ["prompt", "gate", *extra]


def make_values(shape: Dict[str, Any], device, gen) -> Dict[str, torch.Tensor]:
    """float32 weights and adapter values; the gate is nonzero (a trained adapter)."""
    hid, h, h_kv, d, lp = (shape[k] for k in ("hidden", "H", "H_kv", "D", "L_p"))
    out_dims = {"q_proj": h * d, "k_proj": h_kv * d, "v_proj": h_kv * d, "o_proj": hid}
    in_dims = {"q_proj": hid, "k_proj": hid, "v_proj": hid, "o_proj": h * d}

    def rnd(*size, scale=1.0):
        return torch.randn(*size, device=device, generator=gen) * scale

    vals = {f"{lin}.weight": rnd(out_dims[lin], in_dims[lin], scale=in_dims[lin] ** -0.5) for lin in LINEARS}
    vals["prompt"] = rnd(lp, hid)
    vals["gate_head"] = (0.3 + 0.4 * torch.rand(h, device=device, generator=gen)).atanh()  # tanh in [0.3, 0.7]
    vals["gate_scalar"] = torch.tensor([0.55], device=device)
    for lin in LINEARS:
        vals[f"{lin}.scale"] = 1 + 0.1 * rnd(out_dims[lin])
        # PEFT applies o_proj to the main and the prompt term separately: a nonzero o_proj bias would count
        # twice there, so it is zero (its gradient still differs by that factor; see smoke()).
        vals[f"{lin}.bias"] = (0.05 * rnd(out_dims[lin])) if lin != "o_proj" else torch.zeros(out_dims[lin], device=device)
    return vals


def _llama_kwargs(shape: Dict[str, Any]) -> Dict[str, Any]:
    return dict(vocab_size=shape.get("vocab", 32000), hidden_size=shape["hidden"],
                intermediate_size=shape.get("intermediate", 11008), num_hidden_layers=1,
                num_attention_heads=shape["H"], num_key_value_heads=shape["H_kv"])


@torch.no_grad()
def build_ours(shape, dtype, device, vals, match_peft=False):
    """(layer, named adapter parameters, model, cos, sin). match_peft: one raw scalar gate (PEFT's form)."""
    from mmkernels.methods import llama_adapter as la
    from mmkernels.models import Llama, LlamaConfig

    with torch.device(device):
        model = Llama(LlamaConfig(**_llama_kwargs(shape)))
    model.to(device=device, dtype=dtype)  # also moves the float32 rotary frequencies
    attn = model.layers[0].self_attn
    for lin in LINEARS:
        getattr(attn, lin).weight.copy_(vals[f"{lin}.weight"])
    extra = dict(bias_scale_targets=LINEARS) if shape["version"] == 2 else {}
    gate = dict(gate_fn="raw", gate_per_head=False) if match_peft else {}
    la.apply(model, la.LlamaAdapterConfig(version=shape["version"], prompt_len=shape["L_p"], **gate, **extra))
    params = {"prompt": attn.prompt.prompt, "gate": attn.prompt.gate}
    for name in adapter_names(shape)[2:]:
        lin, _, what = name.partition(".")
        params[name] = getattr(getattr(attn, lin), what)
    for name, p in params.items():
        src = vals[("gate_scalar" if match_peft else "gate_head") if name == "gate" else name]
        p.copy_(src.view(p.shape))
    positions = torch.arange(shape["T"], device=device)
    cos, sin = mmkernels.ops.rope_cos_sin(positions, model._inv_freq)
    return attn, params, model, cos, sin


@torch.no_grad()
def build_peft(shape, dtype, device, vals):
    """(AdaptedAttention, named adapter parameters, model, (cos, sin))."""
    import transformers
    from peft import AdaptionPromptConfig, get_peft_model
    from mmkernels.nn import ScaleBiasLinear

    with torch.device(device):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_kwargs(shape)))
    hf.to(dtype=dtype)
    base = hf.model.layers[0].self_attn
    for lin in LINEARS:
        getattr(base, lin).weight.copy_(vals[f"{lin}.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PEFT calls a deprecated transformers helper
        peft_model = get_peft_model(hf, AdaptionPromptConfig(adapter_len=shape["L_p"], adapter_layers=1,
                                                             task_type="CAUSAL_LM"))
    attn = peft_model.get_base_model().model.layers[0].self_attn  # the AdaptedAttention
    params = {"prompt": attn.adaption_prompt, "gate": attn.adaption_gate}
    if shape["version"] == 2:
        for lin in LINEARS:  # V2's bias/scale on PEFT's wrapped LlamaAttention (PEFT itself has no V2)
            wrapped = ScaleBiasLinear(getattr(attn.model, lin))
            setattr(attn.model, lin, wrapped)
            params[f"{lin}.scale"], params[f"{lin}.bias"] = wrapped.scale, wrapped.bias
    for name, p in params.items():
        p.copy_(vals["gate_scalar" if name == "gate" else name].view(p.shape))
    positions = torch.arange(shape["T"], device=device)[None]
    x_like = torch.empty(1, shape["T"], shape["hidden"], dtype=dtype, device=device)
    cos, sin = peft_model.get_base_model().model.rotary_emb(x_like, positions)
    return attn, params, peft_model, (cos, sin)


class Case:
    """One provider's callable fn(x, *adapter params) -> output, its inputs and the row's backend. The
    parameters are inputs only so that build_mode resets their gradients and the smoke reads them;
    fn reaches them through the module."""

    def __init__(self, fn: Callable, inputs: tuple, backend: Optional[str], context: Callable = contextlib.nullcontext,
                 keep: Any = None) -> None:
        self.fn, self.inputs, self.backend, self.context, self.keep = fn, inputs, backend, context, keep


def make_case(provider: str, shape: Dict[str, Any], dtype, device, match_peft=False) -> Case:
    name, _, forced = provider.partition(":")
    if forced and name != "mmkernels":
        raise runner.Unavailable(f"provider {provider!r}: only 'mmkernels' takes a ':<backend>' suffix")
    gen = runner.generator(device)
    vals = make_values(shape, device, gen)
    x = runner.randn((shape["B"], shape["T"], shape["hidden"]), dtype, device, gen, requires_grad=True)
    names = adapter_names(shape)
    if name == "mmkernels":
        context = contextlib.nullcontext
        if forced:
            ok, why = mmk_backend.availability(forced, ATTN_OP, device)
            if not ok:
                raise runner.Unavailable(why)
            context = lambda: mmkernels.use_backend(forced)  # noqa: E731
        attn, params, model, cos, sin = build_ours(shape, dtype, device, vals, match_peft)

        def fn(x, *_params):
            return attn(x, cos, sin, 0, None, None)

        backend = forced or mmk_backend.select(ATTN_OP, device)
        return Case(fn, (x, *(params[n] for n in names)), backend, context, keep=model)
    if name in ("peft", "peft_compile"):
        missing = [m for m in ("peft", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise runner.Unavailable(f"{' and '.join(missing)} not installed")
        attn, params, model, pos_emb = build_peft(shape, dtype, device, vals)
        layer = attn
        if name == "peft_compile":
            torch._dynamo.reset()
            layer = torch.compile(attn, dynamic=False)

        def fn(x, *_params):
            return layer(hidden_states=x, position_embeddings=pos_emb, attention_mask=None)[0]

        return Case(fn, (x, *(params[n] for n in names)), model.config._attn_implementation, keep=model)
    raise runner.Unavailable(f"unknown provider {provider!r}; expected one of {list(PROVIDERS)}")


# ----------------------------------------------------------------------------------------------------
# GPU: the case loop (runner.run_case / runner.main for a module)
# ----------------------------------------------------------------------------------------------------


def run_case(provider: str, shape, mode: str, dtype, warmup: int, rep: int, copy_gbps, env,
             matmul_tflops=None) -> Dict[str, Any]:
    device = torch.device(runner.DEVICE)
    case = make_case(provider, shape, dtype, device)
    name = provider.partition(":")[0]
    with case.context(), runner._autograd_context("compile" if name == "peft_compile" else name, mode):
        fn, leaves = runner.build_mode(case.fn, case.inputs, mode)
        for _ in range(2):  # compile / autotune / allocator warm-up, untimed
            fn()
        peak = runner.peak_memory_mb(fn, leaves)
        ms = runner.time_fn(fn, warmup=warmup, rep=rep, grad_to_none=leaves or None)
    return runner.make_row(
        op=OP, provider=name, backend=case.backend, mode=mode, shape=shape, dtype=runner.dtype_name(dtype), ms=ms,
        flops=flops(shape, mode), nbytes=nbytes(shape, mode, dtype), copy_gbps=copy_gbps, peak_mem_mb=peak,
        env=env, matmul_tflops=matmul_tflops,
    )


def run(args) -> int:
    s = runner.begin(args, PRESETS)
    errors, noted = 0, set()
    for shape in s.shapes:
        print(f"--- {OP} {shape} {args.dtype}")
        for provider in args.providers:
            for mode in args.modes:
                errors += runner.record_case(s.out, noted, provider, mode, shape, lambda: run_case(
                    provider, shape, mode, s.dtype, s.warmup, s.rep, s.copy_gbps, s.env, s.matmul_tflops))
    return runner.finish(errors)


# ----------------------------------------------------------------------------------------------------
# CPU: correctness smoke
# ----------------------------------------------------------------------------------------------------


def _fwd_bwd(case: Case) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
    with case.context():
        out = case.fn(*case.inputs)
        torch.autograd.backward([out], runner.grad_outputs([out]))
    return [out.detach()], [t.grad for t in case.inputs]


def smoke() -> List[str]:
    device, dtype = torch.device("cpu"), runner.SMOKE_DTYPE
    failures: List[str] = []
    backends = runner.smoke_backends(ATTN_OP, device)
    for shape in SMOKE_SHAPES:
        try:
            want_out, want_grad = _fwd_bwd(make_case("peft", shape, dtype, device))
        except runner.Unavailable as exc:
            print(f"smoke: {OP} {shape}: no PEFT to compare with ({exc})")
            want_out = want_grad = None
        names = ["x", *adapter_names(shape)]
        checked = []
        for b in backends:
            try:
                got_out, got_grad = _fwd_bwd(make_case(f"mmkernels:{b}", shape, dtype, device, match_peft=True))
            except Exception as exc:
                failures.append(f"{OP} {shape} backend={b}: {type(exc).__name__}: {exc}")
                continue
            checked.append(f"mmkernels[{b}]")
            if want_out is None:
                continue
            err = runner._compare(f"{OP} {shape} backend={b} output", got_out, want_out)
            if err:
                failures.append(err)
            for n, got, want in zip(names, got_grad, want_grad):
                if n == "o_proj.bias":  # PEFT adds o_proj's bias to both terms: its gradient is twice ours
                    got, want = (None if got is None else 2 * got), want
                if got is not None and want is not None:
                    got = got.view(want.shape)  # PEFT's prompt is (1, L_p, hidden), ours (L_p, hidden)
                err = runner._compare(f"{OP} {shape} backend={b} grad of {n}", [got], [want])
                if err:
                    failures.append(err)
        for provider in ("mmkernels", "peft"):  # every mode's timed closure builds and runs once, untimed
            for mode in runner.MODES:
                try:
                    case = make_case(provider, shape, dtype, device)
                    with case.context():
                        fn, _ = runner.build_mode(case.fn, case.inputs, mode)
                        fn()
                except runner.Unavailable as exc:
                    print(f"smoke: provider {provider} not run: {exc}")
                except Exception as exc:
                    failures.append(f"{OP} {shape} {provider} {mode} closure: {type(exc).__name__}: {exc}")
        against = "peft" if want_out is not None else "nothing (no PEFT)"
        print(f"smoke: {OP} {shape}: checked {', '.join(checked) or 'nothing'} against {against}")
    print("smoke: provider peft_compile not run on CPU (torch.compile of the layer is left to the GPU run)")
    return failures + runner.flop_failures(OP, PRESETS, flops, runner.MODES)


def main(argv: Optional[List[str]] = None) -> int:
    args = runner.parse_args(SPEC, argv)
    return runner.run_or_smoke(run, args, smoke)


if __name__ == "__main__":
    sys.exit(main())
