"""Triton kernels of the mixture-of-modality adapter (ops/mom_adapter.py has the math).

Forward, one program per (sample, block of BLOCK_T tokens):
  pass 1 over d in BLOCK_N chunks: u = x_hat A^T in fp32 registers (with the norm, the sum of squares in the
         same pass: u = rstd * ((x * norm_weight) A^T), so x is read twice in all, not three times);
  pass 2 over d: y = x_hat + s (u U^T + c) with U = w0 B_full + w1 D_full and c = w0 b + w1 d_b, built per
         chunk from the grouped weights (the sample's router weights are per program constants).
  u (tokens, h) is stored in fp32 for the backward (h = 8 floats per token: recomputing it would cost a
  second read of x).
Backward, a fixed number of programs per sample, each over a strided set of its token blocks:
  pass 1 over d: dy B_full and dy D_full (tokens, h), and the row sums the router and norm gradients need;
  pass 2 over d: dx (through the RMSNorm backward when fused), and the partial sums of dA = du^T x_hat,
         P = dy^T u, column sums of dy and d norm_weight, accumulated in the program's own fp32 slice of a
         partial buffer (deterministic, no atomics). A barrier ends each token block so the next block's
         read-modify-write sees this one's stores.
  The partials are then reduced over programs with torch (dB, dD, db, dd_b need each sample's router
  weights: a weighted sum over the programs of that sample).
The small products (K or N = h padded to 16, the minimum of tl.dot) use tl.dot in fp32: IEEE for fp32
inputs, TF32 otherwise (16-bit inputs are exact in TF32).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device


def _hidden_block(h: int) -> int:
    return max(16, triton.next_power_of_2(h))


def _blocks(n: int, device: torch.device, backward: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_N, num_warps, num_stages). On CPU (the interpreter, tests) small blocks so odd sizes
    cross chunk borders.

    On a GPU the backward holds several (BLOCK_T, BLOCK_N) fp32 tiles at once (dy, x, dx_hat, x_hat, dx):
    at 64 x 128 with 4 warps ptxas spills 1.2-1.5 KB per thread to the stack on sm_90; 64 x 64 with 8 warps
    and 2 stages needs no stack (tools/compile_check.py reports registers and stack per kernel)."""
    if not _device.compiled(device):
        return 16, 32, 4, 1
    width = max(16, triton.next_power_of_2(n))
    if backward:
        return 64, min(64, width), 8, 2
    return 64, min(128, width), 4, 3


