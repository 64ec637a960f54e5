"""Benchmark gated_prompt_attention (LLaMA-Adapter's zero-init gated attention, training): mmkernels vs
eager vs torch.compile vs plain attention without the prompt vs SDPA (one pass without the prompt; two
passes, the unfused form).

    out = softmax_causal(q K^T s) V  +  tanh(gate_h) * softmax(q P_K^T s) P_V

Target: bf16, causal, B=4, H=32, H_kv=8, D=128, T=S=2048, L_p=10, the prompt shared by the batch
(prompt_k/prompt_v (1, L_p, H_kv, D)), gate per head (H,) float32 (as the model's parameter), nonzero,
gate_fn "tanh". Also T=512 and T=4096. Inputs: q (B, T, H, D), k/v (B, T, H_kv, D); gradients flow to
q, k, v, prompt_k, prompt_v and gate.

Targets (goals; only the rows of a GPU run can show whether they are met), fwd+bwd at the target shape:
    ms_p50(attention_no_prompt) / ms_p50(mmkernels) >= 1/1.10   (the prompt costs at most 10% over our
                                                                  plain attention on the same q, k, v)
    ms_p50(sdpa_no_prompt)      / ms_p50(mmkernels) >= 1/1.25   (at most 25% over SDPA flash without it)

FLOP formula (the FlashAttention convention; matmul FLOPs only):
    fwd       main causal segment 2*B*H*T*T*D (as bench_attention) + prompt segment 4*B*H*T*L_p*D
    bwd       2.5 x fwd
    fwd+bwd   3.5 x fwd
Every provider is measured against this count, the no-prompt peers included (their TFLOP/s is then
overstated by L_p / (T/2), 1% at the target; compare their ms). gbps and pct_of_copy_bw are null.

Providers:
    mmkernels            mmkernels.ops.gated_prompt_attention (one fused kernel, fwd and bwd)
    eager, compile       the reference (mmkernels/reference/gated_attention.py) eager / torch.compile; it
                         materialises the float32 (B, H, T, S) scores (out-of-memory notes at long T)
    attention_no_prompt  mmkernels.ops.attention(q, k, v, causal=True): the same q, k, v, no prompt
    sdpa_no_prompt       F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION) on (B, H, T, D)
                         transposed views with enable_gqa=True, no prompt (as bench_attention's sdpa)
    sdpa_two_pass        what an unfused implementation does: SDPA flash causal over the tokens, SDPA flash
                         (non-causal) over the prompt, then main + tanh(gate) * prompt (two elementwise
                         kernels). A batch-1 prompt is attended by all B*T queries in one SDPA call of batch
                         1 (q viewed as (1, B*T, H, D), no copy); a batch-B prompt per sample.
The SDPA providers need T = S (SDPA's causal mask is top-left aligned, ours bottom-right) and the
enable_gqa argument (torch >= 2.5; on an older torch k/v are repeat_interleave'd inside the timed call,
row backend "flash+repeat_kv").

CPU smoke: ours (reference and triton backends) and sdpa_two_pass against the gated reference (output and
every input gradient); the no-prompt peers against the plain attention reference (output, q/k/v grads).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, List, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
import bench_attention
from mmkernels import backend as mmk_backend
from mmkernels.reference import attention as attn_ref
from mmkernels.reference import gated_attention as ref

OP = "gated_prompt_attention"
GATE_FN = "tanh"


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    b, t, h, h_kv, d, lp = shape["B"], shape["T"], shape["H"], shape["H_kv"], shape["D"], shape["L_p"]
    s = shape.get("S", t)
    pb = shape.get("prompt_batch", 1)
    q = runner.randn((b, t, h, d), dtype, device, gen, requires_grad=True)
    k = runner.randn((b, s, h_kv, d), dtype, device, gen, requires_grad=True)
    v = runner.randn((b, s, h_kv, d), dtype, device, gen, requires_grad=True)
    pk = runner.randn((pb, lp, h_kv, d), dtype, device, gen, requires_grad=True)
    pv = runner.randn((pb, lp, h_kv, d), dtype, device, gen, requires_grad=True)
    # A trained, nonzero gate per head, float32 like the model's parameter: |tanh(gate)| in [0.2, 0.6].
    signs = torch.where(torch.arange(h, device=device) % 2 == 0, 1.0, -1.0)
    gate = ((0.2 + 0.5 * torch.rand(h, device=device, generator=gen)) * signs).requires_grad_(True)
    return (q, k, v, pk, pv, gate, bool(shape.get("causal", True)))


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    b, t, h, d, lp = shape["B"], shape["T"], shape["H"], shape["D"], shape["L_p"]
    fwd = bench_attention.flops(shape, "fwd") + 4.0 * b * h * t * lp * d
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    return None  # compute-bound: no meaningful GB/s


def ours(q, k, v, pk, pv, gate, causal):
    return mmkernels.ops.gated_prompt_attention(q, k, v, pk, pv, gate, causal=causal, gate_fn=GATE_FN)


def reference(q, k, v, pk, pv, gate, causal):
    return ref.gated_prompt_attention(q, k, v, pk, pv, gate, causal, GATE_FN)


def reference_no_prompt(q, k, v, pk, pv, gate, causal):
    return attn_ref.attention(q, k, v, causal)


def attention_no_prompt(shape, inputs):
    def fn(q, k, v, pk, pv, gate, causal):
        return mmkernels.ops.attention(q, k, v, causal=causal)

    return runner.Resolved(fn, mmk_backend.select("attention", inputs[0].device))


def sdpa_no_prompt(shape, inputs):
    base = bench_attention.sdpa(shape, inputs[:3] + inputs[-1:])  # checks T = S; flash (+repeat_kv)

    def fn(q, k, v, pk, pv, gate, causal):
        return base.fn(q, k, v, causal)

    return runner.Resolved(fn, base.backend, base.context)


def _sdpa_prompt(q, pk, pv):
    """Non-causal SDPA of q (B, T, H, D) over the prompt (1 or B, L_p, H_kv, D); (B, T, H, D)."""
    import torch.nn.functional as F

    b, t, h, d = q.shape
    if pk.shape[0] == 1 and b > 1:  # a shared prompt: all B*T queries in one batch-1 call (a view)
        q = q.reshape(1, b * t, h, d)
    qt, kt, vt = q.transpose(1, 2), pk.transpose(1, 2), pv.transpose(1, 2)
    if bench_attention.sdpa_has_enable_gqa():
        out = F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
    else:
        rep = h // pk.shape[2]
        out = F.scaled_dot_product_attention(qt, kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1))
    return out.transpose(1, 2).reshape(b, t, h, d)


def sdpa_two_pass(shape, inputs):
    base = bench_attention.sdpa(shape, inputs[:3] + inputs[-1:])

    def fn(q, k, v, pk, pv, gate, causal):
        main = base.fn(q, k, v, causal)
        g = torch.tanh(gate).to(q.dtype).view(1, 1, -1, 1)
        return main + g * _sdpa_prompt(q, pk, pv)

    return runner.Resolved(fn, base.backend, base.context)


def _shape(t=2048, d=128, lp=10):
    return {"B": 4, "T": t, "H": 32, "H_kv": 8, "D": d, "L_p": lp, "causal": True}


TARGET = _shape()
PEERS = {"attention_no_prompt": attention_no_prompt, "sdpa_no_prompt": sdpa_no_prompt, "sdpa_two_pass": sdpa_two_pass}
NO_PROMPT_PEERS = ("attention_no_prompt", "sdpa_no_prompt")
BENCH = runner.Bench(
    op=OP,
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={
        "default": [TARGET, _shape(t=512), _shape(t=4096)],
        "target": [TARGET],
        "seqlen": [_shape(t=512), TARGET, _shape(t=4096)],
    },
    smoke_shapes=[
        {"B": 2, "T": 19, "H": 4, "H_kv": 2, "D": 16, "L_p": 5, "causal": True},
        {"B": 1, "T": 33, "H": 2, "H_kv": 1, "D": 32, "L_p": 3, "causal": True},
        {"B": 2, "T": 17, "H": 4, "H_kv": 1, "D": 16, "L_p": 4, "causal": True, "prompt_batch": 2},
    ],
    flops=flops,
    nbytes=nbytes,
    peers=PEERS,
    description="TFLOP/s from the FlashAttention FLOP convention plus the prompt segment (see the docstring).",
)


def smoke_no_prompt_peers() -> List[str]:
    """The no-prompt peers against the plain attention reference: output and the q, k, v gradients."""
    device = torch.device("cpu")
    failures: List[str] = []
    for shape in BENCH.smoke_shapes:
        q, k, v, pk, pv, gate, causal = make_inputs(shape, runner.SMOKE_DTYPE, device, runner.generator(device))
        base = (q, k, v, pk.detach(), pv.detach(), gate.detach(), causal)  # only q, k, v are differentiated
        want_out, want_grad = runner._fwd_bwd(reference_no_prompt, runner._clone(base))
        checked = []
        for name in NO_PROMPT_PEERS:
            try:
                inputs = runner._clone(base)
                r = runner.resolve(BENCH, name, shape, inputs, device)
                with r.context():
                    got_out, got_grad = runner._fwd_bwd(r.fn, inputs)
            except Exception as exc:
                why = str(exc) if isinstance(exc, runner.Unavailable) else f"{type(exc).__name__}: {str(exc)[:160]}"
                print(f"smoke: provider {name} not checked: {why}")
                continue
            for what, got, want in (("output", got_out, want_out), ("grad", got_grad, want_grad)):
                err = runner._compare(f"{OP} {shape} provider={name} {what}", got, want)
                if err:
                    failures.append(err)
            checked.append(name)
        print(f"smoke: {OP} {shape}: checked {', '.join(checked) or 'nothing'} against the reference attention "
              f"without the prompt")
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    if runner.HAS_CUDA:
        return runner.main(BENCH, argv)
    runner.parse_args(BENCH, argv)  # the same flag checks as on a GPU
    gated = {n: f for n, f in PEERS.items() if n not in NO_PROMPT_PEERS}
    return runner.report_smoke(runner.smoke(dataclasses.replace(BENCH, peers=gated)) + smoke_no_prompt_peers())


if __name__ == "__main__":
    sys.exit(main())
