"""Benchmark rms_norm (and the fused residual-add variant): mmkernels vs eager vs torch.compile vs Liger.

Target: 16384 rows x hidden 4096, fwd+bwd with the weight gradient. Also hidden 8192, and the residual
variant (h = x + residual; returns (y, h); the gradient of h arrives from the residual stream too).

Byte formula (the traffic of one call; e = bytes per element of --dtype, M rows, N hidden; the weight
has the input dtype; rstd is the float32 per-row 1/rms saved by the forward for the backward):
    fwd               read x, w; write y, rstd                    2*M*N*e + N*e + 4*M
    fwd  (residual)   read x, residual, w; write y, h, rstd       4*M*N*e + N*e + 4*M
    bwd               read dy, x, w, rstd; write dx, dw           3*M*N*e + 2*N*e + 4*M
    bwd  (residual)   read dy, dh, h, w, rstd; write dh_in, dw    4*M*N*e + 2*N*e + 4*M
                      (dh is the gradient reaching h from the residual stream; dx and dresidual are the
                      same tensor dh_in, written once)
    fwd+bwd           fwd + bwd
dw counts once (N*e). The partial weight-gradient buffer a kernel writes and re-reads to reduce dw
(programs x N float32, about 2 MB at hidden 4096, under 1% of the total) depends on the implementation
and is not counted, so every provider is measured against the same byte count.
TFLOP/s is not reported (memory-bound op): tflops is null.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from mmkernels.reference import rms_norm as ref

EPS = 1e-6


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    m, n = shape["rows"], shape["hidden"]
    x = runner.randn((m, n), dtype, device, gen, requires_grad=True)
    w = (1.0 + 0.1 * torch.randn(n, device=device, generator=gen)).to(dtype).requires_grad_(True)
    if shape.get("residual"):
        r = runner.randn((m, n), dtype, device, gen, requires_grad=True)
        return (x, w, EPS, r)
    return (x, w, EPS)


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    m, n = shape["rows"], shape["hidden"]
    e = torch.empty((), dtype=dtype).element_size()
    res = bool(shape.get("residual"))
    rstd = 4 * m
    fwd = (4 if res else 2) * m * n * e + n * e + rstd
    bwd = (4 if res else 3) * m * n * e + 2 * n * e + rstd
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    return None  # memory-bound: no meaningful TFLOP/s


def ours(x, w, eps, residual=None):
    return mmkernels.ops.rms_norm(x, w, eps, residual=residual)


def reference(x, w, eps, residual=None):
    return ref.rms_norm(x, w, eps, residual)


def liger(shape, inputs):
    try:
        from liger_kernel.transformers.functional import liger_rms_norm
    except Exception as exc:
        raise runner.Unavailable(f"liger_kernel is not importable ({type(exc).__name__}: {exc})") from None

    # in_place=False: Liger's in-place backward would overwrite the fixed output gradient of the bwd mode.
    def fn(x, w, eps, residual=None):
        if residual is None:
            return liger_rms_norm(x, w, eps, in_place=False)
        h = x + residual  # Liger has no fused residual add here: a separate add, then its rms_norm
        return liger_rms_norm(h, w, eps, in_place=False), h

    return fn


TARGET = {"rows": 16384, "hidden": 4096, "residual": False}
BENCH = runner.Bench(
    op="rms_norm",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={
        "default": [TARGET, {"rows": 16384, "hidden": 8192, "residual": False},
                    {"rows": 16384, "hidden": 4096, "residual": True}],
        "target": [TARGET],
        "residual": [{"rows": 16384, "hidden": 4096, "residual": True}],
    },
    smoke_shapes=[
        {"rows": 5, "hidden": 40, "residual": False},
        {"rows": 3, "hidden": 96, "residual": True},
    ],
    flops=flops,
    nbytes=nbytes,
    peers={"liger": liger},
    description="GB/s from the bytes one call moves (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
