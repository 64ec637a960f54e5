"""Benchmark swiglu (silu(gate) * up of the LLaMA MLP): mmkernels vs eager vs torch.compile vs Liger.

Target: 16384 tokens x 11008 (LLaMA-7B intermediate size).

Byte formula (minimum traffic of one call; e = bytes per element of --dtype, M tokens, N features):
    fwd       read gate, up; write out                     3*M*N*e
    bwd       read dout, gate, up; write dgate, dup        5*M*N*e
    fwd+bwd   fwd + bwd                                    8*M*N*e
TFLOP/s is not reported (memory-bound op): tflops is null.

Liger's swiglu backward writes the input gradients into the saved inputs (gate, up) in place, so after
the first backward its inputs hold gradients; the kernels are elementwise with no data-dependent work,
so timing is unaffected, and every (provider, mode) case gets fresh inputs.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from mmkernels.reference import swiglu as ref


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    m, n = shape["tokens"], shape["hidden"]
    gate = runner.randn((m, n), dtype, device, gen, requires_grad=True, scale=2.0)
    up = runner.randn((m, n), dtype, device, gen, requires_grad=True)
    return (gate, up)


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    e = torch.empty((), dtype=dtype).element_size()
    per = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}[mode]
    return float(per * shape["tokens"] * shape["hidden"] * e)


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    return None  # memory-bound: no meaningful TFLOP/s


def ours(gate, up):
    return mmkernels.ops.swiglu(gate, up)


def reference(gate, up):
    return ref.swiglu(gate, up)


def liger(shape, inputs):
    try:
        from liger_kernel.transformers.functional import liger_swiglu
    except Exception as exc:
        raise runner.Unavailable(f"liger_kernel is not importable ({type(exc).__name__}: {exc})") from None
    return liger_swiglu


TARGET = {"tokens": 16384, "hidden": 11008}
BENCH = runner.Bench(
    op="swiglu",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={"default": [TARGET], "target": [TARGET]},
    smoke_shapes=[{"tokens": 7, "hidden": 50}, {"tokens": 3, "hidden": 256}],
    flops=flops,
    nbytes=nbytes,
    peers={"liger": liger},
    description="GB/s from the minimum bytes moved (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
