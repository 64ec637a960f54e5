"""Benchmark dynamic_expert (HyperLLaVA's per-sample bottleneck expert, y = residual + act(x W_d) W_u):
mmkernels vs the eager reference (torch.bmm) vs torch.compile of the reference.

Target: B=8 samples x T=2048 tokens (16k tokens), d=4096, h=16, swiglu (w_down (B, d, 32), w_up (B, 16, d)).

Byte formula (minimum traffic of one call; e = bytes per element of --dtype, W = B*d*(c + h) weight
elements with c = 2h for swiglu, h otherwise):
    fwd       read x, residual; write y; read the weights              (3*B*T*d + W) * e
    bwd       read x, dy; write dx; read the weights, write their grads (3*B*T*d + 2*W) * e
              (the residual's gradient is dy itself: no traffic)
    fwd+bwd   fwd + bwd
Our backward reads x and dy twice (the row kernel and the weight kernel), so it can reach at most about
3/5 of the copy bandwidth on the bwd row. TFLOP/s counts the algorithmic products without recomputation:
fwd 2*B*T*d*(c + h), bwd 2*B*T*d*(2c + 2h); the op is memory-bound (about 16 flop/byte in bf16).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
from mmkernels.ops.dynamic_expert import dynamic_expert
from mmkernels.reference import dynamic_expert as ref


def _cols(shape: Dict[str, Any]) -> int:
    return 2 * shape["bottleneck"] if shape["activation"] == "swiglu" else shape["bottleneck"]


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    b, t, d, h = shape["batch"], shape["tokens"], shape["hidden"], shape["bottleneck"]
    x = runner.randn((b, t, d), dtype, device, gen, requires_grad=True)
    w_down = runner.randn((b, d, _cols(shape)), dtype, device, gen, requires_grad=True, scale=1 / math.sqrt(d))
    w_up = runner.randn((b, h, d), dtype, device, gen, requires_grad=True, scale=1 / math.sqrt(h))
    residual = runner.randn((b, t, d), dtype, device, gen, requires_grad=True)
    return (x, w_down, w_up, residual, shape["activation"])


def _sizes(shape: Dict[str, Any]):
    tokens = shape["batch"] * shape["tokens"] * shape["hidden"]
    weights = shape["batch"] * shape["hidden"] * (_cols(shape) + shape["bottleneck"])
    return tokens, weights


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    e = torch.empty((), dtype=dtype).element_size()
    tokens, weights = _sizes(shape)
    fwd, bwd = 3 * tokens + weights, 3 * tokens + 2 * weights
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode] * e)


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    per = 2 * shape["batch"] * shape["tokens"] * shape["hidden"]
    c, h = _cols(shape), shape["bottleneck"]
    fwd, bwd = per * (c + h), per * (2 * c + 2 * h)
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def ours(x, w_down, w_up, residual, activation):
    return dynamic_expert(x, w_down, w_up, residual=residual, activation=activation)


def reference(x, w_down, w_up, residual, activation):
    return ref.dynamic_expert(x, w_down, w_up, residual, activation)


TARGET = {"batch": 8, "tokens": 2048, "hidden": 4096, "bottleneck": 16, "activation": "swiglu"}
BENCH = runner.Bench(
    op="dynamic_expert",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={
        "default": [TARGET],
        "target": [TARGET],
        "activations": [{**TARGET, "activation": a} for a in ref.ACTIVATIONS],
        "bottleneck": [{**TARGET, "bottleneck": h} for h in (8, 16, 32, 64)],
        "decode": [{**TARGET, "batch": 64, "tokens": 1}],
    },
    smoke_shapes=[
        {"batch": 2, "tokens": 7, "hidden": 40, "bottleneck": 16, "activation": "swiglu"},
        {"batch": 1, "tokens": 1, "hidden": 24, "bottleneck": 5, "activation": "gelu"},
    ],
    flops=flops,
    nbytes=nbytes,
    description="GB/s from the minimum bytes moved, TFLOP/s from the products (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
