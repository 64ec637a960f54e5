"""Rotary position embedding, HF "rotate_half" convention: the executable spec.

For a head vector x = [x1, x2] (halves of D) at position p with angles theta_i = p * inv_freq_i:
    rope(x) = [x1 cos - x2 sin,  x2 cos + x1 sin]
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) float32, with optional HF-style rope scaling.

    scaling: None / {"rope_type": "default"}; {"rope_type": "linear", "factor"}; or
    {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
     "original_max_position_embeddings"} (Llama 3.1: long wavelengths divided by `factor`, short ones
    kept, a smooth blend in between).
    """
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: expected a positive even number, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"theta: expected a positive number, got {theta}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        try:
            factor = float(scaling["factor"])
            low = float(scaling["low_freq_factor"])
            high = float(scaling["high_freq_factor"])
            old_len = float(scaling["original_max_position_embeddings"])
        except KeyError as exc:
            raise ValueError(f"rope_scaling: llama3 scaling needs key {exc.args[0]!r}; got {scaling}") from None
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported; expected default, linear or llama3")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """positions (T,) or (B, T) integers -> cos, sin of shape (1 or B, T, D/2), float32."""
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2:
        raise ValueError(f"positions: expected shape (T,) or (B, T), got {tuple(positions.shape)}")
    angles = positions.float().unsqueeze(-1) * inv_freq.to(positions.device).float()
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate x (B, T, heads, D) by the angles of cos/sin (1 or B, T, D/2); by minus them if `inverse`."""
    half = x.shape[-1] // 2
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    c = cos.to(acc).unsqueeze(2)
    s = sin.to(acc).unsqueeze(2)
    if inverse:
        s = -s
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Apply the rotary embedding to q (B, T, H, D) and k (B, T, H_kv, D)."""
    return rotate(q, cos, sin), rotate(k, cos, sin)
