"""Benchmark linear + cross-entropy (the LM-head loss): mmkernels (chunked, no full logits) vs eager vs
torch.compile vs Liger's fused linear cross-entropy.

Target: N = 8 x 2048 = 16384 tokens, d = 4096, V = 128256 (LLaMA-3) and V = 32000 (LLaMA-2), bf16, ~10% of
the targets ignored (-100), "mean" reduction, no bias. Presets: default = V 128256 and 32000 with a
trainable lm_head, then both with a frozen one (weight without grad: no dW, the PEFT case);
target = the first shape (what --quick runs).

Providers:
    mmkernels  ops.linear_cross_entropy(x, W, t) (default chunk size). It computes every gradient in the
               forward, so its "fwd" rows include the backward GEMMs and its "bwd" rows only the scaling.
    eager      reference.linear_cross_entropy_naive: F.cross_entropy on the full logits upcast to fp32
               (transformers' causal-LM loss).
    compile    the same under torch.compile (dynamic=False).
    liger      liger_kernel.transformers.functional.liger_fused_linear_cross_entropy(x2d, W, t), when
               liger_kernel imports (skipped with a note otherwise). Liger scales its stored gradients in
               place in backward when the incoming gradient is not 1; timing is unaffected.
The peak_mem_mb of each row is what matters most here: resident inputs plus the largest transient.

FLOP formula (matmul FLOPs of the math, N tokens; the same count for every provider):
    fwd      2*N*d*V                      (the logits)
    bwd      4*N*d*V, 2*N*d*V when W is frozen (dx, dW)
    fwd+bwd  the sum
gbps is null (compute-bound).
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Optional

import torch

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
from mmkernels.ops.linear_cross_entropy import linear_cross_entropy
from mmkernels.reference.linear_cross_entropy import linear_cross_entropy_naive

IGNORED_FRACTION = 0.1


def make_inputs(shape: Dict[str, Any], dtype, device, gen):
    b, t, d, v = shape["B"], shape["T"], shape["hidden"], shape["vocab"]
    x = runner.randn((b, t, d), dtype, device, gen, requires_grad=True)
    w = runner.randn((v, d), dtype, device, gen, requires_grad=shape["train_weight"], scale=d**-0.5)
    target = torch.randint(0, v, (b, t), device=device, generator=gen)
    drop = torch.rand((b, t), device=device, generator=gen) < IGNORED_FRACTION
    target = target.masked_fill(drop, -100)
    return (x, w, target)


def flops(shape: Dict[str, Any], mode: str) -> Optional[float]:
    gemm = 2.0 * shape["B"] * shape["T"] * shape["hidden"] * shape["vocab"]
    bwd = gemm * (2 if shape["train_weight"] else 1)
    return {"fwd": gemm, "bwd": bwd, "fwd+bwd": gemm + bwd}[mode]


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    return None  # compute-bound: no meaningful GB/s


def ours(x, w, target):
    return linear_cross_entropy(x, w, target)


def reference(x, w, target):
    return linear_cross_entropy_naive(x, w, target)


def liger(shape, inputs):
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as exc:
        raise runner.Unavailable(f"liger_kernel is not importable ({type(exc).__name__}: {exc})") from None

    def fn(x, w, target):
        out = liger_fused_linear_cross_entropy(x.reshape(-1, x.shape[-1]), w, target.reshape(-1))
        return out[0] if isinstance(out, tuple) else out  # some releases also return the z-loss

    return fn


def _shape(vocab, train_weight=True, b=8, t=2048, hidden=4096):
    return {"B": b, "T": t, "hidden": hidden, "vocab": vocab, "train_weight": train_weight}


TARGET = _shape(128256)
BENCH = runner.Bench(
    op="linear_cross_entropy",
    ours=ours,
    reference=reference,
    make_inputs=make_inputs,
    presets={"default": [TARGET, _shape(32000), _shape(128256, False), _shape(32000, False)], "target": [TARGET]},
    smoke_shapes=[_shape(257, b=2, t=7, hidden=24), _shape(1000, False, b=1, t=13, hidden=16)],
    flops=flops,
    nbytes=nbytes,
    peers={"liger": liger},
    description="TFLOP/s from the matmul FLOPs of the math, and peak memory (see the module docstring).",
)

if __name__ == "__main__":
    sys.exit(runner.main(BENCH))
