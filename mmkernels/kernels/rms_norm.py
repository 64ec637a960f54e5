"""Triton RMSNorm forward (optionally fused with the residual add) and backward with weight gradient.

One program per row in the forward. The backward runs a fixed number of programs, each over a strided set
of rows, accumulating its partial weight gradient in fp32 registers; the partials are summed afterwards,
so dw is deterministic and needs no atomics.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device

MAX_FUSED_N = 65536  # one row must fit one block


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Y, H, RSTD,
    stride_x, stride_r, stride_y, stride_h,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the storage dtype first: the norm must read exactly the h that is returned
        # (and that backward will read), as the unfused x + residual would.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, H, W, RSTD, DHX, DH, DW_PARTIAL,
    stride_dy, stride_h, stride_dhx, stride_dh,
    M, N,
    HAS_DH_EXTRA: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row in range(pid, M, nprog):
        row64 = tl.cast(row, tl.int64)
        dy = tl.load(DY + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + row64 * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row64)
        xhat = h * rstd
        g = dy * w
        c = tl.sum(g * xhat, axis=0) / N
        dh = rstd * (g - xhat * c)
        if HAS_DH_EXTRA:
            dh += tl.load(DHX + row64 * stride_dhx + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DH + row64 * stride_dh + cols, dh.to(DH.dtype.element_ty), mask=mask)
        dw += dy * xhat
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _block_and_warps(n: int) -> Tuple[int, int]:
    block = triton.next_power_of_2(n)
    if block > MAX_FUSED_N:
        raise ValueError(f"rms_norm (triton): row length {n} exceeds the fused limit {MAX_FUSED_N}")
    return block, min(max(block // 256, 1), 16)


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], eps: float
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """x, residual: (M, N) with unit stride along N. Returns (y, h or None, rstd)."""
    m, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else None
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block, warps = _block_and_warps(n)
    r = residual if residual is not None else x
    hh = h if h is not None else y
    _rms_norm_fwd_kernel[(m,)](
        x, r, weight, y, hh, rstd,
        x.stride(0), r.stride(0), y.stride(0), hh.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block, num_warps=warps,
    )
    return y, h, rstd


def _num_bwd_programs(m: int, device: torch.device) -> int:
    if _device.compiled(device):
        sms = _device.sm_count(device)
        return max(1, min(m, sms * 4))
    return max(1, min(m, 4))  # the interpreter runs programs one after another


def rms_norm_bwd(
    dy: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dh_extra: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """dy, h, dh_extra: (M, N) with unit stride along N. Returns (dh, dw)."""
    m, n = h.shape
    dh = torch.empty_like(h)
    block, warps = _block_and_warps(n)
    progs = _num_bwd_programs(m, h.device)
    dw_partial = torch.empty((progs, n), dtype=torch.float32, device=h.device)
    dhx = dh_extra if dh_extra is not None else dy
    _rms_norm_bwd_kernel[(progs,)](
        dy, h, weight, rstd, dhx, dh, dw_partial,
        dy.stride(0), h.stride(0), dhx.stride(0), dh.stride(0),
        m, n,
        HAS_DH_EXTRA=dh_extra is not None, BLOCK_N=block, num_warps=warps,
    )
    return dh, dw_partial.sum(0).to(weight.dtype)
