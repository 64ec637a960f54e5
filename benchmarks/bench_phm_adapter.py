"""Benchmark the Compacter adapter y = x + PHM_up(gelu(PHM_down(x))): mmkernels (one fused kernel) vs the
factorised reference in eager and under torch.compile vs the `adapters`-library-style formulation.

Target: LLaMA-7B width, 16384 tokens x d=4096, n=4, reduction 32 (k=128), rank 1, bf16.

Providers:
  mmkernels         ops.phm_adapter (fused forward; fused backward with GELU recomputed, two-stage reductions)
  eager / compile   reference/phm.py: the factorised math (einsums, W never built), autograd backward
  kron_materialize  peer-equivalent: the `adapters` library's PHMLayer formulation, written here (the library
                    itself pins an older transformers and is not a dependency): W = sum_i kron(A_i, s_i t_i)
                    built on every call, then x @ W + b, GELU, and the same for the up layer, + x

Byte formula (minimum traffic of one call; e = bytes per element, M tokens; the parameters are a few KB):
    fwd       read x; write y                      2*M*d*e
    bwd       read x, dy; write dx                 3*M*d*e
    fwd+bwd   fwd + bwd                            5*M*d*e
GB/s is reported against the device copy bandwidth (pct_of_copy_bw); TFLOP/s is null (memory-bound op).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch
from torch.nn import functional as F

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
from mmkernels.ops.phm import phm_adapter
from mmkernels.reference import phm as ref


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    m, d, n, r = shape["tokens"], shape["d"], shape["n"], shape["rank"]
    k = d // shape["reduction"]

    def param(*size, fan):
        return runner.randn(size, dtype, device, gen, requires_grad=True, scale=fan ** -0.5)

    x = runner.randn((m, d), dtype, device, gen, requires_grad=True)
    # Scales keep every stage O(1): z = X_p s_i sums d/n terms, y_q sums n*r terms of t.
    return (x,
            param(n, n, n, fan=n), param(n, d // n, r, fan=d // n), param(n, r, k // n, fan=n * r),
            runner.randn((k,), dtype, device, gen, requires_grad=True, scale=0.1),
            param(n, n, n, fan=n), param(n, k // n, r, fan=k // n), param(n, r, d // n, fan=n * r),
            runner.randn((d,), dtype, device, gen, requires_grad=True, scale=0.1))


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    e = torch.empty((), dtype=dtype).element_size()
    per = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode]
    return float(per * shape["tokens"] * shape["d"] * e)


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    return None  # memory-bound: no meaningful TFLOP/s


def ours(*args):
    return phm_adapter(*args)


def reference(*args):
    return ref.phm_adapter(*args)


def _kron_layer(x, rule, s, t, bias):
    w = torch.bmm(s, t)  # (n, in/n, out/n)
    n, p, q = w.shape
    h = (rule[:, :, None, :, None] * w[:, None, :, None, :]).sum(0).reshape(n * p, n * q)  # sum_i kron(A_i, W_i)
    return x @ h + bias


def kron_materialize_adapter(x, rd, sd, td, bd, ru, su, tu, bu):
    """The adapters library's PHMLayer formulation: the Kronecker product materialised on every call."""
    return x + _kron_layer(F.gelu(_kron_layer(x, rd, sd, td, bd)), ru, su, tu, bu)


def kron_materialize(shape, inputs):
    return kron_materialize_adapter


TARGET = {"tokens": 16384, "d": 4096, "reduction": 32, "n": 4, "rank": 1}
BENCH = runner.Bench(
    op="phm_adapter",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={"default": [TARGET, dict(TARGET, rank=2), dict(TARGET, tokens=4096)], "target": [TARGET]},
    smoke_shapes=[{"tokens": 7, "d": 36, "reduction": 3, "n": 4, "rank": 1},
                  {"tokens": 5, "d": 64, "reduction": 4, "n": 4, "rank": 2}],
    flops=flops,
    nbytes=nbytes,
    peers={"kron_materialize": kron_materialize},
    description="GB/s from the minimum bytes moved (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
