"""Benchmark rope (rotary embedding of q and k): mmkernels vs eager vs torch.compile vs Liger.

Target: B=4, T=2048, H=32, H_kv=8, D=128 (q (B, T, H, D), k (B, T, H_kv, D)). cos/sin are
precomputed once, as a model caches them: rope_cos_sin(arange(T), rope_inv_freq(D, 10000)), float32
(1, T, D/2); they are inputs, not part of the timed work.

Byte formula (minimum traffic of one call; e = bytes per element of --dtype; cos and sin are float32
of shape (1, T, D/2), so together 1*T*D*4 bytes):
    fwd       read q, k; write q', k'; read cos, sin     2*B*T*(H + H_kv)*D*e + T*D*4
    bwd       read dq', dk'; write dq, dk; read cos, sin  2*B*T*(H + H_kv)*D*e + T*D*4
    fwd+bwd   fwd + bwd
TFLOP/s is not reported (memory-bound op): tflops is null.

Liger's rope takes (B, H, T, D) views and a full-width (1, T, D) cos/sin in the model dtype (as HF
passes them); they are built once per case outside the timed region. Liger rotates q and k in place,
so repeated timed calls keep rotating the same buffers (norm-preserving; timing is unaffected).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from mmkernels.reference import rope as ref

THETA = 10000.0


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    b, t, h, h_kv, d = shape["B"], shape["T"], shape["H"], shape["H_kv"], shape["D"]
    q = runner.randn((b, t, h, d), dtype, device, gen, requires_grad=True)
    k = runner.randn((b, t, h_kv, d), dtype, device, gen, requires_grad=True)
    positions = torch.arange(t, device=device)
    cos, sin = mmkernels.ops.rope_cos_sin(positions, mmkernels.ops.rope_inv_freq(d, THETA))
    return (q, k, cos.contiguous(), sin.contiguous())


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    b, t, h, h_kv, d = shape["B"], shape["T"], shape["H"], shape["H_kv"], shape["D"]
    e = torch.empty((), dtype=dtype).element_size()
    one = 2 * b * t * (h + h_kv) * d * e + t * d * 4
    return float({"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode])


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    return None  # memory-bound: no meaningful TFLOP/s


def ours(q, k, cos, sin):
    return mmkernels.ops.rope(q, k, cos, sin)


def reference(q, k, cos, sin):
    return ref.rope(q, k, cos, sin)


def liger(shape, inputs):
    try:
        from liger_kernel.transformers.functional import liger_rope
    except Exception as exc:
        raise runner.Unavailable(f"liger_kernel is not importable ({type(exc).__name__}: {exc})") from None
    q, _, cos, sin = inputs
    cos_full = torch.cat((cos, cos), dim=-1).to(q.dtype)
    sin_full = torch.cat((sin, sin), dim=-1).to(q.dtype)

    def fn(q, k, cos, sin):
        q_out, k_out = liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos_full, sin_full)
        return q_out.transpose(1, 2), k_out.transpose(1, 2)

    return fn


TARGET = {"B": 4, "T": 2048, "H": 32, "H_kv": 8, "D": 128}
BENCH = runner.Bench(
    op="rope",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={"default": [TARGET], "target": [TARGET]},
    smoke_shapes=[{"B": 2, "T": 5, "H": 4, "H_kv": 2, "D": 16}, {"B": 1, "T": 3, "H": 3, "H_kv": 1, "D": 24}],
    flops=flops,
    nbytes=nbytes,
    peers={"liger": liger},
    description="GB/s from the minimum bytes moved (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
