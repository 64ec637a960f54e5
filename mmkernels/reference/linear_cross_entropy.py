"""Linear + cross-entropy over a vocabulary, chunked over tokens so the (N x V) logits never exist at once.

    z = x W^T (+ b);  loss_i = lse(z_i) - (1 - eps) z_i[t_i] - (eps / V) sum_j z_ij   (0 where t_i == ignore)
    d loss_i / d z_i = softmax(z_i) - (1 - eps) onehot(t_i) - eps / V
    x (N, d), W (V, d), b (V,), t (N,) int64; eps = label_smoothing (torch.nn.functional.cross_entropy's rule).

`linear_cross_entropy_naive` is the unchunked spec (F.cross_entropy on the full fp32-upcast logits), the
test oracle. `chunked_loss_and_grads` is the algorithm the op runs: per chunk of rows the logits GEMM in
the input dtype, a step that turns the logits buffer in place into d loss / d logits (plain torch here,
one Triton kernel in kernels/), then dx = dlogits W, dW += dlogits^T x, db += sum dlogits. Gradients
are accumulated unscaled (the 1/n of "mean" and the incoming gradient are applied once, afterwards), so
fp16 d logits do not underflow.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# A chunk's logits buffer takes at most this many bytes (unless one row is bigger): at V=128256 in bf16
# that is 1024 rows, at V=32000 4096 rows, large enough for full-speed GEMMs.
CHUNK_LOGITS_BYTES = 256 * 2**20


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(n: int, vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that chunk x vocab logits fit CHUNK_LOGITS_BYTES (multiples of 256 rows when
    that many fit), at most n and at least 1."""
    rows = max(1, CHUNK_LOGITS_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))
    if rows >= 256:
        rows -= rows % 256
    return max(1, min(rows, n))


def linear_cross_entropy_naive(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *,
                               ignore_index: int = -100, reduction: str = "mean",
                               label_smoothing: float = 0.0) -> Tensor:
    """F.cross_entropy(x W^T (+ b), target) on the full logits, upcast to float32 (float64 stays), as
    transformers' causal-LM loss does. Mean over zero counted tokens is 0 (not NaN), like the op."""
    logits = F.linear(x, weight, bias)
    z = logits.reshape(-1, weight.shape[0]).to(acc_dtype(x.dtype))
    t = target.reshape(-1)
    if reduction == "mean":
        total = F.cross_entropy(z, t, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing)
        return total / (t != ignore_index).sum().clamp_min(1)
    loss = F.cross_entropy(z, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    return loss.view(target.shape) if reduction == "none" else loss


def chunk_loss_and_grad_(logits: Tensor, target: Tensor, loss: Tensor, ignore_index: int, label_smoothing: float,
                         write_grad: bool, row_scale: Optional[Tensor]) -> None:
    """One chunk, in place: loss (rows,) <- per-row loss (computed in float32/float64); logits (rows, V) <-
    d loss / d logits (times row_scale per row when given), zero on ignored rows, when write_grad."""
    acc = acc_dtype(logits.dtype)
    z = logits.to(acc)
    vocab = z.shape[1]
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    lse = torch.logsumexp(z, dim=1)
    z_t = z.gather(1, t[:, None]).squeeze(1)
    row = lse - (1.0 - label_smoothing) * z_t
    if label_smoothing:
        row = row - (label_smoothing / vocab) * z.sum(1)
    loss.copy_(torch.where(valid, row, 0.0))
    if not write_grad:
        return
    g = torch.exp(z - lse[:, None])
    if label_smoothing:
        g -= label_smoothing / vocab
    g.scatter_add_(1, t[:, None], torch.full_like(z_t, label_smoothing - 1.0)[:, None])
    scale = valid.to(acc)
    if row_scale is not None:
        scale = scale * row_scale.to(acc)
    logits.copy_(g * scale[:, None])


@functools.lru_cache(maxsize=None)
def _mixed_addmm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.addmm(acc_fp32, a, b, out_dtype=float32, out=acc_fp32) runs and is right for
    fp16/bf16 a, b on this device (cuBLAS on recent torch): an fp32 accumulator without fp32 copies."""
    try:
        a = torch.ones(4, 8, dtype=dtype, device=device)
        acc = torch.full((4, 4), 0.5, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a.t(), out_dtype=torch.float32, out=acc)
        return bool((acc == 8.5).all())
    except Exception:  # not offered by this torch / backend: upcast instead
        return False


def accumulate_matmul_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, acc float32 (float64 for float64 inputs) and a, b in the input dtype. Where cuBLAS
    offers an fp32-output GEMM it is used, else a and b are upcast (chunk-sized copies only)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.device.type == "cuda" and _mixed_addmm_works(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


ChunkStep = Callable[[Tensor, Tensor, Tensor, int, float, bool, Optional[Tensor]], None]


def chunked_loss_and_grads(x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
                           label_smoothing: float, chunk_size: int, need_dx: bool, need_dw: bool, need_db: bool,
                           row_scale: Optional[Tensor] = None, step: ChunkStep = chunk_loss_and_grad_,
                           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """x (N, d) contiguous, target (N,). Returns (loss per row (N,) in float32/float64, dx (N, d) in x's
    dtype, dW (V, d) and db (V,) in float32/float64); a gradient not asked for is an empty tensor.
    Gradients are of sum_i row_scale_i loss_i (row_scale None: all ones). The only (rows x V) tensor is
    one chunk's logits buffer (the plain-torch step adds float32 temporaries of the chunk's size)."""
    n, d = x.shape
    vocab = weight.shape[0]
    acc = acc_dtype(x.dtype)
    write_grad = need_dx or need_dw or need_db
    loss = torch.empty(n, dtype=acc, device=x.device)
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dw = torch.zeros(vocab, d, dtype=acc, device=x.device) if need_dw else x.new_empty(0, dtype=acc)
    db = torch.zeros(vocab, dtype=acc, device=x.device) if need_db else x.new_empty(0, dtype=acc)
    buf = None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        x_c = x[start:stop]
        # One buffer reused by every chunk (the last, shorter chunk uses its head): one allocation.
        if buf is None:
            buf = torch.empty(stop - start, vocab, dtype=x.dtype, device=x.device)
        logits = buf[: stop - start]
        if bias is None:
            torch.mm(x_c, weight.t(), out=logits)
        else:
            torch.addmm(bias, x_c, weight.t(), out=logits)
        step(logits, target[start:stop], loss[start:stop], ignore_index, label_smoothing, write_grad,
             None if row_scale is None else row_scale[start:stop])
        if need_dx:
            torch.mm(logits, weight, out=dx[start:stop])
        if need_dw:
            accumulate_matmul_(dw, logits.t(), x_c)
        if need_db:
            db += logits.sum(0, dtype=acc)
    return loss, dx, dw, db


def scale_grad(g: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """(g * scale) in g's float32/float64 math, cast to dtype; scale a 0-dim tensor."""
    return (g.to(acc_dtype(dtype)) * scale).to(dtype)
