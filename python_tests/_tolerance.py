"""The FlashAttention tolerance rule used by every kernel test.

A kernel computing in low precision is compared with a high-precision (float64) reference; its error must
be at most `k` times the error that the reference itself makes when run in the same low precision, plus a
small floor. A blanket atol could hide a wrong kernel; this rule scales with what the dtype can deliver.
"""

from __future__ import annotations

import torch

# Floors per dtype, relative to the largest magnitude of the high-precision result.
FLOORS = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3, torch.float64: 1e-12}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(
    actual: torch.Tensor,
    low_ref: torch.Tensor,
    high_ref: torch.Tensor,
    name: str,
    k: float = 3.0,
    floor: float | None = None,
) -> None:
    """err(actual, high_ref) <= k * err(low_ref, high_ref) + floor * max|high_ref|."""
    assert actual.shape == high_ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(high_ref.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values in the kernel output"
    if floor is None:
        floor = FLOORS[actual.dtype]
    scale = max(high_ref.double().abs().max().item(), 1.0) if high_ref.numel() else 1.0
    err = max_abs_err(actual, high_ref)
    ref_err = max_abs_err(low_ref, high_ref)
    bound = k * ref_err + floor * scale
    assert err <= bound, (
        f"{name}: kernel error {err:.3e} exceeds {k} x reference error {ref_err:.3e} + floor {floor * scale:.3e}"
    )
