"""Weight quantization for frozen base weights (QPaCA): int8 per output channel, and 4-bit NF4 per block.

int8:  scale[o] = max_i |W[o, i]| / 127,  q = round(W / scale) in [-127, 127],  W ~ q * scale[o].
       Error bound per element: |W - W~| <= scale[o] / 2.
NF4:   the flattened (row-major) weight is cut into blocks of `block` elements, the last one padded with
       zeros when `block` does not divide the size (a block may span rows); absmax[k] = max |W| in block k;
       each element is replaced by the index of the nearest of the 16 NormalFloat4 levels (QLoRA, arXiv
       2305.14314) to W / absmax[k]; two indices per byte, the first element in the low nibble.
       Error bound per element: |W - W~| <= absmax[k] * NF4_MAX_GAP / 2, NF4_MAX_GAP being the widest gap
       between adjacent levels.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

# The 16 NF4 levels: quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero (QLoRA's table).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_MAX_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:]))


def quantize_int8(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight (d_out, d_in) -> (q int8 (d_out, d_in), scale float32 (d_out,)); an all-zero row gets scale 1."""
    w = weight.float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def nf4_blocks(numel: int, block: int) -> int:
    """The number of NF4 blocks (absmax values) of a weight with `numel` elements; it packs into
    nf4_blocks * block / 2 bytes."""
    return -(-numel // block)


def quantize_nf4(weight: torch.Tensor, block: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight (any shape, `block` even) -> (packed uint8 (n_blocks * block / 2,), absmax float32 (n_blocks,)),
    n_blocks = ceil(numel / block). An all-zero block gets absmax 1 (it dequantizes to zeros)."""
    if block < 2 or block % 2:
        raise ValueError(f"block: expected an even block size >= 2, got {block}")
    flat = weight.float().reshape(-1)
    pad = nf4_blocks(flat.numel(), block) * block - flat.numel()
    w = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, block)
    absmax = w.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (w / absmax[:, None]).reshape(-1)
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=w.device)
    # Nearest level: compare with the midpoints between adjacent levels (ties go to the upper level).
    midpoints = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(normed, midpoints, right=True).to(torch.uint8)
    packed = idx[0::2] | (idx[1::2] << 4)
    return packed, absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape, block: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=packed.device)
    idx = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1).long()
    values = levels[idx].reshape(-1, block) * absmax[:, None]
    return values.reshape(-1)[:math.prod(shape)].reshape(shape).to(dtype)
