"""Triton kernels around the two cuBLAS GEMMs of PaCA (the GEMMs themselves stay on torch.matmul).

- gather_columns: x_I = x[:, I] (M, r), reading only the r selected columns of each row;
- delta_grad:     d_delta = s * dy^T x_I (d_out, r), fp32 accumulation over the token dimension. Tokens are
                  many and r is small, so the token loop is split over several programs per output tile
                  (split-K); each split writes its own fp32 partial and the partials are summed afterwards:
                  deterministic, no atomics;
- sync_columns:   W[:, I] = orig + s * delta, in one pass, computed in fp32 and stored in W's dtype.
Column indices are int32. Row offsets are int64 (M * d_in can exceed 2**31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


@triton.jit
def _gather_columns_kernel(X, IDX, OUT, M, R, stride_xm, stride_xk, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < M
    col_mask = cols < R
    src = tl.load(IDX + cols, mask=col_mask, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    mask = row_mask[:, None] & col_mask[None, :]
    vals = tl.load(X + rows64[:, None] * stride_xm + src[None, :] * stride_xk, mask=mask)
    tl.store(OUT + rows64[:, None] * R + cols[None, :], vals, mask=mask)


def gather_columns(x2d: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x2d (M, d_in), any strides; idx (r,) int32 -> x_I (M, r) contiguous, x's dtype."""
    assert x2d.dim() == 2 and idx.dim() == 1 and idx.dtype == torch.int32
    m, r = x2d.shape[0], idx.shape[0]
    out = torch.empty(m, r, dtype=x2d.dtype, device=x2d.device)
    if m == 0 or r == 0:
        return out
    block_r = _pow2_block(r, 1, 64)
    block_m = max(16, 2048 // block_r)
    grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r))
    _gather_columns_kernel[grid](x2d, idx, out, m, r, x2d.stride(0), x2d.stride(1),
                                 BLOCK_M=block_m, BLOCK_R=block_r, num_warps=4)
    return out


@triton.jit
def _delta_grad_kernel(
    DY, XI, OUT, M, N, R,
    stride_dym, stride_dyn, stride_xm, stride_xr,
    tokens_per_split, scaling,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    n_mask = offs_n < N
    r_mask = offs_r < R
    k_start = split * tokens_per_split
    k_end = tl.minimum(k_start + tokens_per_split, M)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        offs_k64 = offs_k.to(tl.int64)
        # dy^T tile (BLOCK_N, BLOCK_K): read dy (M, N) transposed through the strides
        a = tl.load(DY + offs_k64[None, :] * stride_dym + offs_n[:, None] * stride_dyn,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(XI + offs_k64[:, None] * stride_xm + offs_r[None, :] * stride_xr,
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if IEEE:  # fp32 inputs: full fp32 products, not TF32 (torch.matmul's fp32 default)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    out = OUT + split.to(tl.int64) * N * R + offs_n[:, None] * R + offs_r[None, :]
    tl.store(out, acc * scaling, mask=n_mask[:, None] & r_mask[None, :])


def _num_splits(tiles: int, k_blocks: int, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice; one split on CPU (the interpreter runs programs serially)."""
    if not _device.compiled(device):
        return 1
    sms = _device.sm_count(device)
    return max(1, min(k_blocks, triton.cdiv(2 * sms, tiles)))


def delta_grad(dy2d: torch.Tensor, x_i: torch.Tensor, scaling: float) -> torch.Tensor:
    """s * dy^T x_I: dy2d (M, d_out), x_i (M, r), same dtype, any strides -> (d_out, r) float32."""
    assert dy2d.dim() == 2 and x_i.dim() == 2 and dy2d.shape[0] == x_i.shape[0]
    assert dy2d.dtype == x_i.dtype, (dy2d.dtype, x_i.dtype)
    m, n = dy2d.shape
    r = x_i.shape[1]
    if m == 0 or n == 0 or r == 0:
        return torch.zeros(n, r, dtype=torch.float32, device=dy2d.device)
    block_n, block_k = 64, 64
    block_r = _pow2_block(r, 16, 64)  # tl.dot needs every block dim >= 16
    tiles = triton.cdiv(n, block_n) * triton.cdiv(r, block_r)
    k_blocks = triton.cdiv(m, block_k)
    splits = _num_splits(tiles, k_blocks, dy2d.device)
    tokens_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(m, tokens_per_split)
    out = torch.empty(splits, n, r, dtype=torch.float32, device=dy2d.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(r, block_r), splits)
    _delta_grad_kernel[grid](
        dy2d, x_i, out, m, n, r,
        dy2d.stride(0), dy2d.stride(1), x_i.stride(0), x_i.stride(1),
        tokens_per_split, float(scaling),
        BLOCK_N=block_n, BLOCK_R=block_r, BLOCK_K=block_k, IEEE=dy2d.dtype == torch.float32, num_warps=4,
    )
    return out[0] if splits == 1 else out.sum(0)


@triton.jit
def _sync_columns_kernel(
    W, ORIG, DELTA, IDX, N, R,
    stride_wn, stride_wk, stride_on, stride_or, stride_dn, stride_dr, scaling,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask = (rows < N)[:, None] & (cols < R)[None, :]
    dst = tl.load(IDX + cols, mask=cols < R, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    orig = tl.load(ORIG + rows64[:, None] * stride_on + cols[None, :] * stride_or, mask=mask, other=0.0)
    delta = tl.load(DELTA + rows64[:, None] * stride_dn + cols[None, :] * stride_dr, mask=mask, other=0.0)
    val = orig.to(tl.float32) + scaling * delta.to(tl.float32)
    tl.store(W + rows64[:, None] * stride_wn + dst[None, :] * stride_wk, val.to(W.dtype.element_ty), mask=mask)


def sync_columns(weight: torch.Tensor, orig_cols: torch.Tensor, delta: torch.Tensor, idx: torch.Tensor,
                 scaling: float) -> None:
    """In place: weight[:, idx] = orig_cols + scaling * delta (fp32 math, stored in weight's dtype).

    weight (d_out, d_in), orig_cols and delta (d_out, r), any strides; idx (r,) int32, distinct values."""
    assert weight.dim() == 2 and idx.dim() == 1 and idx.dtype == torch.int32
    n, r = orig_cols.shape
    assert weight.shape[0] == n and delta.shape == (n, r) and idx.shape[0] == r
    if n == 0 or r == 0:
        return
    block_r = _pow2_block(r, 1, 32)
    block_n = max(16, 2048 // block_r)
    grid = (triton.cdiv(n, block_n), triton.cdiv(r, block_r))
    _sync_columns_kernel[grid](
        weight, orig_cols, delta, idx, n, r,
        weight.stride(0), weight.stride(1), orig_cols.stride(0), orig_cols.stride(1),
        delta.stride(0), delta.stride(1), float(scaling),
        BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4,
    )
