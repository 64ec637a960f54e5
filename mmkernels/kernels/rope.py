"""Triton rotary embedding: one program per (token, block of heads); cos/sin are read once per token.

The same kernel serves the backward: the gradient of a rotation is the rotation by minus the angle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    X, COS, SIN, OUT,
    T, H, HALF,
    stride_xb, stride_xt, stride_xh,
    stride_ob, stride_ot, stride_oh,
    stride_cb, stride_ct,
    INVERSE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    b = token // T
    t = token % T
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    c = tl.load(COS + b * stride_cb + t * stride_ct + cols, mask=col_mask, other=0.0).to(tl.float32)
    s = tl.load(SIN + b * stride_cb + t * stride_ct + cols, mask=col_mask, other=0.0).to(tl.float32)
    if INVERSE:
        s = -s
    mask = (heads[:, None] < H) & col_mask[None, :]
    src = X + b * stride_xb + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    dst = OUT + b * stride_ob + t * stride_ot + heads[:, None] * stride_oh + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """x: (B, T, heads, D) with unit stride along D; cos, sin: (1 or B, T, D/2) with unit last stride."""
    bsz, seq, heads, dim = x.shape
    half = dim // 2
    out = torch.empty((bsz, seq, heads, dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(heads), max(1, 4096 // block_half))
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)
    grid = (bsz * seq, triton.cdiv(heads, block_h))
    _rope_kernel[grid](
        x, cos, sin, out,
        seq, heads, half,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_cb, cos.stride(1),
        INVERSE=inverse, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=4 if block_h * block_half >= 1024 else 1,
    )
    return out
