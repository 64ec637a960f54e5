"""Triton kernels of the Compacter / PHM adapter y = x + PHM_up(gelu(PHM_down(x))) (math: reference/phm.py).

Neither W = sum_i kron(A_i, s_i t_i) nor any Kronecker product is built. The n blocks and the rank are folded
into one small column axis c = p*n*r + i*r + j (C = n*n*r columns, padded to a power of two >= 16, the
smallest tl.dot tile; for n=4, r=1 the padding is free). Per row block:
    z = X @ S       S (d_in, C): block-diagonal expansion of s, gathered tile by tile from s itself
    u = z @ Arule   Arule (C, C): A_i[p, q] on the (p,i,j) -> (q,i,j) entries, gathered from the (n, n, n) rule
    y = u @ T       T (C, d_out): block-diagonal expansion of t
S, T and Arule exist only as register tiles loaded with masks from s, t and the rule.

Forward: one program per row block runs down -> exact GELU -> up -> + bias + residual; the bottleneck
(k = d / reduction columns) is walked in chunks and never leaves registers, so x is read and y written once
per row block (the residual add reads the block's rows a second time, right after the first pass, from L2).

Backward: one program per row block recomputes z, u, h and gelu(h) from x (nothing but x is saved), then
    dU_up = dY T_up^T, dZ_up = dU_up Arule_up^T, dg = dZ_up S_up^T, dh = dg gelu'(h),
    dU_down = dh T_down^T, dZ_down = dU_down Arule_down^T, dx = dy + dZ_down S_down^T.
The parameter gradients are reductions over all rows: each program writes fp32 partials of its row block
(dt = u^T dY, ds = X^T dZ, dA = z^T dU restricted to their block-diagonal entries, db = column sums); the
partials are summed afterwards (two-stage, deterministic, no atomics).

Precision: accumulation is fp32 throughout. With fp16/bf16 inputs the products over the model width d
(X S, u T_up and their backward counterparts) run on tensor cores in the input dtype, the fp32
intermediate rounded to it as an eager half-precision model rounds every matmul output; products inside the
bottleneck (sizes C and k) stay in fp32. fp32 inputs use full fp32 products (not TF32) everywhere.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device

# tl.constexpr: a compiled kernel may read a module global only in this form (the interpreter reads any).
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _left_tile(S, feats, cc, F, P, N: tl.constexpr, R: tl.constexpr):
    """(BLOCK_F, C) tile of the block-diagonal expansion of s (n, P, r): entry (f, c = p*N*R + i*R + j) is
    s[i, f % P, j] when f // P == p, else 0. Returns (fp32 tile, mask of the structural non-zeros)."""
    p = feats // P
    a = feats - p * P
    cp = cc // (N * R)
    rem = cc - cp * (N * R)
    i = rem // R
    j = rem - i * R
    mask = (feats < F)[:, None] & (cc < N * N * R)[None, :] & (p[:, None] == cp[None, :])
    vals = tl.load(S + (a * R)[:, None] + (i * (P * R) + j)[None, :], mask=mask, other=0.0)
    return vals.to(tl.float32), mask


@triton.jit
def _right_tile(T, cc, feats, F, Q, N: tl.constexpr, R: tl.constexpr):
    """(C, BLOCK_F) tile of the block-diagonal expansion of t (n, r, Q): entry (c = q*N*R + i*R + j, f) is
    t[i, j, f % Q] when f // Q == q, else 0. Returns (fp32 tile, mask of the structural non-zeros)."""
    q = feats // Q
    b = feats - q * Q
    cq = cc // (N * R)
    rem = cc - cq * (N * R)
    i = rem // R
    j = rem - i * R
    mask = (cc < N * N * R)[:, None] & (feats < F)[None, :] & (cq[:, None] == q[None, :])
    vals = tl.load(T + (i * (R * Q) + j * Q)[:, None] + b[None, :], mask=mask, other=0.0)
    return vals.to(tl.float32), mask


