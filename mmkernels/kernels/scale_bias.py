"""Triton kernels of per-channel epilogues: V2's out = (y + b) * s of a frozen linear, and the helpers that
swiglu_scale_bias shares (the (y + b, s) tile and the row chunks of the two-stage channel reductions).

Forward: one pass over (rows x channels) tiles, the channel vectors loaded once per tile, float32 inside.
Backward: dy = dout * s, and the channel gradients ds = sum(dout * (y + b)), db = sum(dout * s) over the rows:
each program walks a chunk of rows for a block of channels and writes float32 partial sums; torch adds the
chunks (deterministic, no atomics).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device


@triton.jit
def affine_tile(X, VS, VB, rows, cols, M, N):
    """(x + b) and s of a (rows, cols) tile of X (M, N), in float32, with the tile's offsets and mask."""
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(VS + cols, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(VB + cols, mask=cmask, other=0.0).to(tl.float32)
    return x + bias[None, :], scale[None, :], offs, mask


def tiles(device: torch.device, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the elementwise epilogue kernels here and in kernels/swiglu.py: 2-D
    tiles of rows x channels; small tiles in the interpreter. On sm_90 (tools/compile_check.py) swiglu's
    forward at 32 x 128 takes 80 registers per thread; its backward holds twice the live values and its row
    loop is software-pipelined: 248 registers at 32 x 128, 128 at 8 x 128, 80 at 8 x 64 (the tile here, so
    several programs per SM keep loads in flight). Not yet timed."""
    if not _device.compiled(device):
        return 16, 32, 4
    return (8, 64, 4) if backward else (32, 128, 4)


def row_chunks(m: int, n: int, block_m: int, block_n: int, device: torch.device) -> Tuple[int, int, int]:
    """(chunks, rows per program, channel blocks) of a backward with channel reductions: enough row chunks to
    give every SM several programs, each walking a multiple of BLOCK_M rows."""
    col_blocks = max(triton.cdiv(n, block_n), 1)
    want = max(1, 4 * _device.sm_count(device) // col_blocks) if _device.compiled(device) else 2
    rows_per_program = triton.cdiv(max(triton.cdiv(m, want), 1), block_m) * block_m
    return max(1, triton.cdiv(m, rows_per_program)), rows_per_program, col_blocks


@triton.jit
def _scale_bias_fwd_kernel(Y, S, B, OUT, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pre, scale, offs, mask = affine_tile(Y, S, B, rows, cols, M, N)
    tl.store(OUT + offs, (pre * scale).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _scale_bias_bwd_kernel(DOUT, Y, S, B, DY, P, M, N, ROWS_PER_PROGRAM, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    """P (2, chunks, N) float32: partial sums over this program's rows of d scale, d bias."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = chunk * ROWS_PER_PROGRAM
    for r0 in range(first, first + ROWS_PER_PROGRAM, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        pre, scale, offs, mask = affine_tile(Y, S, B, rows, cols, M, N)
        d = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        d_pre = d * scale
        tl.store(DY + offs, d_pre.to(DY.dtype.element_ty), mask=mask)
        acc_s += tl.sum(d * pre, axis=0)  # d is zero outside the mask
        acc_b += tl.sum(d_pre, axis=0)
    cmask = cols < N
    base = P + chunk.to(tl.int64) * N + cols
    tl.store(base, acc_s, mask=cmask)
    tl.store(base + tl.num_programs(0) * N, acc_b, mask=cmask)


def scale_bias_fwd(y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """y (M, N) contiguous; scale, bias (N,) contiguous (any float dtype)."""
    m, n = y.shape
    out = torch.empty((m, n), dtype=out_dtype, device=y.device)
    if out.numel():
        block_m, block_n, warps = tiles(y.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _scale_bias_fwd_kernel[grid](y, scale, bias, out, m, n, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out


def scale_bias_bwd(dout: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d y in y's dtype; d scale, d bias float32, summed over the M rows)."""
    m, n = y.shape
    dy = torch.empty_like(y)
    block_m, block_n, warps = tiles(y.device, backward=True)
    chunks, rows_per_program, col_blocks = row_chunks(m, n, block_m, block_n, y.device)
    partials = torch.zeros(2, chunks, n, dtype=torch.float32, device=y.device)
    if y.numel():
        _scale_bias_bwd_kernel[(chunks, col_blocks)](dout, y, scale, bias, dy, partials, m, n, rows_per_program,
                                                     BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return dy, partials[0].sum(0), partials[1].sum(0)
