"""Triton kernels of the dynamic expert: y = residual + act(x W_d) W_u with per-sample W_d, W_u.

x (B, T, d_in), w_down (B, d_in, 2h) for swiglu (gate columns, then up columns) or (B, d_in, h), w_up
(B, h, d_out), residual and y (B, T, d_out); all contiguous, one dtype. h <= MAX_BOTTLENECK.

- forward, one kernel, one program per (row block, sample): pre = x W_d accumulated over d_in chunks in
  fp32 (the (BLOCK_T, 2h) accumulator stays in registers), the activation, then y chunk by chunk as
  residual + hidden W_u. x and the residual are read once, y written once; nothing else is stored.
- backward, two kernels:
  rows:    per (row block, sample): recompute pre (reads x) and d hidden = dy W_u^T (reads dy), the
           activation and its derivative, then dx = d pre W_d^T chunk by chunk. It also writes hidden
           (B, T, h) and d pre (B, T, 2h), small (h / d of x), for the weight kernel.
  weights: per (column chunk, sample, token split): d W_d = x^T d pre and d W_u = hidden^T dy over the
           split's tokens in fp32; each split writes its own partial, the partials are summed after:
           deterministic, no atomics. Each program owns a column chunk, so the (d, 3h) weight gradient
           never has to sit in one program's registers, and no per-row-block partial of size d x 3h is kept.
Row offsets are int64 (B * T * d can exceed 2**31).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mmkernels.kernels import _device

MAX_BOTTLENECK = 128
ACT_CODES = {"swiglu": 0, "gelu": 1, "silu": 2, "relu": 3}


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:  # fp32 inputs: full fp32 products, not TF32 (torch.bmm's fp32 default)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _activate(a, b, ACT: tl.constexpr):
    """hidden from the pre-activations; b (the up branch) is read by swiglu only."""
    if ACT == 0:
        out = a * tl.sigmoid(a) * b
    elif ACT == 1:
        out = 0.5 * a * (1.0 + tl.math.erf(a * 0.7071067811865476))
    elif ACT == 2:
        out = a * tl.sigmoid(a)
    else:
        out = tl.maximum(a, 0.0)
    return out


@triton.jit
def _activate_bwd(dh, a, b, ACT: tl.constexpr):
    """(d a, d b) from d hidden; d b is zero except for swiglu."""
    db = tl.zeros_like(a)
    if ACT == 0:
        sig = tl.sigmoid(a)
        da = dh * b * sig * (1.0 + a * (1.0 - sig))
        db = dh * a * sig
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        pdf = tl.exp(-0.5 * a * a) * 0.3989422804014327
        da = dh * (cdf + a * pdf)
    elif ACT == 2:
        sig = tl.sigmoid(a)
        da = dh * sig * (1.0 + a * (1.0 - sig))
    else:
        da = tl.where(a > 0.0, dh, 0.0)
    return da, db


@triton.jit
def _pre_activation(x_rows, row_mask, wd, nw, D_IN, H, hc, h_mask, ACT: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr):
    """(x W_a, x W_b) for BLOCK_T rows in fp32; W_b (the up branch) only for swiglu."""
    acc_a = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        xt = tl.load(x_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & h_mask[None, :]
        wa = tl.load(wd + ks[:, None] * nw + hc[None, :], mask=w_mask, other=0.0)
        acc_a = _dot(xt, wa, acc_a, IEEE)
        if ACT == 0:
            wb = tl.load(wd + ks[:, None] * nw + H + hc[None, :], mask=w_mask, other=0.0)
            acc_b = _dot(xt, wb, acc_b, IEEE)
    return acc_a, acc_b


@triton.jit
def _fwd_kernel(
    X, WD, WU, RES, Y, T, D_IN, D_OUT, H,
    HAS_RES: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    hc = tl.arange(0, BLOCK_H)
    h_mask = hc < H
    nw = 2 * H if ACT == 0 else H
    acc_a, acc_b = _pre_activation(X + b * T * D_IN + rows64[:, None] * D_IN, row_mask, WD + b * D_IN * nw, nw,
                                   D_IN, H, hc, h_mask, ACT, BLOCK_T, BLOCK_K, BLOCK_H, IEEE)
    # Rounded to the input dtype before the up product, as the reference does (and the tensor cores need).
    hidden = _activate(acc_a, acc_b, ACT).to(X.dtype.element_ty)
    wu = WU + b * H * D_OUT
    out_off = b * T * D_OUT + rows64[:, None] * D_OUT
    for n0 in range(0, D_OUT, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < D_OUT
        w = tl.load(wu + hc[:, None] * D_OUT + ns[None, :], mask=h_mask[:, None] & n_mask[None, :], other=0.0)
        out = _dot(hidden, w, tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), IEEE)
        mask = row_mask[:, None] & n_mask[None, :]
        if HAS_RES:
            out += tl.load(RES + out_off + ns[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + out_off + ns[None, :], out.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_rows_kernel(
    X, DY, WD, WU, DX, HID, DPRE, T, D_IN, D_OUT, H,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    rows64 = rows.to(tl.int64)
    hc = tl.arange(0, BLOCK_H)
    h_mask = hc < H
    nw = 2 * H if ACT == 0 else H
    wd = WD + b * D_IN * nw
    acc_a, acc_b = _pre_activation(X + b * T * D_IN + rows64[:, None] * D_IN, row_mask, wd, nw,
                                   D_IN, H, hc, h_mask, ACT, BLOCK_T, BLOCK_K, BLOCK_H, IEEE)
    wu = WU + b * H * D_OUT
    dy_rows = DY + b * T * D_OUT + rows64[:, None] * D_OUT
    dh = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for n0 in range(0, D_OUT, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_mask = ns < D_OUT
        dyt = tl.load(dy_rows + ns[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        wu_t = tl.load(wu + hc[None, :] * D_OUT + ns[:, None], mask=n_mask[:, None] & h_mask[None, :], other=0.0)
        dh = _dot(dyt, wu_t, dh, IEEE)
    dtype = X.dtype.element_ty
    hidden = _activate(acc_a, acc_b, ACT).to(dtype)
    da, db = _activate_bwd(dh, acc_a, acc_b, ACT)
    da = da.to(dtype)
    db = db.to(dtype)
    small_mask = row_mask[:, None] & h_mask[None, :]
    tl.store(HID + b * T * H + rows64[:, None] * H + hc[None, :], hidden, mask=small_mask)
    dpre = DPRE + b * T * nw + rows64[:, None] * nw + hc[None, :]
    tl.store(dpre, da, mask=small_mask)
    if ACT == 0:
        tl.store(dpre + H, db, mask=small_mask)
    dx_rows = DX + b * T * D_IN + rows64[:, None] * D_IN
    for k0 in range(0, D_IN, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < D_IN
        w_mask = h_mask[:, None] & k_mask[None, :]
        wa_t = tl.load(wd + ks[None, :] * nw + hc[:, None], mask=w_mask, other=0.0)
        dx = _dot(da, wa_t, tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32), IEEE)
        if ACT == 0:
            wb_t = tl.load(wd + ks[None, :] * nw + H + hc[:, None], mask=w_mask, other=0.0)
            dx = _dot(db, wb_t, dx, IEEE)
        tl.store(dx_rows + ks[None, :], dx.to(DX.dtype.element_ty), mask=row_mask[:, None] & k_mask[None, :])


@triton.jit
def _bwd_weights_kernel(
    X, DY, HID, DPRE, DWD, DWU, B, T, D_IN, D_OUT, H, rows_per_split,
    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr,
):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    in_mask = cs < D_IN
    out_mask = cs < D_OUT
    hc = tl.arange(0, BLOCK_H)
    h_mask = hc < H
    nw = 2 * H if ACT == 0 else H
    x_b = X + b * T * D_IN
    dy_b = DY + b * T * D_OUT
    hid_b = HID + b * T * H
    dpre_b = DPRE + b * T * nw
    acc_a = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    t_start = tl.program_id(2) * rows_per_split
    t_end = tl.minimum(t_start + rows_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_mask = ts < t_end
        ts64 = ts.to(tl.int64)
        x_t = tl.load(x_b + ts64[None, :] * D_IN + cs[:, None], mask=in_mask[:, None] & t_mask[None, :], other=0.0)
        small_mask = t_mask[:, None] & h_mask[None, :]
        da = tl.load(dpre_b + ts64[:, None] * nw + hc[None, :], mask=small_mask, other=0.0)
        acc_a = _dot(x_t, da, acc_a, IEEE)
        if ACT == 0:
            db = tl.load(dpre_b + ts64[:, None] * nw + H + hc[None, :], mask=small_mask, other=0.0)
            acc_b = _dot(x_t, db, acc_b, IEEE)
        hid_t = tl.load(hid_b + ts64[None, :] * H + hc[:, None], mask=h_mask[:, None] & t_mask[None, :], other=0.0)
        dyt = tl.load(dy_b + ts64[:, None] * D_OUT + cs[None, :], mask=t_mask[:, None] & out_mask[None, :], other=0.0)
        acc_u = _dot(hid_t, dyt, acc_u, IEEE)
    dwd = DWD + (split * B + b) * D_IN * nw + cs[:, None] * nw + hc[None, :]
    wd_mask = in_mask[:, None] & h_mask[None, :]
    tl.store(dwd, acc_a, mask=wd_mask)
    if ACT == 0:
        tl.store(dwd + H, acc_b, mask=wd_mask)
    tl.store(DWU + (split * B + b) * H * D_OUT + hc[:, None] * D_OUT + cs[None, :], acc_u,
             mask=h_mask[:, None] & out_mask[None, :])


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _blocks(t: int, d_in: int, d_out: int, h: int) -> Tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_K, BLOCK_N, BLOCK_H); tl.dot needs every block dim >= 16."""
    return _pow2(t, 16, 64), _pow2(d_in, 16, 64), _pow2(d_out, 16, 64), _pow2(h, 16, MAX_BOTTLENECK)


