"""Triton kernels of the chunked linear + cross-entropy.

`_ce_chunk_kernel`: one program per row of a chunk's logits buffer (rows, V). Pass 1 reads the row once
and keeps the running max m and sum s of exp(z - m) in fp32 (online logsumexp), plus sum z for label
smoothing; pass 2 reads it again and overwrites it in place with d loss / d z =
softmax(z) - (1 - eps) onehot(t) - eps / V (times the row's scale; zero on ignored rows). The scalar
running max is finite after the first block (every block holds at least one column), so no NaN arises from
exp(-inf - -inf).

`_scale_cast_kernel`: out = (src * s) in fp32, cast to out's dtype, s read from a device scalar (no host
sync): applies 1/n of "mean" and the incoming gradient to the gradients the forward accumulated.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK_V_MAX = 4096  # vocabulary columns per loop step (a module constant so tests can force many steps)


@triton.jit
def _ce_chunk_kernel(
    LOGITS, TARGET, LOSS, ROW_SCALE,
    stride_row, V, ignore_index, one_minus_eps, eps_over_v,
    HAS_SMOOTHING: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    t = tl.load(TARGET + row)
    valid = t != ignore_index
    cols0 = tl.arange(0, BLOCK_V)

    m = float("-inf")
    s = 0.0
    zsum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        mask = cols < V
        z = tl.load(ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)
    # Read before pass 2 overwrites the row. Ignored rows may carry any target: no load for them.
    z_t = tl.load(ptr + t, mask=valid, other=0.0).to(tl.float32)
    loss = lse - one_minus_eps * z_t
    if HAS_SMOOTHING:
        loss -= eps_over_v * zsum
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))

    if WRITE_GRAD:
        scale = tl.where(valid, 1.0, 0.0)
        if HAS_ROW_SCALE:
            scale = scale * tl.load(ROW_SCALE + row).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(z - lse)
            if HAS_SMOOTHING:
                g -= eps_over_v
            g = tl.where(cols == t, g - one_minus_eps, g) * scale
            tl.store(ptr + cols, g.to(LOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _scale_cast_kernel(SRC, OUT, S, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(S).to(tl.float32)
    v = tl.load(SRC + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (v * s).to(OUT.dtype.element_ty), mask=mask)


def chunk_loss_and_grad_(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, ignore_index: int,
                         label_smoothing: float, write_grad: bool, row_scale: Optional[torch.Tensor]) -> None:
    """The kernel launch with reference.linear_cross_entropy.chunk_loss_and_grad_'s contract: logits (rows, V)
    with unit column stride, overwritten in place when write_grad; loss (rows,) float32; target (rows,) int64;
    row_scale (rows,) or None."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = min(BLOCK_V_MAX, triton.next_power_of_2(vocab))
    warps = 8 if block >= 2048 else 4
    rs = row_scale if row_scale is not None else loss
    _ce_chunk_kernel[(rows,)](
        logits, target, loss, rs,
        logits.stride(0), vocab, ignore_index, 1.0 - label_smoothing, label_smoothing / vocab,
        HAS_SMOOTHING=label_smoothing != 0.0, HAS_ROW_SCALE=row_scale is not None, WRITE_GRAD=write_grad,
        BLOCK_V=block, num_warps=warps,
    )


def scale_grad(g: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(g * scale) computed in fp32, returned in dtype; g contiguous, scale a 0-dim device tensor."""
    out = torch.empty(g.shape, dtype=dtype, device=g.device)
    n = g.numel()
    if n:
        block = 1024
        _scale_cast_kernel[(triton.cdiv(n, block),)](g, out, scale, n, BLOCK=block, num_warps=4)
    return out