@triton.jit
def _rule_matrix(A, cc, N: tl.constexpr, R: tl.constexpr):
    """(C, C) fp32: entry (p*N*R + i*R + j, q*N*R + i*R + j) = A[i, p, q], zero elsewhere."""
    p = cc // (N * R)
    rem = cc - p * (N * R)
    i = rem // R
    j = rem - i * R
    valid = cc < N * N * R
    mask = valid[:, None] & valid[None, :] & (i[:, None] == i[None, :]) & (j[:, None] == j[None, :])
    vals = tl.load(A + (i * N * N + p * N)[:, None] + p[None, :], mask=mask, other=0.0)
    return vals.to(tl.float32), mask


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.math.erf(h * _INV_SQRT2))


@triton.jit
def _gelu_grad(h):
    return 0.5 * (1.0 + tl.math.erf(h * _INV_SQRT2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI


@triton.jit
def _down_z(X, roff, rmask, SD, D, cc, N: tl.constexpr, R: tl.constexpr, C: tl.constexpr, LOWP: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """z_down = X S_down (BLOCK_M, C) fp32, reading the row block of x once."""
    PD = D // N
    z = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    for f0 in range(0, D, BLOCK_D):
        feats = f0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + roff + feats[None, :], mask=rmask[:, None] & (feats < D)[None, :], other=0.0)
        s, _s_mask = _left_tile(SD, feats, cc, D, PD, N, R)
        if LOWP:
            z = tl.dot(x, s.to(x.dtype), z)
        else:
            z = tl.dot(x.to(tl.float32), s, z, input_precision="ieee")
    return z


@triton.jit
def _bottleneck_chunk(u_d, TD, BD, K, PK, h0, cc, N: tl.constexpr, R: tl.constexpr, BLOCK_K: tl.constexpr):
    """h = u_down T_down + b_down on bottleneck columns [h0, h0 + BLOCK_K): (hidden ids, h, T tile, T mask)."""
    hid = h0 + tl.arange(0, BLOCK_K)
    t, tmask = _right_tile(TD, cc, hid, K, PK, N, R)
    bias = tl.load(BD + hid, mask=hid < K, other=0.0).to(tl.float32)
    h = tl.dot(u_d, t, input_precision="ieee") + bias[None, :]
    return hid, h, t, tmask


@triton.jit
def _up_z(u_d, rmask, TD, BD, SU, K, cc, N: tl.constexpr, R: tl.constexpr, C: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """z_up = gelu(u_down T_down + b_down) S_up (BLOCK_M, C) fp32, the bottleneck walked in chunks."""
    PK = K // N
    z = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    for h0 in range(0, K, BLOCK_K):
        hid, h, _t, _t_mask = _bottleneck_chunk(u_d, TD, BD, K, PK, h0, cc, N, R, BLOCK_K)
        g = tl.where(rmask[:, None], _gelu(h), 0.0)
        s, _s_mask = _left_tile(SU, hid, cc, K, PK, N, R)
        z = tl.dot(g, s, z, input_precision="ieee")
    return z


@triton.jit
def _phm_adapter_fwd_kernel(
    X, Y, RD, SD, TD, BD, RU, SU, TU, BU, M, D, K,
    N: tl.constexpr, R: tl.constexpr, C: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    roff = rows.to(tl.int64)[:, None] * D
    cc = tl.arange(0, C)
    z_d = _down_z(X, roff, rmask, SD, D, cc, N, R, C, LOWP, BLOCK_M, BLOCK_D)
    a_d, _a_mask = _rule_matrix(RD, cc, N, R)
    u_d = tl.dot(z_d, a_d, input_precision="ieee")
    z_u = _up_z(u_d, rmask, TD, BD, SU, K, cc, N, R, C, BLOCK_M, BLOCK_K)
    a_u, _a_mask = _rule_matrix(RU, cc, N, R)
    u_u = tl.dot(z_u, a_u, input_precision="ieee")
    PD = D // N
    for f0 in range(0, D, BLOCK_D):
        feats = f0 + tl.arange(0, BLOCK_D)
        fmask = feats < D
        mask = rmask[:, None] & fmask[None, :]
        x = tl.load(X + roff + feats[None, :], mask=mask, other=0.0)
        t, _t_mask = _right_tile(TU, cc, feats, D, PD, N, R)
        if LOWP:
            delta = tl.dot(u_u.to(x.dtype), t.to(x.dtype))
        else:
            delta = tl.dot(u_u, t, input_precision="ieee")
        bias = tl.load(BU + feats, mask=fmask, other=0.0).to(tl.float32)
        y = x.to(tl.float32) + delta + bias[None, :]
        tl.store(Y + roff + feats[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _phm_adapter_bwd_kernel(
    X, DY, DX, RD, SD, TD, BD, RU, SU, TU,
    P_RD, P_SD, P_TD, P_BD, P_RU, P_SU, P_TU, P_BU,
    M, D, K,
    N: tl.constexpr, R: tl.constexpr, C: tl.constexpr, LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    roff = rows.to(tl.int64)[:, None] * D
    cc = tl.arange(0, C)
    NR: tl.constexpr = N * R
    PD = D // N
    PK = K // N
    rem = cc % NR

    # Recompute the forward intermediates (all (BLOCK_M, C), fp32).
    z_d = _down_z(X, roff, rmask, SD, D, cc, N, R, C, LOWP, BLOCK_M, BLOCK_D)
    a_d, amask = _rule_matrix(RD, cc, N, R)
    u_d = tl.dot(z_d, a_d, input_precision="ieee")
    z_u = _up_z(u_d, rmask, TD, BD, SU, K, cc, N, R, C, BLOCK_M, BLOCK_K)
    a_u, _a_mask = _rule_matrix(RU, cc, N, R)
    u_u = tl.dot(z_u, a_u, input_precision="ieee")

    # Up layer, over the model width: dU_up = dY T_up^T; partials of dt_up = u_up^T dY and db_up.
    du_u = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    for f0 in range(0, D, BLOCK_D):
        feats = f0 + tl.arange(0, BLOCK_D)
        fmask = feats < D
        dy = tl.load(DY + roff + feats[None, :], mask=rmask[:, None] & fmask[None, :], other=0.0)
        t, tmask = _right_tile(TU, cc, feats, D, PD, N, R)
        if LOWP:
            du_u = tl.dot(dy, tl.trans(t.to(dy.dtype)), du_u)
            pt = tl.dot(tl.trans(u_u.to(dy.dtype)), dy)
        else:
            dyf = dy.to(tl.float32)
            du_u = tl.dot(dyf, tl.trans(t), du_u, input_precision="ieee")
            pt = tl.dot(tl.trans(u_u), dyf, input_precision="ieee")
        # entry (c, f) belongs to t[i, j, f % Q]: stored at (c % NR, f), a bijection on the structural non-zeros
        tl.store(P_TU + pid64 * NR * D + rem[:, None] * D + feats[None, :], pt, mask=tmask)
        tl.store(P_BU + pid64 * D + feats, tl.sum(dy.to(tl.float32), axis=0), mask=fmask)

    dz_u = tl.dot(du_u, tl.trans(a_u), input_precision="ieee")
    ga = tl.dot(tl.trans(z_u), du_u, input_precision="ieee")
    _store_rule_partial(P_RU + pid64 * N * N * N * R, ga, amask, cc, N, R)

    # Bottleneck: dg = dZ_up S_up^T, dh = dg gelu'(h); dU_down = dh T_down^T; partials of ds_up, dt_down, db_down.
    du_d = tl.zeros((BLOCK_M, C), dtype=tl.float32)
    for h0 in range(0, K, BLOCK_K):
        hid, h, t, tmask = _bottleneck_chunk(u_d, TD, BD, K, PK, h0, cc, N, R, BLOCK_K)
        hmask = hid < K
        g = tl.where(rmask[:, None], _gelu(h), 0.0)
        s, smask = _left_tile(SU, hid, cc, K, PK, N, R)
        dg = tl.dot(dz_u, tl.trans(s), input_precision="ieee")
        ps = tl.dot(tl.trans(g), dz_u, input_precision="ieee")
        tl.store(P_SU + pid64 * K * NR + hid[:, None] * NR + rem[None, :], ps, mask=smask)
        dh = tl.where(rmask[:, None], dg * _gelu_grad(h), 0.0)
        tl.store(P_BD + pid64 * K + hid, tl.sum(dh, axis=0), mask=hmask)
        du_d = tl.dot(dh, tl.trans(t), du_d, input_precision="ieee")
        pt = tl.dot(tl.trans(u_d), dh, input_precision="ieee")
        tl.store(P_TD + pid64 * NR * K + rem[:, None] * K + hid[None, :], pt, mask=tmask)

    dz_d = tl.dot(du_d, tl.trans(a_d), input_precision="ieee")
    ga = tl.dot(tl.trans(z_d), du_d, input_precision="ieee")
    _store_rule_partial(P_RD + pid64 * N * N * N * R, ga, amask, cc, N, R)

    # Down layer, over the model width: dx = dy + dZ_down S_down^T; partial of ds_down = X^T dZ_down.
    for f0 in range(0, D, BLOCK_D):
        feats = f0 + tl.arange(0, BLOCK_D)
        fmask = feats < D
        mask = rmask[:, None] & fmask[None, :]
        x = tl.load(X + roff + feats[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + roff + feats[None, :], mask=mask, other=0.0)
        s, smask = _left_tile(SD, feats, cc, D, PD, N, R)
        if LOWP:
            dz_lp = dz_d.to(x.dtype)
            dxs = tl.dot(dz_lp, tl.trans(s.to(x.dtype)))
            ps = tl.dot(tl.trans(x), dz_lp)
        else:
            xf = x.to(tl.float32)
            dxs = tl.dot(dz_d, tl.trans(s), input_precision="ieee")
            ps = tl.dot(tl.trans(xf), dz_d, input_precision="ieee")
        tl.store(DX + roff + feats[None, :], (dy.to(tl.float32) + dxs).to(DX.dtype.element_ty), mask=mask)
        tl.store(P_SD + pid64 * D * NR + feats[:, None] * NR + rem[None, :], ps, mask=smask)


@triton.jit
def _store_rule_partial(OUT, ga, amask, cc, N: tl.constexpr, R: tl.constexpr):
    """ga (C, C) = z^T dU; entry (p*N*R + i*R + j, q*N*R + i*R + j) is the (i, p, q, j) term of dA, stored
    at OUT[((i*N + p)*N + q)*R + j] (each structural non-zero once)."""
    p = cc // (N * R)
    rem = cc - p * (N * R)
    i = rem // R
    j = rem - i * R
    offs = ((i * N + p) * N)[:, None] * R + (p * R)[None, :] + j[:, None]
    tl.store(OUT + offs, ga, mask=amask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _config(m: int, d: int, k: int, n: int, r: int, device: torch.device, backward: bool = False
            ) -> Tuple[int, int, int, int, int, int]:
    """(C, BLOCK_M, BLOCK_D, BLOCK_K, num_warps, num_stages).

    GPU tiles by what ptxas makes of them on sm_90 (tools/compile_check.py; d = 4096, bf16): C = n*n*r
    padded to >= 16 sets the width of the rule tiles every row block holds. C = 16 (n = 4, r = 1, the
    paper's) takes 64-row blocks with no spills: the forward with 4 warps, the backward with 8 (it spilled
    192 B per thread with 4). C = 32 needs 16-row blocks and 8 warps to stay off the stack. C = 64 still
    spills in the backward (88 B at the tiles below) and C = 128 in both (over 1 KB); C = 256 does not fit
    the shared memory at all (ops.phm.MAX_TRITON_RULE_WIDTH sends it to the reference). Not yet chosen by
    measurement."""
    c = _pow2(n * n * r, 16, 1 << 30)
    block_k = _pow2(k, 16, 64)
    if not _device.compiled(device):  # the interpreter runs one program at a time: fewer, larger blocks
        return c, _pow2(m, 16, 64), _pow2(d, 16, 128), block_k, 4, 1
    if c <= 16:
        return c, 64, 64, block_k, 8 if backward else 4, 3
    if c <= 32:
        return c, 16, 32, block_k, 8, 3
    return c, 16, 32, 16, 8, 2


def phm_adapter_fwd(x2d: torch.Tensor, rule_d, s_d, t_d, b_d, rule_u, s_u, t_u, b_u) -> torch.Tensor:
    """x2d (M, d) contiguous; all parameters contiguous, x's dtype (layouts: reference/phm.py) -> y (M, d)."""
    m, d = x2d.shape
    n, r = rule_d.shape[0], s_d.shape[2]
    k = t_d.shape[2] * n
    y = torch.empty_like(x2d)
    if m == 0:
        return y
    c, block_m, block_d, block_k, warps, stages = _config(m, d, k, n, r, x2d.device)
    grid = (triton.cdiv(m, block_m),)
    _phm_adapter_fwd_kernel[grid](
        x2d, y, rule_d, s_d, t_d, b_d, rule_u, s_u, t_u, b_u, m, d, k,
        N=n, R=r, C=c, LOWP=x2d.dtype != torch.float32,
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return y


def phm_adapter_bwd(dy2d: torch.Tensor, x2d: torch.Tensor, rule_d, s_d, t_d, b_d, rule_u, s_u, t_u
                    ) -> Tuple[torch.Tensor, ...]:
    """(dx in x's dtype; d_rule_d, ds_d, dt_d, db_d, d_rule_u, ds_u, dt_u, db_u in float32)."""
    m, d = x2d.shape
    n, r = rule_d.shape[0], s_d.shape[2]
    k = t_d.shape[2] * n
    nr, pd, pk = n * r, d // n, k // n
    dev = x2d.device
    dx = torch.empty_like(x2d)
    c, block_m, block_d, block_k, warps, stages = _config(m, d, k, n, r, dev, backward=True)
    g = triton.cdiv(m, block_m)
    f32 = dict(dtype=torch.float32, device=dev)
    p_rd, p_ru = torch.empty(g, n, n, n, r, **f32), torch.empty(g, n, n, n, r, **f32)
    p_sd, p_su = torch.empty(g, d, nr, **f32), torch.empty(g, k, nr, **f32)
    p_td, p_tu = torch.empty(g, nr, k, **f32), torch.empty(g, nr, d, **f32)
    p_bd, p_bu = torch.empty(g, k, **f32), torch.empty(g, d, **f32)
    if m > 0:
        _phm_adapter_bwd_kernel[(g,)](
            x2d, dy2d, dx, rule_d, s_d, t_d, b_d, rule_u, s_u, t_u,
            p_rd, p_sd, p_td, p_bd, p_ru, p_su, p_tu, p_bu, m, d, k,
            N=n, R=r, C=c, LOWP=x2d.dtype != torch.float32,
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        )

    def rule_grad(p):
        return p.sum(0).sum(-1)

    def left_grad(p, feats_per_block):  # (g, F, NR) -> (n, F/n, r)
        return p.sum(0).view(n, feats_per_block, n, r).sum(0).permute(1, 0, 2).contiguous()

    def right_grad(p, feats_per_block):  # (g, NR, F) -> (n, r, F/n)
        return p.sum(0).view(nr, n, feats_per_block).sum(1).view(n, r, feats_per_block)

    return (dx, rule_grad(p_rd), left_grad(p_sd, pd), right_grad(p_td, pk), p_bd.sum(0),
            rule_grad(p_ru), left_grad(p_su, pk), right_grad(p_tu, pd), p_bu.sum(0))