def _check(x, w_down, w_up, activation):
    assert activation in ACT_CODES, activation
    assert x.is_contiguous() and w_down.is_contiguous() and w_up.is_contiguous()
    assert x.dtype == w_down.dtype == w_up.dtype
    bsz, t, d_in = x.shape
    h, d_out = w_up.shape[1:]
    assert h <= MAX_BOTTLENECK, h
    assert w_down.shape == (bsz, d_in, 2 * h if activation == "swiglu" else h), (w_down.shape, h)
    assert w_up.shape[0] == bsz
    return bsz, t, d_in, d_out, h


def dynamic_expert_fwd(x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, residual: Optional[torch.Tensor],
                       activation: str) -> torch.Tensor:
    """y (B, T, d_out) in x's dtype."""
    bsz, t, d_in, d_out, h = _check(x, w_down, w_up, activation)
    y = torch.empty(bsz, t, d_out, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.is_contiguous() and residual.shape == y.shape and residual.dtype == x.dtype
    if y.numel() == 0:
        return y
    block_t, block_k, block_n, block_h = _blocks(t, d_in, d_out, h)
    grid = (triton.cdiv(t, block_t), bsz)
    _fwd_kernel[grid](
        x, w_down, w_up, residual if residual is not None else y, y, t, d_in, d_out, h,
        HAS_RES=residual is not None, ACT=ACT_CODES[activation], BLOCK_T=block_t, BLOCK_K=block_k,
        BLOCK_N=block_n, BLOCK_H=block_h, IEEE=x.dtype == torch.float32, num_warps=4,
    )
    return y


def _num_splits(col_programs: int, row_blocks: int, device: torch.device) -> int:
    """Token splits of the weight kernel: enough programs to fill the GPU about twice; one on CPU (the
    interpreter runs programs serially)."""
    if not _device.compiled(device):
        return 1
    sms = _device.sm_count(device)
    return max(1, min(row_blocks, triton.cdiv(2 * sms, max(col_programs, 1))))


def dynamic_expert_bwd(dy: torch.Tensor, x: torch.Tensor, w_down: torch.Tensor, w_up: torch.Tensor, activation: str,
                       splits: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d w_down, d w_up) in the input dtype; the weight gradients are summed over tokens in fp32.

    splits: token splits of the weight reduction (default: by device); the result does not depend on it
    beyond fp32 summation order."""
    bsz, t, d_in, d_out, h = _check(x, w_down, w_up, activation)
    assert dy.is_contiguous() and dy.shape == (bsz, t, d_out) and dy.dtype == x.dtype
    nw = w_down.shape[2]
    dx = torch.empty_like(x)
    if bsz == 0 or t == 0:
        return dx, torch.zeros_like(w_down), torch.zeros_like(w_up)
    block_t, block_k, block_n, block_h = _blocks(t, d_in, d_out, h)
    hidden = torch.empty(bsz, t, h, dtype=x.dtype, device=x.device)
    dpre = torch.empty(bsz, t, nw, dtype=x.dtype, device=x.device)
    ieee = x.dtype == torch.float32
    act = ACT_CODES[activation]
    _bwd_rows_kernel[(triton.cdiv(t, block_t), bsz)](
        x, dy, w_down, w_up, dx, hidden, dpre, t, d_in, d_out, h,
        ACT=act, BLOCK_T=block_t, BLOCK_K=block_k, BLOCK_N=block_n, BLOCK_H=block_h, IEEE=ieee, num_warps=4,
    )
    block_c = _pow2(max(d_in, d_out), 16, 64)
    col_programs = triton.cdiv(max(d_in, d_out), block_c)
    row_blocks = triton.cdiv(t, block_t)
    if splits is None:
        splits = _num_splits(col_programs * bsz, row_blocks, x.device)
    splits = max(1, min(int(splits), row_blocks))
    rows_per_split = triton.cdiv(row_blocks, splits) * block_t
    splits = triton.cdiv(t, rows_per_split)
    d_wd = torch.empty(splits, bsz, d_in, nw, dtype=torch.float32, device=x.device)
    d_wu = torch.empty(splits, bsz, h, d_out, dtype=torch.float32, device=x.device)
    _bwd_weights_kernel[(col_programs, bsz, splits)](
        x, dy, hidden, dpre, d_wd, d_wu, bsz, t, d_in, d_out, h, rows_per_split,
        ACT=act, BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_H=block_h, IEEE=ieee, num_warps=4,
    )
    if splits > 1:
        d_wd, d_wu = d_wd.sum(0), d_wu.sum(0)
    else:
        d_wd, d_wu = d_wd[0], d_wu[0]
    return dx, d_wd.to(w_down.dtype), d_wu.to(w_up.dtype)
