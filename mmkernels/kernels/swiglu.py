"""Triton SwiGLU: out = silu(gate) * up, and its backward recomputing silu instead of saving it.

With LLaMA-Adapter V2's bias/scale on gate_proj and up_proj (swiglu_scale_bias), the per-channel epilogues
run inside the same kernels: out = silu(s_g (g + b_g)) * s_u (u + b_u) from the GEMM outputs g and u, which
are all the backward reads (the scaled gate and up are never written). The backward also reduces the four
parameter gradients over the rows, two-stage as kernels/scale_bias.py does (tiles and row chunks from there).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels.scale_bias import affine_tile, row_chunks, tiles


@triton.jit
def _swiglu_fwd_kernel(G, U, OUT, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DOUT, G, U, DG, DU, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    d = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (d * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (d * silu).to(DU.dtype.element_ty), mask=mask)


def _grid(n: int):
    block = 1024
    return (triton.cdiv(n, block),), block


def swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up: contiguous, same shape."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        grid, block = _grid(n)
        _swiglu_fwd_kernel[grid](gate, up, out, n, BLOCK=block, num_warps=4)
    return out


def swiglu_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        grid, block = _grid(n)
        _swiglu_bwd_kernel[grid](dout, gate, up, dgate, dup, n, BLOCK=block, num_warps=4)
    return dgate, dup


@triton.jit
def _swiglu_scale_bias_fwd_kernel(G, U, SG, BG, SU, BU, OUT, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pre_g, s_g, offs, mask = affine_tile(G, SG, BG, rows, cols, M, N)
    pre_u, s_u, _offs, _mask = affine_tile(U, SU, BU, rows, cols, M, N)
    g = pre_g * s_g
    out = g * tl.sigmoid(g) * (pre_u * s_u)
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_scale_bias_bwd_kernel(DOUT, G, U, SG, BG, SU, BU, DG, DU, P, M, N, ROWS_PER_PROGRAM,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """P (4, chunks, N) float32: partial sums over this program's rows of d s_g, d b_g, d s_u, d b_u."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_sg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_bg = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_su = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_bu = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = chunk * ROWS_PER_PROGRAM
    for r0 in range(first, first + ROWS_PER_PROGRAM, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        pre_g, s_g, offs, mask = affine_tile(G, SG, BG, rows, cols, M, N)
        pre_u, s_u, _offs, _mask = affine_tile(U, SU, BU, rows, cols, M, N)
        d = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        g = pre_g * s_g
        u = pre_u * s_u
        sig = tl.sigmoid(g)
        dg = d * u * sig * (1.0 + g * (1.0 - sig))  # zero outside the mask: d is
        du = d * g * sig
        tl.store(DG + offs, (dg * s_g).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (du * s_u).to(DU.dtype.element_ty), mask=mask)
        acc_sg += tl.sum(dg * pre_g, axis=0)
        acc_bg += tl.sum(dg * s_g, axis=0)
        acc_su += tl.sum(du * pre_u, axis=0)
        acc_bu += tl.sum(du * s_u, axis=0)
    cmask = cols < N
    chunks = tl.num_programs(0)
    base = P + chunk.to(tl.int64) * N + cols
    tl.store(base, acc_sg, mask=cmask)
    tl.store(base + chunks * N, acc_bg, mask=cmask)
    tl.store(base + 2 * chunks * N, acc_su, mask=cmask)
    tl.store(base + 3 * chunks * N, acc_bu, mask=cmask)


def swiglu_scale_bias_fwd(gate: torch.Tensor, up: torch.Tensor, gate_scale, gate_bias, up_scale, up_bias
                          ) -> torch.Tensor:
    """gate, up (M, N) contiguous, same dtype; the four (N,) vectors contiguous (any float dtype)."""
    m, n = gate.shape
    out = torch.empty_like(gate)
    if out.numel():
        block_m, block_n, warps = tiles(gate.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _swiglu_scale_bias_fwd_kernel[grid](gate, up, gate_scale, gate_bias, up_scale, up_bias, out, m, n,
                                            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out


def swiglu_scale_bias_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scale, gate_bias,
                          up_scale, up_bias) -> Tuple[torch.Tensor, ...]:
    """(d gate, d up) in their dtype and (d s_g, d b_g, d s_u, d b_u) float32, summed over the M rows."""
    m, n = gate.shape
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    block_m, block_n, warps = tiles(gate.device, backward=True)
    chunks, rows_per_program, col_blocks = row_chunks(m, n, block_m, block_n, gate.device)
    partials = torch.zeros(4, chunks, n, dtype=torch.float32, device=gate.device)
    if gate.numel():
        _swiglu_scale_bias_bwd_kernel[(chunks, col_blocks)](
            dout, gate, up, gate_scale, gate_bias, up_scale, up_bias, dgate, dup, partials, m, n, rows_per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return (dgate, dup, *(partials[i].sum(0) for i in range(4)))
