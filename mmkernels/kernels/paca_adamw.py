"""Triton kernel: the AdamW step of a PaCA delta fused with the sync of its weight columns.

One program per (BLOCK_N x BLOCK_R) tile of (o, j): it reads delta, grad, exp_avg, exp_avg_sq and the kept
original columns once, writes delta and the two states back and writes W[o, idx[j]] = orig + s delta in W's
dtype. All math is fp32, in torch.optim.AdamW's order (see reference/paca_adamw.py):

    p = delta * (1 - lr wd);  m = fma(c, g - m, m | g) (torch's lerp);  v = fma((1 - b2) g, g, b2 v)
    p = p + (-step_size m) / (sqrt(v) / sqrt(bc2) + eps);   W[o, idx[j]] = orig + s p

The scalar coefficients are computed on the host in double and rounded once to fp32, as torch does with its
Python-scalar arguments. Division and square root are the IEEE ones (div_rn, sqrt_rn) and the compiler may
not contract a multiply and an add into an fma (enable_fp_fusion=False): the only fmas are the explicit ones,
those that torch's CPU kernels evaluate too (lerp; addcmul as compiled). Any strides; idx int32 or int64.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl


@triton.jit
def _adamw_sync_kernel(
    W, ORIG, IDX, DELTA, GRAD, M, V, N, R,
    stride_wn, stride_wk, stride_on, stride_or, stride_dn, stride_dr, stride_gn, stride_gr,
    stride_mn, stride_mr, stride_vn, stride_vr,
    decay, lerp_coeff, beta2, one_minus_beta2, bc2_sqrt, eps, neg_step_size, scaling,
    LERP_SMALL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    col_mask = cols < R
    mask = (rows < N)[:, None] & col_mask[None, :]
    r2, c2 = rows[:, None], cols[None, :]

    p = tl.load(DELTA + r2 * stride_dn + c2 * stride_dr, mask=mask, other=0.0)
    g = tl.load(GRAD + r2 * stride_gn + c2 * stride_gr, mask=mask, other=0.0)
    m = tl.load(M + r2 * stride_mn + c2 * stride_mr, mask=mask, other=0.0)
    v = tl.load(V + r2 * stride_vn + c2 * stride_vr, mask=mask, other=0.0)

    p = p * decay
    # torch's lerp(m, g, w): fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)
    if LERP_SMALL:
        m = tl.fma(lerp_coeff, g - m, m)
    else:
        m = tl.fma(lerp_coeff, g - m, g)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)

    tl.store(DELTA + r2 * stride_dn + c2 * stride_dr, p, mask=mask)
    tl.store(M + r2 * stride_mn + c2 * stride_mr, m, mask=mask)
    tl.store(V + r2 * stride_vn + c2 * stride_vr, v, mask=mask)

    dst = tl.load(IDX + cols, mask=col_mask, other=0).to(tl.int64)
    orig = tl.load(ORIG + r2 * stride_on + c2 * stride_or, mask=mask, other=0.0)
    val = orig.to(tl.float32) + scaling * p
    tl.store(W + r2 * stride_wn + dst[None, :] * stride_wk, val.to(W.dtype.element_ty), mask=mask)


def _f32(x: float) -> float:
    """x rounded to the nearest fp32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def adamw_sync(weight: torch.Tensor, orig_cols: torch.Tensor, idx: torch.Tensor, scaling: float,
               delta: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In place: one AdamW step of delta (and exp_avg, exp_avg_sq), then weight[:, idx] = orig + s delta.

    weight (d_out, d_in) fp32/fp16/bf16; orig_cols (d_out, r) in weight's dtype; delta, grad, exp_avg,
    exp_avg_sq (d_out, r) fp32; idx (r,) int32 or int64, distinct; any strides; step >= 1 (already counted)."""
    assert weight.dim() == 2 and idx.dim() == 1 and idx.dtype in (torch.int32, torch.int64)
    n, r = delta.shape
    assert weight.shape[0] == n and idx.shape[0] == r
    for t in (orig_cols, grad, exp_avg, exp_avg_sq):
        assert t.shape == (n, r), (t.shape, (n, r))
    for t in (delta, grad, exp_avg, exp_avg_sq):
        assert t.dtype == torch.float32, t.dtype
    if n == 0 or r == 0:
        return
    # Host scalars exactly as torch.optim.adam._single_tensor_adam forms them (double, then one fp32 rounding).
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    lerp_weight = _f32(1 - beta1)
    lerp_small = abs(lerp_weight) < 0.5
    lerp_coeff = lerp_weight if lerp_small else lerp_weight - 1.0  # exact in fp32 for a weight in [0.5, 1]

    block_r = max(1, min(32, triton.next_power_of_2(r)))
    block_n = max(16, 1024 // block_r)
    grid = (triton.cdiv(n, block_n), triton.cdiv(r, block_r))
    _adamw_sync_kernel[grid](
        weight, orig_cols, idx, delta, grad, exp_avg, exp_avg_sq, n, r,
        weight.stride(0), weight.stride(1), orig_cols.stride(0), orig_cols.stride(1),
        delta.stride(0), delta.stride(1), grad.stride(0), grad.stride(1),
        exp_avg.stride(0), exp_avg.stride(1), exp_avg_sq.stride(0), exp_avg_sq.stride(1),
        _f32(1 - lr * weight_decay), lerp_coeff, _f32(beta2), _f32(1 - beta2), _f32(bias_correction2**0.5),
        _f32(eps), _f32(-(lr / bias_correction1)), _f32(scaling),
        LERP_SMALL=lerp_small, BLOCK_N=block_n, BLOCK_R=block_r, num_warps=4, enable_fp_fusion=False,
    )
