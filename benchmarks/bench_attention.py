"""Benchmark causal GQA attention: mmkernels vs eager vs torch.compile vs SDPA (FlashAttention backend).

Target: causal, B=4, H=32, H_kv=8, D=128, T=S=2048 (q (B, T, H, D), k/v (B, T, H_kv, D)).
Also T=512, T=4096 and D=64 (at T=2048).

FLOP formula (the FlashAttention convention; matmul FLOPs only, softmax not counted):
    full (non-causal) fwd   4*B*H*T*S*D        (Q K^T: 2*B*H*T*S*D; P V: 2*B*H*T*S*D)
    causal fwd              half of full: 2*B*H*T*T*D for T = S (the diagonal's extra T/2 is ignored)
    bwd                     2.5 x fwd          (5 matmuls: recompute Q K^T, dV, dP, dQ, dK vs 2 forward)
    fwd+bwd                 3.5 x fwd
GB/s is not reported (compute-bound op): gbps and pct_of_copy_bw are null.

Providers: "mmkernels" is mmkernels.ops.attention; "eager" and "compile" run the reference, which
materialises the (B, H, T, S) float32 score matrix (expect out-of-memory notes at long T); "sdpa" is
torch.nn.functional.scaled_dot_product_attention under sdpa_kernel(SDPBackend.FLASH_ATTENTION) on
(B, H, T, D) transposed views (no copies) with enable_gqa=True (torch >= 2.5). On an older torch without
enable_gqa, k and v are repeated to H heads inside the timed call (repeat_interleave, as GQA models did
before), which adds that copy to SDPA's time. The row's `backend` field says which: "flash" or
"flash+repeat_kv".
SDPA's is_causal mask is top-left aligned, ours bottom-right; they agree only for T = S, so the sdpa
provider requires T = S.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from mmkernels.reference import attention as ref


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    b, t, h, h_kv, d = shape["B"], shape["T"], shape["H"], shape["H_kv"], shape["D"]
    s = shape.get("S", t)
    q = runner.randn((b, t, h, d), dtype, device, gen, requires_grad=True)
    k = runner.randn((b, s, h_kv, d), dtype, device, gen, requires_grad=True)
    v = runner.randn((b, s, h_kv, d), dtype, device, gen, requires_grad=True)
    return (q, k, v, bool(shape.get("causal", True)))


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    b, t, h, d = shape["B"], shape["T"], shape["H"], shape["D"]
    s = shape.get("S", t)
    fwd = 4.0 * b * h * t * s * d
    if shape.get("causal", True):
        fwd /= 2
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    return None  # compute-bound: no meaningful GB/s


def ours(q, k, v, causal):
    return mmkernels.ops.attention(q, k, v, causal=causal)


def reference(q, k, v, causal):
    return ref.attention(q, k, v, causal)


def sdpa_has_enable_gqa() -> bool:
    """torch >= 2.5 has the enable_gqa argument (the builtin has no inspectable signature)."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 5)


def sdpa(shape, inputs):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    if shape.get("S", shape["T"]) != shape["T"]:
        raise runner.Unavailable("SDPA's causal mask is top-left aligned: only T = S is comparable")

    if sdpa_has_enable_gqa():
        kind = "flash"

        def fn(q, k, v, causal):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
            )
            return out.transpose(1, 2)

    else:
        kind = "flash+repeat_kv"
        rep = shape["H"] // shape["H_kv"]

        def fn(q, k, v, causal):
            k_, v_ = (t.transpose(1, 2).repeat_interleave(rep, dim=1) for t in (k, v))
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k_, v_, is_causal=causal)
            return out.transpose(1, 2)

    return runner.Resolved(fn, kind, lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION))


def _shape(t=2048, d=128):
    return {"B": 4, "T": t, "H": 32, "H_kv": 8, "D": d, "causal": True}


TARGET = _shape()
BENCH = runner.Bench(
    op="attention",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={
        "default": [TARGET, _shape(t=512), _shape(t=4096), _shape(d=64)],
        "target": [TARGET],
        "seqlen": [_shape(t=512), TARGET, _shape(t=4096)],
    },
    smoke_shapes=[
        {"B": 2, "T": 19, "H": 4, "H_kv": 2, "D": 16, "causal": True},
        {"B": 1, "T": 33, "H": 2, "H_kv": 1, "D": 32, "causal": True},
    ],
    flops=flops,
    nbytes=nbytes,
    peers={"sdpa": sdpa},
    description="TFLOP/s from the FlashAttention FLOP convention (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
