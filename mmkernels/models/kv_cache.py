"""An explicit, preallocated key/value cache: (B, max_len, H_kv, D) per layer, filled left to right."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch


class KVCache:
    """k[layer], v[layer]: (B, max_len, H_kv, D). One forward of T tokens calls update() once per layer
    (each returns views of positions [0, length + T)) and then advance(T)."""

    def __init__(self, num_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, max_len, n_kv_heads, head_dim)
        self.k: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v: List[torch.Tensor] = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (the same for every sample: padding is on the left)
        # Per-request state of attention prompts (a method's prompt keys/values, computed at the prefill).
        self.prompts: Dict[int, Any] = {}

    def update(self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Store T new positions after the current length; return views of all positions so far."""
        bsz, _, heads, dim = self.k[layer].shape
        want = (bsz, k_new.shape[1], heads, dim)
        if tuple(k_new.shape) != want or tuple(v_new.shape) != want:
            raise ValueError(f"kv_cache: expected k_new and v_new of shape ({bsz}, T, {heads}, {dim}), "
                             f"got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        end = self.length + k_new.shape[1]
        if end > self.max_len:
            raise ValueError(f"kv_cache: {end} positions exceed the cache length max_len={self.max_len}")
        self.k[layer][:, self.length:end] = k_new
        self.v[layer][:, self.length:end] = v_new
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer stored its n new positions."""
        self.length += n

    def reset(self) -> None:
        self.length = 0
        self.prompts.clear()
