"""Benchmark scale_bias (LLaMA-Adapter V2's output-form epilogue of a frozen linear, out = (y + b) * s):
mmkernels vs eager vs torch.compile vs the unfused autograd chain that nn.ScaleBiasLinear ran before.

Target: 16384 tokens x 4096 (the output of a LLaMA-7B attention projection), bf16 y, float32 scale and bias.

Byte formula (minimum traffic of one call; e = bytes per element of --dtype, M tokens, N features; the float32
vectors and the backward's per-chunk partial sums are under 0.1% at the target and left out):
    fwd       read y; write out                          2*M*N*e
    bwd       read dout, y; write dy                     3*M*N*e
    fwd+bwd   fwd + bwd                                  5*M*N*e
TFLOP/s is not reported (memory-bound op): tflops is null.

Peer "unfused": ((y.float() + b) * s).to(y.dtype) left to autograd: a float32 upcast, an add, a multiply and a
downcast, each a pass through memory, and the float32 (y + b) saved for the scale's gradient.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from mmkernels.reference import scale_bias as ref


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    m, n = shape["tokens"], shape["hidden"]
    y = runner.randn((m, n), dtype, device, gen, requires_grad=True, scale=2.0)
    scale = (1.0 + runner.randn((n,), torch.float32, device, gen, scale=0.1)).requires_grad_()
    bias = runner.randn((n,), torch.float32, device, gen, requires_grad=True, scale=0.1)
    return (y, scale, bias)


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    e = torch.empty((), dtype=dtype).element_size()
    per = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode]
    return float(per * shape["tokens"] * shape["hidden"] * e)


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    return None  # memory-bound: no meaningful TFLOP/s


def ours(y, scale, bias):
    return mmkernels.ops.scale_bias(y, scale, bias)


def reference(y, scale, bias):
    return ref.scale_bias(y, scale, bias, y.dtype)


def unfused(shape, inputs):
    return lambda y, scale, bias: ((y.float() + bias) * scale).to(y.dtype)


TARGET = {"tokens": 16384, "hidden": 4096}
BENCH = runner.Bench(
    op="scale_bias",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={"default": [TARGET, {"tokens": 16384, "hidden": 11008}], "target": [TARGET]},
    smoke_shapes=[{"tokens": 7, "hidden": 50}, {"tokens": 40, "hidden": 256}],
    flops=flops,
    nbytes=nbytes,
    peers={"unfused": unfused},
    description="GB/s from the minimum bytes moved (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
