"""Benchmark mom_adapter (LaVIN's mixture-of-modality adapter, h = 8, G = 2): mmkernels vs eager vs torch.compile.

Target: 16384 tokens (batch 8 x 2048) x d = 4096 (LLaMA-7B), bf16, router weights per sample; the variant
"norm" fuses the preceding RMSNorm (norm_weight given). The adapter parameters are in the input dtype.

Byte formula (minimum traffic; e = bytes per element of --dtype, M tokens, d width; the parameters, u
(M x 8 fp32) and rstd are counted too but are < 1% at the target):
    fwd       read x; write y                                   2*M*d*e  + 32*M (+4*M with the norm)
    bwd       read dy, x; write dx                              3*M*d*e  + 32*M (+4*M)
    fwd+bwd   fwd + bwd                                         5*M*d*e  + 64*M (+8*M)
TFLOP/s is not reported (memory-bound op): tflops is null; pct_of_copy_bw compares with a device copy.

Providers: mmkernels (the fused Triton kernels), eager (reference/mom_adapter.py with autograd: the
matmuls with the expanded (d, h) up-projections), compile (the same under torch.compile).
Not measured here: the base q/k/v projections against merged ones (nn.MoMAdapter.merge_into adds one bias
add per projection; the GEMMs are unchanged).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
from mmkernels.ops.mom_adapter import mom_adapter
from mmkernels.reference import mom_adapter as ref

HIDDEN, GROUPS = 8, 2


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    b, t, d = shape["batch"], shape["T"], shape["d"]
    x = runner.randn((b, t, d), dtype, device, gen, requires_grad=True)
    params = [
        runner.randn((HIDDEN, d), dtype, device, gen, requires_grad=True, scale=d ** -0.5),
        runner.randn((HIDDEN,), dtype, device, gen, requires_grad=True, scale=0.1),
        runner.randn((d, HIDDEN // GROUPS), dtype, device, gen, requires_grad=True, scale=0.1),
        runner.randn((d,), dtype, device, gen, requires_grad=True, scale=0.1),
        runner.randn((d, HIDDEN // GROUPS), dtype, device, gen, requires_grad=True, scale=0.1),
        runner.randn((d,), dtype, device, gen, requires_grad=True, scale=0.1),
    ]
    logits = runner.randn((b, 2), torch.float32, device, gen)
    router_w = torch.softmax(logits, -1).to(dtype).requires_grad_(True)
    norm = None
    if shape.get("norm"):
        norm = (1 + runner.randn((d,), torch.float32, device, gen, scale=0.1)).to(dtype).requires_grad_(True)
    return (x, *params, router_w, norm)


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    e = torch.empty((), dtype=dtype).element_size()
    m, d = shape["batch"] * shape["T"], shape["d"]
    per_token = 32 + (4 if shape.get("norm") else 0)
    fwd = 2 * m * d * e + m * per_token
    bwd = 3 * m * d * e + m * per_token
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    return None  # memory-bound: no meaningful TFLOP/s


def ours(x, A, a, B, b, D, d_b, router_w, norm):
    return mom_adapter(x, A, a, B, b, D, d_b, router_w, 1.0, norm)


def reference(x, A, a, B, b, D, d_b, router_w, norm):
    return ref.mom_adapter(x, A, a, B, b, D, d_b, router_w, 1.0, norm)


TARGET = {"batch": 8, "T": 2048, "d": 4096}
BENCH = runner.Bench(
    op="mom_adapter",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={"default": [TARGET, {**TARGET, "norm": True}], "target": [TARGET]},
    smoke_shapes=[{"batch": 2, "T": 5, "d": 40}, {"batch": 1, "T": 3, "d": 72, "norm": True}],
    flops=flops,
    nbytes=nbytes,
    description="GB/s from the minimum bytes moved (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
