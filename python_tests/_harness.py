"""Kernel-vs-reference check shared by the op tests.

`check_against_reference` runs one public op three ways on the same values:
  - the backend under test, in the test dtype;
  - the reference backend in the test dtype (what the dtype can deliver);
  - the reference backend in float64 (the truth);
then backpropagates the same random output gradients through all three and applies the tolerance rule
of _tolerance.py to every output and every input gradient.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch

import mmkernels
from _tolerance import FLOORS, assert_close_to_reference


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _run(fn, inputs, backend_name, grad_seed):
    with mmkernels.use_backend(backend_name):
        outs = _as_tuple(fn(*inputs))
    gen = torch.Generator().manual_seed(grad_seed)
    grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs]
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if leaves:
        torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [t.grad for t in leaves]


def _copy(inputs: Sequence, dtype):
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out.append(t.detach().to(dtype).requires_grad_(True))
        else:
            out.append(t)
    return out


def check_against_reference(
    fn: Callable,
    inputs: Sequence,
    *,
    backend: str,
    dtype: torch.dtype,
    name: str,
    k: float = 3.0,
    grad_seed: int = 1234,
    reduced: Optional[Dict[int, int]] = None,
) -> None:
    """`inputs`: tensors (those with requires_grad=True are differentiated, and cast to `dtype`/float64)
    and other arguments passed through unchanged.

    reduced: {gradient index: number of terms summed into each of its elements}, for gradients that are
    long sums (a scalar gate's gradient sums over every output element). Rounding in such a sum grows
    like the square root of its length, so their floor is the dtype's floor times sqrt(terms).
    """
    reduced = reduced or {}
    test_in = _copy(inputs, dtype)
    low_in = _copy(inputs, dtype)
    high_in = _copy(inputs, torch.float64)
    outs, grads = _run(fn, test_in, backend, grad_seed)
    low_outs, low_grads = _run(fn, low_in, "reference", grad_seed)
    high_outs, high_grads = _run(fn, high_in, "reference", grad_seed)
    for i, (a, lo, hi) in enumerate(zip(outs, low_outs, high_outs)):
        assert a.dtype == lo.dtype, f"{name} output {i}: dtype {a.dtype} != reference {lo.dtype}"
        assert_close_to_reference(a, lo, hi, f"{name} output {i}", k=k)
    for i, (a, lo, hi) in enumerate(zip(grads, low_grads, high_grads)):
        assert a is not None, f"{name}: gradient {i} missing"
        floor = FLOORS[a.dtype] * math.sqrt(reduced[i]) if i in reduced else None
        assert_close_to_reference(a, lo, hi, f"{name} grad {i}", k=k, floor=floor)
