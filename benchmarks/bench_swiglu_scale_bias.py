"""Benchmark swiglu_scale_bias (the LLaMA MLP's gating with LLaMA-Adapter V2's bias/scale of gate_proj and
up_proj fused in): mmkernels vs eager vs torch.compile vs the unfused path (each epilogue, then swiglu).

    out = silu(s_g (g + b_g)) * s_u (u + b_u)      g, u: the frozen GEMMs' outputs; s, b: float32 (N,)

Target: 16384 tokens x 11008 (LLaMA-7B intermediate size), bf16 activations, float32 scales and biases.

Byte formula (minimum traffic of one call; e = bytes per element of --dtype, M tokens, N features; the four
float32 vectors and the backward's per-chunk partial sums are under 0.1% at the target and left out):
    fwd       read g, u; write out                      3*M*N*e
    bwd       read dout, g, u; write dg, du             5*M*N*e
    fwd+bwd   fwd + bwd                                 8*M*N*e
TFLOP/s is not reported (memory-bound op): tflops is null.

Peer "unfused": what V2's MLP ran before the fusion, the epilogue of each ScaleBiasLinear as PyTorch ops
(in float32, rounded to the activations' dtype, as nn.ScaleBiasLinear computes it) and then mmkernels'
swiglu: it moves the scaled gate and up through memory (write, then read back) and saves them for the
backward beside g and u.
"""

from __future__ import annotations

import sys
from typing import Any, Dict

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from bench_swiglu import flops, nbytes  # the same minimum traffic: g, u in, out out (and back)
from mmkernels.reference import swiglu as ref


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    m, n = shape["tokens"], shape["hidden"]
    g = runner.randn((m, n), dtype, device, gen, requires_grad=True, scale=2.0)
    u = runner.randn((m, n), dtype, device, gen, requires_grad=True)
    scales = [(1.0 + runner.randn((n,), torch.float32, device, gen, scale=0.1)).requires_grad_() for _ in range(2)]
    biases = [runner.randn((n,), torch.float32, device, gen, requires_grad=True, scale=0.1) for _ in range(2)]
    return (g, u, scales[0], biases[0], scales[1], biases[1])


def ours(g, u, s_g, b_g, s_u, b_u):
    return mmkernels.ops.swiglu_scale_bias(g, u, s_g, b_g, s_u, b_u)


def reference(g, u, s_g, b_g, s_u, b_u):
    return ref.swiglu_scale_bias(g, u, s_g, b_g, s_u, b_u)


def _epilogue(y, scale, bias):
    return ((y.float() + bias) * scale).to(y.dtype)


def unfused(shape, inputs):
    def run(g, u, s_g, b_g, s_u, b_u):
        return mmkernels.ops.swiglu(_epilogue(g, s_g, b_g), _epilogue(u, s_u, b_u))

    return run


TARGET = {"tokens": 16384, "hidden": 11008}
BENCH = runner.Bench(
    op="swiglu_scale_bias",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={"default": [TARGET], "target": [TARGET]},
    smoke_shapes=[{"tokens": 7, "hidden": 50}, {"tokens": 40, "hidden": 256}],
    flops=flops,
    nbytes=nbytes,
    peers={"unfused": unfused},
    description="GB/s from the minimum bytes moved (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