@triton.jit
def _grouped_tile(W, cols, c_mask, ks, per_group, hg, BLOCK_N: tl.constexpr, HP: tl.constexpr):
    """Rows `cols` of the dense (d, h) matrix a grouped (d, h/G) weight stands for, as fp32 (BLOCK_N, HP)."""
    j = ks[None, :] - ((cols // per_group) * hg)[:, None]
    mask = (j >= 0) & (j < hg) & c_mask[:, None]
    return tl.load(W + cols[:, None].to(tl.int64) * hg + j, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _mom_fwd_kernel(
    X, A, A_BIAS, B, B_BIAS, D, D_BIAS, W, NW, Y, U, RSTD,
    T, N, H, HG, PER_GROUP, scale, eps,
    HAS_NORM: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    tok = pid_b.to(tl.int64) * T + rows
    ks = tl.arange(0, HP)
    k_mask = ks < H

    u = tl.zeros((BLOCK_T, HP), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_mask = cols < N
        x = tl.load(X + tok[:, None] * N + cols[None, :], mask=row_mask[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        if HAS_NORM:
            ss += tl.sum(x * x, axis=1)
            x = x * tl.load(NW + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        at = tl.load(A + ks[None, :] * N + cols[:, None], mask=k_mask[None, :] & c_mask[:, None],
                     other=0.0).to(tl.float32)
        if IEEE:
            u = tl.dot(x, at, u, input_precision="ieee")
        else:
            u = tl.dot(x, at, u)
    rstd = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(ss / N + eps)
        u = u * rstd[:, None]
        tl.store(RSTD + tok, rstd, mask=row_mask)
    u += tl.load(A_BIAS + ks, mask=k_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(U + tok[:, None] * H + ks[None, :], u, mask=row_mask[:, None] & k_mask[None, :])

    w0 = tl.load(W + pid_b * 2).to(tl.float32)
    w1 = tl.load(W + pid_b * 2 + 1).to(tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_mask = cols < N
        mask = row_mask[:, None] & c_mask[None, :]
        x = tl.load(X + tok[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_NORM:
            x = x * rstd[:, None] * tl.load(NW + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :]
        up = (w0 * _grouped_tile(B, cols, c_mask, ks, PER_GROUP, HG, BLOCK_N, HP)
              + w1 * _grouped_tile(D, cols, c_mask, ks, PER_GROUP, HG, BLOCK_N, HP))
        bias = (w0 * tl.load(B_BIAS + cols, mask=c_mask, other=0.0).to(tl.float32)
                + w1 * tl.load(D_BIAS + cols, mask=c_mask, other=0.0).to(tl.float32))
        if IEEE:
            adapter = tl.dot(u, tl.trans(up), input_precision="ieee")
        else:
            adapter = tl.dot(u, tl.trans(up))
        y = x + scale * (adapter + bias[None, :])
        tl.store(Y + tok[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _mom_bwd_kernel(
    DY, X, U, RSTD, A, A_BIAS, B, B_BIAS, D, D_BIAS, W, NW, DX,
    DA_P, P_P, S_P, DNW_P, DAB_P, DW_P,
    T, N, H, HG, PER_GROUP, SPLITS, scale,
    HAS_NORM: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    prog = (pid_b * SPLITS + pid_s).to(tl.int64)
    ks = tl.arange(0, HP)
    k_mask = ks < H
    w0 = tl.load(W + pid_b * 2).to(tl.float32)
    w1 = tl.load(W + pid_b * 2 + 1).to(tl.float32)
    a_bias = tl.load(A_BIAS + ks, mask=k_mask, other=0.0).to(tl.float32)
    dw0 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    dw1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    da = tl.zeros((HP,), dtype=tl.float32)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for blk in range(pid_s, n_blocks, SPLITS):
        rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        tok = pid_b.to(tl.int64) * T + rows
        # pass 1: du needs the whole row of dy
        dub = tl.zeros((BLOCK_T, HP), dtype=tl.float32)
        dud = tl.zeros((BLOCK_T, HP), dtype=tl.float32)
        sb = tl.zeros((BLOCK_T,), dtype=tl.float32)
        sd = tl.zeros((BLOCK_T,), dtype=tl.float32)
        r1 = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            c_mask = cols < N
            mask = row_mask[:, None] & c_mask[None, :]
            dy = tl.load(DY + tok[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            bt = _grouped_tile(B, cols, c_mask, ks, PER_GROUP, HG, BLOCK_N, HP)
            dt = _grouped_tile(D, cols, c_mask, ks, PER_GROUP, HG, BLOCK_N, HP)
            if IEEE:
                dub = tl.dot(dy, bt, dub, input_precision="ieee")
                dud = tl.dot(dy, dt, dud, input_precision="ieee")
            else:
                dub = tl.dot(dy, bt, dub)
                dud = tl.dot(dy, dt, dud)
            sb += tl.sum(dy * tl.load(B_BIAS + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :], axis=1)
            sd += tl.sum(dy * tl.load(D_BIAS + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :], axis=1)
            if HAS_NORM:
                x = tl.load(X + tok[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                r1 += tl.sum(dy * x * tl.load(NW + cols, mask=c_mask, other=0.0).to(tl.float32)[None, :], axis=1)
        u = tl.load(U + tok[:, None] * H + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        du = scale * (w0 * dub + w1 * dud)
        dw0 += scale * (tl.sum(dub * u, axis=1) + sb)
        dw1 += scale * (tl.sum(dud * u, axis=1) + sd)
        da += tl.sum(du, axis=0)
        rstd = tl.full((BLOCK_T,), 1.0, dtype=tl.float32)
        c_row = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if HAS_NORM:
            rstd = tl.load(RSTD + tok, mask=row_mask, other=0.0)
            # mean_c(dx_hat * w * x_n) = (sum_c dy w x_n + du . (x_hat A^T)) / d, and x_hat A^T = u - a
            c_row = (r1 * rstd + tl.sum(du * (u - a_bias[None, :]), axis=1)) / N

        # pass 2: dx and the partial sums of the parameter gradients
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            c_mask = cols < N
            mask = row_mask[:, None] & c_mask[None, :]
            dy = tl.load(DY + tok[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + tok[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            a_rows = tl.load(A + ks[:, None] * N + cols[None, :], mask=k_mask[:, None] & c_mask[None, :],
                             other=0.0).to(tl.float32)
            if IEEE:
                dxh = dy + tl.dot(du, a_rows, input_precision="ieee")
            else:
                dxh = dy + tl.dot(du, a_rows)
            if HAS_NORM:
                nw = tl.load(NW + cols, mask=c_mask, other=0.0).to(tl.float32)
                xn = x * rstd[:, None]
                xh = xn * nw[None, :]
                g = dxh * nw[None, :]
                dx = rstd[:, None] * (g - xn * c_row[:, None])
                dnw_ptr = DNW_P + prog * N + cols
                tl.store(dnw_ptr, tl.load(dnw_ptr, mask=c_mask, other=0.0) + tl.sum(dxh * xn, axis=0), mask=c_mask)
            else:
                xh = x
                dx = dxh
            tl.store(DX + tok[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            if IEEE:
                da_tile = tl.dot(tl.trans(du), xh, input_precision="ieee")
                p_tile = tl.dot(tl.trans(dy), u, input_precision="ieee")
            else:
                da_tile = tl.dot(tl.trans(du), xh)
                p_tile = tl.dot(tl.trans(dy), u)
            da_mask = k_mask[:, None] & c_mask[None, :]
            da_ptr = DA_P + prog * H * N + ks[:, None] * N + cols[None, :]
            tl.store(da_ptr, tl.load(da_ptr, mask=da_mask, other=0.0) + da_tile, mask=da_mask)
            p_mask = c_mask[:, None] & k_mask[None, :]
            p_ptr = P_P + prog * N * H + cols[:, None] * H + ks[None, :]
            tl.store(p_ptr, tl.load(p_ptr, mask=p_mask, other=0.0) + p_tile, mask=p_mask)
            s_ptr = S_P + prog * N + cols
            tl.store(s_ptr, tl.load(s_ptr, mask=c_mask, other=0.0) + tl.sum(dy, axis=0), mask=c_mask)
        # the next block's read-modify-write of the partials must see this block's stores
        tl.debug_barrier()
    tl.store(DAB_P + prog * H + ks, da, mask=k_mask)
    tl.store(DW_P + prog * 2, tl.sum(dw0, axis=0))
    tl.store(DW_P + prog * 2 + 1, tl.sum(dw1, axis=0))


def _check(x: torch.Tensor, a_w: torch.Tensor, b_w: torch.Tensor) -> Tuple[int, int, int, int, int]:
    assert x.dim() == 3 and x.is_contiguous()
    batch, t, n = x.shape
    h, hg = a_w.shape[0], b_w.shape[1]
    groups = h // hg
    assert n % groups == 0 and h % hg == 0
    return batch, t, n, h, hg


def mom_adapter_fwd(x, a_w, a_b, b_w, b_b, d_w, d_b, router_w, norm_weight: Optional[torch.Tensor], scale: float,
                    eps: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (batch, T, d) contiguous; all parameters contiguous. Returns (y in x's dtype, u (batch, T, h) fp32,
    rstd (batch, T) fp32, empty without the norm)."""
    batch, t, n, h, hg = _check(x, a_w, b_w)
    y = torch.empty_like(x)
    u = torch.empty(batch, t, h, dtype=torch.float32, device=x.device)
    rstd = torch.empty((batch, t) if norm_weight is not None else (0,), dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return y, u, rstd
    block_t, block_n, warps, stages = _blocks(n, x.device, backward=False)
    nw = norm_weight if norm_weight is not None else a_b
    grid = (batch, triton.cdiv(t, block_t))
    _mom_fwd_kernel[grid](
        x, a_w, a_b, b_w, b_b, d_w, d_b, router_w, nw, y, u, rstd if norm_weight is not None else u,
        t, n, h, hg, n // (h // hg), float(scale), float(eps),
        HAS_NORM=norm_weight is not None, IEEE=x.dtype == torch.float32, BLOCK_T=block_t, BLOCK_N=block_n,
        HP=_hidden_block(h), num_warps=warps, num_stages=stages,
    )
    return y, u, rstd


def _splits(batch: int, n_blocks: int, device: torch.device) -> int:
    """Programs per sample: about one per SM in all on a GPU (each owns an fp32 partial slice of ~(2h + 2) d
    floats, so fewer programs mean less partial traffic); 2 on CPU, so tests cover the strided loop and
    the cross-program reduction."""
    if not _device.compiled(device):
        return max(1, min(n_blocks, 2))
    sms = _device.sm_count(device)
    return max(1, min(n_blocks, triton.cdiv(sms, batch)))


def mom_adapter_bwd(dy, x, u, rstd, a_w, a_b, b_w, b_b, d_w, d_b, router_w, norm_weight: Optional[torch.Tensor],
                    scale: float):
    """Gradients (dx, dA, da, dB, db, dD, dd_b, drouter_w, dnorm_weight or an empty tensor), each in its
    input's dtype (dx in x's). dy, x (batch, T, d) contiguous; u (batch, T, h) fp32; rstd (batch, T) fp32."""
    batch, t, n, h, hg = _check(x, a_w, b_w)
    groups = h // hg
    dx = torch.empty_like(x)
    block_t, block_n, warps, stages = _blocks(n, x.device, backward=True)
    n_blocks = triton.cdiv(t, block_t) if t else 0
    splits = _splits(batch, n_blocks, x.device)
    progs = batch * splits
    f32 = dict(dtype=torch.float32, device=x.device)
    da_p = torch.zeros(progs, h, n, **f32)
    p_p = torch.zeros(progs, n, h, **f32)
    s_p = torch.zeros(progs, n, **f32)
    dnw_p = torch.zeros(progs if norm_weight is not None else 0, n, **f32)
    dab_p = torch.zeros(progs, h, **f32)
    dw_p = torch.zeros(progs, 2, **f32)
    if x.numel():
        nw = norm_weight if norm_weight is not None else a_b
        _mom_bwd_kernel[(batch, splits)](
            dy, x, u, rstd if norm_weight is not None else u, a_w, a_b, b_w, b_b, d_w, d_b, router_w, nw, dx,
            da_p, p_p, s_p, dnw_p if norm_weight is not None else s_p, dab_p, dw_p,
            t, n, h, hg, n // groups, splits, float(scale),
            HAS_NORM=norm_weight is not None, IEEE=x.dtype == torch.float32, BLOCK_T=block_t, BLOCK_N=block_n,
            HP=_hidden_block(h), num_warps=warps, num_stages=stages,
        )
    w = router_w.float()
    per_sample = p_p.view(batch, splits, n, h).sum(1)                    # (batch, d, h): dy_b^T u_b
    cols = s_p.view(batch, splits, n).sum(1)                             # (batch, d)
    blocks = torch.einsum("bs,bck->sck", w, per_sample).view(2, groups, n // groups, groups, hg)
    grouped = torch.stack([blocks[:, g, :, g] for g in range(groups)], 1).reshape(2, n, hg) * scale
    dcol = (w.t() @ cols) * scale                                        # (2, d): db, dd_b
    d_norm = dnw_p.sum(0).to(norm_weight.dtype) if norm_weight is not None else x.new_empty(0)
    # copies: the outputs of a custom op must not be views of one another
    return (dx, da_p.sum(0).to(a_w.dtype), dab_p.sum(0).to(a_b.dtype), grouped[0].to(b_w.dtype, copy=True),
            dcol[0].to(b_b.dtype, copy=True), grouped[1].to(d_w.dtype, copy=True), dcol[1].to(d_b.dtype, copy=True),
            dw_p.view(batch, splits, 2).sum(1).to(router_w.dtype), d_norm)
