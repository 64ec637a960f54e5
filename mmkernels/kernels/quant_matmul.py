"""Triton GEMMs that dequantize a frozen weight inside the K loop (QPaCA's base weight).

    forward:   y  = x  @ deq(W)^T      x (M, K), W (N, K) quantized      -> (M, N)
    backward:  dx = dy @ deq(W)        dy (M, N)                          -> (M, K)

W never exists in full precision in memory: each program dequantizes the tile it multiplies.
int8: W[n, k] = q[n, k] * scale[n].  NF4: the flattened W is cut into blocks of BLOCK_Q elements (a block may
span rows; the last is zero-padded); element f = n K + k is nibble f % 2 of byte f // 2, its value
LEVELS[code] * absmax[f // BLOCK_Q] (reference/quantize.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device
from mmkernels.kernels.attention import _precision
from mmkernels.reference.quantize import NF4_LEVELS


@triton.jit
def _dequant_tile(Q, SCALES, LEVELS, rows, cols, K, mask, NF4: tl.constexpr, BLOCK_Q: tl.constexpr):
    """float32 W[rows, cols] for broadcastable index tensors rows (n) and cols (k)."""
    flat = rows.to(tl.int64) * K + cols
    if NF4:
        byte = tl.load(Q + flat // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((flat % 2) * 4).to(tl.int32)) & 0xF
        value = tl.load(LEVELS + code, mask=mask, other=0.0)
        return value * tl.load(SCALES + flat // BLOCK_Q, mask=mask, other=0.0)
    q = tl.load(Q + flat, mask=mask, other=0).to(tl.float32)
    return q * tl.load(SCALES + rows, mask=mask, other=0.0)


@triton.jit
def _dequant_matmul_nt(
    X, Q, SCALES, LEVELS, Y, M, N, K,
    stride_xm, stride_ym,
    NF4: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Y (M, N) = X (M, K) @ deq(W)^T."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        wt = _dequant_tile(Q, SCALES, LEVELS, offs_n[None, :], offs_k[:, None], K, n_ok[None, :] & k_ok[:, None],
                           NF4, BLOCK_Q)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(x, wt.to(x.dtype), input_precision=PRECISION)
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dequant_matmul_nn(
    DY, Q, SCALES, LEVELS, DX, M, N, K,
    stride_dym, stride_dxm,
    NF4: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """DX (M, K) = DY (M, N) @ deq(W)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok, k_ok = offs_m < M, offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        dy = tl.load(DY + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :],
                     mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        w = _dequant_tile(Q, SCALES, LEVELS, offs_n[:, None], offs_k[None, :], K, n_ok[:, None] & k_ok[None, :],
                          NF4, BLOCK_Q)  # (BLOCK_N, BLOCK_K)
        acc += tl.dot(dy, w.to(dy.dtype), input_precision=PRECISION)
    tl.store(DX + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :], acc.to(DX.dtype.element_ty),
             mask=m_ok[:, None] & k_ok[None, :])


_LEVELS = {}


def _levels(device: torch.device) -> torch.Tensor:
    if device not in _LEVELS:
        _LEVELS[device] = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    return _LEVELS[device]


def _tiles(device: torch.device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): small under the interpreter. On a GPU 64 x 64 x 64 tiles with 8
    warps, not yet tuned by measurement: with 4 warps the NF4 forward needed 255 registers and spilled on sm_90
    with Triton 3.6 (the GPU machines'); with 8 it needs at most 128, with Triton 3.6 and 3.9
    (tools/compile_check.py)."""
    return (16, 16, 16, 1) if not _device.compiled(device) else (64, 64, 64, 8)


def dequant_matmul(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, kind: str, n: int, k: int,
                   block: int, transpose_w: bool) -> torch.Tensor:
    """transpose_w: x (M, k) @ deq(W)^T -> (M, n); else x (M, n) @ deq(W) -> (M, k). x 2-D, unit last stride."""
    m = x.shape[0]
    out = torch.empty((m, n if transpose_w else k), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bm, bn, bk, warps = _tiles(x.device)
    common = dict(NF4=kind == "nf4", BLOCK_Q=block, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                  PRECISION=_precision(x.dtype), num_warps=warps)
    args = (x, data, scales, _levels(x.device), out, m, n, k, x.stride(0), out.stride(0))
    if transpose_w:
        _dequant_matmul_nt[(triton.cdiv(m, bm), triton.cdiv(n, bn))](*args, **common)
    else:
        _dequant_matmul_nn[(triton.cdiv(m, bm), triton.cdiv(k, bk))](*args, **common)
    return out
