"""Benchmark decode_attention (one generation step against the KV cache, with and without LLaMA-Adapter's
gated prompt segment): mmkernels vs eager vs torch.compile vs SDPA in two passes. Inference only: the
fwd mode alone, every call under torch.no_grad().

    out = softmax(q K^T s) V  [+ tanh(gate_h) * softmax(q P_K^T s) P_V]

Shapes: bf16, T=1 new query, H=32, H_kv=8, D=128, B in {1, 8, 32}, cache length S in {512, 2048, 8192},
each with the prompt (L_p=10, prompt_k/prompt_v (1, L_p, H_kv, D) shared by the batch, as LLaMA-Adapter's
text prompt; gate per head (H,) float32, nonzero, gate_fn "tanh") and without it (shape key "L_p": 0: no
prompt_k/prompt_v/gate are passed). q (B, 1, H, D); k, v (B, S, H_kv, D) contiguous (a full cache).
Target shape: B=8, S=2048; `--quick` (without --shapes) runs its two rows, with and without the prompt.

Target (a goal; only a GPU run's rows can show whether it is met): at every shape,
    ms_p50(mmkernels, L_p=10) / ms_p50(mmkernels, L_p=0) <= 1.05   (the prompt costs at most 5%).

Byte formula (memory-bound: the traffic of one call; e = bytes per element of --dtype, P = 1 the prompt's
batch):
    read K and V of the cache   2*B*S*H_kv*D*e
    read q, write out           2*B*T*H*D*e
    read the prompt's K and V   2*P*L_p*H_kv*D*e   (+ 4*H for the float32 gate; both 0 when L_p = 0)
GB/s = bytes / time; pct_of_copy_bw against the run's copy row. tflops is null. The split-KV kernels'
partial results (written and re-read at the merge) are implementation-specific and not counted.

Providers:
    mmkernels       mmkernels.ops.decode_attention (split-KV flash-decoding, the prompt as one more chunk)
    eager, compile  the reference (plain attention, or the gated reference with the prompt) eager /
                    torch.compile; it materialises the float32 (B, H, 1, S) scores
    sdpa_two_pass   F.scaled_dot_product_attention under sdpa_kernel(FLASH_ATTENTION) with enable_gqa=True
                    over the cache ((B, H, 1, D) and (B, H_kv, S, D) transposed views; T=1 needs no mask),
                    then, with the prompt, SDPA over the prompt (all B queries in one batch-1 call, q viewed
                    as (1, B, H, D)) and main + tanh(gate) * prompt. Without the prompt it is the one SDPA
                    call. Needs T=1 (SDPA's causal mask is top-left aligned) and torch >= 2.5 (enable_gqa).

CPU smoke: ours (reference and triton backends) and sdpa_two_pass against the reference forward, with and
without the prompt, by torch.allclose at runner.SMOKE_TOL.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
import bench_attention
from bench_gated_attention import _sdpa_prompt
from mmkernels.reference import attention as attn_ref
from mmkernels.reference import gated_attention as gated_ref

OP = "decode_attention"
GATE_FN = "tanh"
MODES = ("fwd",)


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    b, t, h, h_kv, d, s, lp = (shape[n] for n in ("B", "T", "H", "H_kv", "D", "S", "L_p"))
    q = runner.randn((b, t, h, d), dtype, device, gen)
    k = runner.randn((b, s, h_kv, d), dtype, device, gen)
    v = runner.randn((b, s, h_kv, d), dtype, device, gen)
    if not lp:
        return (q, k, v, None, None, None)
    pb = shape.get("prompt_batch", 1)
    pk = runner.randn((pb, lp, h_kv, d), dtype, device, gen)
    pv = runner.randn((pb, lp, h_kv, d), dtype, device, gen)
    signs = torch.where(torch.arange(h, device=device) % 2 == 0, 1.0, -1.0)
    gate = (0.2 + 0.5 * torch.rand(h, device=device, generator=gen)) * signs  # float32, like the parameter
    return (q, k, v, pk, pv, gate)


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    b, t, h, h_kv, d, s, lp = (shape[n] for n in ("B", "T", "H", "H_kv", "D", "S", "L_p"))
    e = torch.empty((), dtype=dtype).element_size()
    total = 2 * b * s * h_kv * d * e + 2 * b * t * h * d * e
    if lp:
        total += 2 * shape.get("prompt_batch", 1) * lp * h_kv * d * e + 4 * h
    return float(total)


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    return None  # memory-bound: no meaningful TFLOP/s


def ours(q, k, v, pk, pv, gate):
    with torch.no_grad():
        return mmkernels.ops.decode_attention(q, k, v, prompt_k=pk, prompt_v=pv, gate=gate, gate_fn=GATE_FN)


def reference(q, k, v, pk, pv, gate):
    with torch.no_grad():
        if pk is None:
            return attn_ref.attention(q, k, v, True)
        return gated_ref.gated_prompt_attention(q, k, v, pk, pv, gate, True, GATE_FN)


def sdpa_two_pass(shape, inputs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    if shape["T"] != 1:
        raise runner.Unavailable("SDPA's causal mask is top-left aligned: only T = 1 (no mask) is comparable")
    if not bench_attention.sdpa_has_enable_gqa():
        raise runner.Unavailable(f"torch {torch.__version__} has no enable_gqa in scaled_dot_product_attention")

    def fn(q, k, v, pk, pv, gate):
        with torch.no_grad():
            main = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  enable_gqa=True).transpose(1, 2)
            if pk is None:
                return main
            return main + torch.tanh(gate).to(q.dtype).view(1, 1, -1, 1) * _sdpa_prompt(q, pk, pv)

    return runner.Resolved(fn, "flash", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))


def _shape(b=8, s=2048, lp=10):
    return {"B": b, "T": 1, "H": 32, "H_kv": 8, "D": 128, "S": s, "L_p": lp}


TARGET = _shape()
BENCH = runner.Bench(
    op=OP,
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={
        "default": [_shape(b, s, lp) for b in (1, 8, 32) for s in (512, 2048, 8192) for lp in (10, 0)],
        "target": [TARGET, _shape(lp=0)],
    },
    smoke_shapes=[
        {"B": 2, "T": 1, "H": 4, "H_kv": 2, "D": 16, "S": 37, "L_p": 5},
        {"B": 2, "T": 1, "H": 4, "H_kv": 2, "D": 16, "S": 37, "L_p": 0},
        {"B": 3, "T": 1, "H": 2, "H_kv": 1, "D": 32, "S": 70, "L_p": 3, "prompt_batch": 3},
        {"B": 1, "T": 3, "H": 4, "H_kv": 1, "D": 16, "S": 21, "L_p": 4},
    ],
    flops=flops,
    nbytes=nbytes,
    peers={"sdpa_two_pass": sdpa_two_pass},
    description="Inference only (--modes fwd). GB/s from the byte formula of the docstring.",
)


def smoke() -> List[str]:
    """Forward-only counterpart of runner.smoke (which also checks gradients and the bwd closures)."""
    device = torch.device("cpu")
    failures: List[str] = []
    backends = runner.smoke_backends(OP, device)
    notes = set()
    for shape in BENCH.smoke_shapes:
        base = make_inputs(shape, runner.SMOKE_DTYPE, device, runner.generator(device))
        want = runner.as_tuple(reference(*base))
        checked = []
        for b in backends:
            try:
                with mmkernels.use_backend(b):
                    got = runner.as_tuple(ours(*runner._clone(base)))
            except Exception as exc:
                failures.append(f"{OP} {shape} backend={b}: {type(exc).__name__}: {exc}")
                continue
            err = runner._compare(f"{OP} {shape} backend={b} output", got, want)
            if err:
                failures.append(err)
            checked.append(f"mmkernels[{b}]")
        for name in BENCH.peers:
            try:
                inputs = runner._clone(base)
                r = runner.resolve(BENCH, name, shape, inputs, device)
                with r.context():
                    got = runner.as_tuple(r.fn(*inputs))
            except Exception as exc:
                why = str(exc) if isinstance(exc, runner.Unavailable) else f"{type(exc).__name__}: {str(exc)[:160]}"
                if (name, why) not in notes:
                    notes.add((name, why))
                    print(f"smoke: provider {name} not checked: {why}")
                continue
            err = runner._compare(f"{OP} {shape} provider={name} output", got, want)
            if err:
                failures.append(err)
            checked.append(name)
        for provider in ("mmkernels", "eager"):  # the timed closures build and run once, untimed
            try:
                inputs = runner._clone(base)
                r = runner.resolve(BENCH, provider, shape, inputs, device)
                with r.context():
                    fn, _ = runner.build_mode(r.fn, inputs, "fwd")
                    fn()
            except Exception as exc:
                failures.append(f"{OP} {shape} {provider} fwd closure: {type(exc).__name__}: {exc}")
        print(f"smoke: {OP} {shape}: checked {', '.join(checked) or 'nothing'} against the reference")
    for shapes in BENCH.presets.values():
        for shape in shapes:
            for dt in runner.DTYPES.values():
                v = nbytes(shape, "fwd", dt)
                if not v > 0:
                    failures.append(f"{OP} {shape}: non-positive byte count {v}")
    return failures


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--modes" or a.startswith("--modes=") for a in argv):
        argv = ["--modes", "fwd", *argv]
    args = runner.parse_args(BENCH, argv)
    if any(m not in MODES for m in args.modes):
        print(f"error: {OP} is inference-only (no backward): --modes fwd, got {','.join(args.modes)}", file=sys.stderr)
        return 2
    if args.quick and args.shapes is None:
        argv = [*argv, "--shapes", "target"]  # the target pair: with and without the prompt
    if not runner.HAS_CUDA:
        return runner.report_smoke(smoke())
    return runner.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
