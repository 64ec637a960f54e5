"""Triton SwiGLU: out = silu(gate) * up, and its backward recomputing silu instead of saving it.

With LLaMA-Adapter V2's bias/scale on gate_proj and up_proj (swiglu_scale_bias), the per-channel epilogues
run inside the same kernels: out = silu(s_g (g + b_g)) * s_u (u + b_u) from the GEMM outputs g and u, which
are all the backward reads (the scaled gate and up are never written). The backward also reduces the four
parameter gradients over the rows: each program walks a chunk of rows for a block of channels and writes
float32 partial sums; torch adds the chunks (two-stage, deterministic).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device


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
def _affine(X, VS, VB, rows, cols, M, N):
    """(x + b) and s of a (rows, cols) tile, in float32, with the tile's mask."""
    cmask = cols < N
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(VS + cols, mask=cmask, other=0.0).to(tl.float32)
    bias = tl.load(VB + cols, mask=cmask, other=0.0).to(tl.float32)
    return x + bias[None, :], scale[None, :], offs, mask


@triton.jit
def _swiglu_scale_bias_fwd_kernel(G, U, SG, BG, SU, BU, OUT, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pre_g, s_g, offs, mask = _affine(G, SG, BG, rows, cols, M, N)
    pre_u, s_u, _offs, _mask = _affine(U, SU, BU, rows, cols, M, N)
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
        pre_g, s_g, offs, mask = _affine(G, SG, BG, rows, cols, M, N)
        pre_u, s_u, _offs, _mask = _affine(U, SU, BU, rows, cols, M, N)
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


def _scale_bias_tiles(m: int, n: int, device: torch.device, backward: bool = False) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 2-D tiles of rows x channels (the channel vectors load once per tile);
    small tiles in the interpreter. On sm_90 (tools/compile_check.py) the forward's 32 x 128 tile takes 80
    registers per thread; the backward holds twice the live values and its row loop is software-pipelined: 248
    registers at that tile, 128 at 8 x 128, 80 at 8 x 64 (the tile here: several programs per SM keep loads
    in flight). Not yet timed."""
    if not _device.compiled(device):
        return 16, 32, 4
    return (8, 64, 4) if backward else (32, 128, 4)


def swiglu_scale_bias_fwd(gate: torch.Tensor, up: torch.Tensor, gate_scale, gate_bias, up_scale, up_bias
                          ) -> torch.Tensor:
    """gate, up (M, N) contiguous, same dtype; the four (N,) vectors contiguous (any float dtype)."""
    m, n = gate.shape
    out = torch.empty_like(gate)
    if out.numel():
        block_m, block_n, warps = _scale_bias_tiles(m, n, gate.device)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _swiglu_scale_bias_fwd_kernel[grid](gate, up, gate_scale, gate_bias, up_scale, up_bias, out, m, n,
                                            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return out


def swiglu_scale_bias_bwd(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scale, gate_bias,
                          up_scale, up_bias) -> Tuple[torch.Tensor, ...]:
    """(d gate, d up) in their dtype and (d s_g, d b_g, d s_u, d b_u) float32, summed over the M rows."""
    m, n = gate.shape
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    block_m, block_n, warps = _scale_bias_tiles(m, n, gate.device, backward=True)
    col_blocks = max(triton.cdiv(n, block_n), 1)
    # Enough row chunks to give every SM several programs, each walking a multiple of BLOCK_M rows.
    want = max(1, 4 * _device.sm_count(gate.device) // col_blocks) if _device.compiled(gate.device) else 2
    rows_per_program = triton.cdiv(max(triton.cdiv(m, want), 1), block_m) * block_m
    chunks = max(1, triton.cdiv(m, rows_per_program))
    partials = torch.zeros(4, chunks, n, dtype=torch.float32, device=gate.device)
    if gate.numel():
        _swiglu_scale_bias_bwd_kernel[(chunks, col_blocks)](
            dout, gate, up, gate_scale, gate_bias, up_scale, up_bias, dgate, dup, partials, m, n, rows_per_program,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return (dgate, dup, *(partials[i].sum(0) for i in range(4)))
