"""Hypernetworks that generate per-sample expert weights, and the dynamic expert built on them (HyperLLaVA,
METHODS.md section 4).

HyperNetwork, guidance (B, guidance_dim) -> K (B, out_rows, out_cols):
    e = E(guidance) = W_e rms(guidance) + b_e                        (B, embed_dim)
    w = (W1 e + B1) reshaped, times W2, + B2                          the dynamic part, rank <= `rank`
    K = w + b_static                                                  "static expert + dynamic shift"
rms(g) = g / sqrt(mean(g^2) + eps) has no parameters: LLM hidden states carry a few huge channels, and
without it the generated weights would scale with the guidance's norm.
Factorisation: with n = min(out_rows, out_cols) (the small side, e.g. the bottleneck) and N the large side,
W1 e + B1 has n * rank values, reshaped to (n, rank), and W2 is (rank, N); B2 is a (N,) bias shared by the
n rows. Parameters: guidance_dim * embed_dim + n * rank * (embed_dim + 1) + rank * N + N + out_rows * out_cols,
e.g. ~0.1M of dynamic part for (4096 x 32) beside the 131k static weight.
Init: W2 and B2 start at zero, so the dynamic part is exactly 0 and training starts at the static expert
(W1 ~ N(0, 1/embed_dim) makes W2's first gradients non-zero, as LoRA's A does for B). b_static is
kaiming-uniform like nn.Linear ("kaiming") or zero ("zeros").

DynamicExpert(d, bottleneck, guidance_dim): two hypernetworks (down (d_in, 2h or h), up (h, d_out)) and
ops.dynamic_expert: y = residual + act(x K_down) K_up. The up static weight is zero-initialised, so at
init the expert outputs exactly 0 and a model with it installed is exactly the base model.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.ops.dynamic_expert import ACTIVATIONS, dynamic_expert

__all__ = ["DynamicExpert", "HyperNetwork"]


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return value


class HyperNetwork(nn.Module):
    """guidance (B, guidance_dim) -> per-sample weights (B, out_rows, out_cols) = dynamic(guidance) + static.

    Parameters live in the dtype given (float32 by default, as trainable masters); the guidance is cast to it.
    """

    def __init__(self, guidance_dim: int, out_rows: int, out_cols: int, embed_dim: int = 64, rank: int = 8,
                 static_init: str = "kaiming", eps: float = 1e-6, device=None, dtype=None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.guidance_dim = _positive_int("guidance_dim", guidance_dim)
        self.out_rows = _positive_int("out_rows", out_rows)
        self.out_cols = _positive_int("out_cols", out_cols)
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.rank = _positive_int("rank", rank)
        _checks.one_of("static_init", static_init, ("kaiming", "zeros"))
        self.eps = _checks.positive_float("eps", eps)
        # the generated (n, rank) factor sits on the small side; W2 spans the large side
        self.rows_small = out_rows <= out_cols
        small, large = (out_rows, out_cols) if self.rows_small else (out_cols, out_rows)
        kw = dict(device=device, dtype=dtype if dtype is not None else torch.float32)
        self.embed = nn.Linear(guidance_dim, embed_dim, **kw)
        self.w1 = nn.Parameter(torch.empty(small * rank, embed_dim, **kw))
        self.b1 = nn.Parameter(torch.zeros(small * rank, **kw))
        self.w2 = nn.Parameter(torch.zeros(rank, large, **kw))
        self.b2 = nn.Parameter(torch.zeros(large, **kw))
        self.static = nn.Parameter(torch.zeros(out_rows, out_cols, **kw))
        with torch.no_grad():
            self.embed.weight.copy_(_uniform(self.embed.weight.shape, 1 / math.sqrt(guidance_dim), generator))
            self.embed.bias.zero_()
            self.w1.copy_(torch.randn(self.w1.shape, generator=generator) / math.sqrt(embed_dim))
            if static_init == "kaiming":  # nn.Linear's init with fan_in = out_rows (the input side of x K)
                self.static.copy_(_uniform(self.static.shape, 1 / math.sqrt(out_rows), generator))

    def dynamic(self, guidance: torch.Tensor) -> torch.Tensor:
        """w = (W1 e + B1) W2 + B2: (B, out_rows, out_cols), without the static weight."""
        g = guidance.to(self.w1.dtype)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        e = self.embed(g)
        small = e @ self.w1.t() + self.b1  # (B, n * rank)
        small = small.view(e.shape[0], -1, self.rank)  # (B, n, rank)
        w = small @ self.w2 + self.b2  # (B, n, N)
        return w if self.rows_small else w.transpose(1, 2)

    def forward(self, guidance: torch.Tensor) -> torch.Tensor:
        """K = dynamic(guidance) + static: (B, out_rows, out_cols) in the parameters' dtype."""
        _checks.tensor("guidance", guidance, ndim=2)
        if guidance.shape[1] != self.guidance_dim:
            raise ValueError(f"guidance: expected shape (B, {self.guidance_dim}), got {tuple(guidance.shape)}")
        _checks.same_device(guidance=guidance, static=self.static)
        return self.dynamic(guidance) + self.static

    def extra_repr(self) -> str:
        return (f"guidance_dim={self.guidance_dim}, out=({self.out_rows}, {self.out_cols}), "
                f"embed_dim={self.embed_dim}, rank={self.rank}")


def _uniform(shape, bound: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


class DynamicExpert(nn.Module):
    """E(x) = act(x K_down) K_up with K_down, K_up generated per sample from a guidance vector.

    d: the input width (d_in); d_out defaults to d. forward(x (B, T, d), guidance (B, guidance_dim) or
    weights=(K_down, K_up), residual (B, T, d_out) or None) -> residual + E(x) in x's dtype. `weights` are
    the output of `generate` kept from an earlier call (decoding reuses the prefill's).
    """

    def __init__(self, d: int, bottleneck: int = 16, guidance_dim: Optional[int] = None, activation: str = "swiglu",
                 embed_dim: int = 64, rank: int = 8, d_out: Optional[int] = None, device=None, dtype=None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        _checks.one_of("activation", activation, ACTIVATIONS)
        self.d_in = _positive_int("d", d)
        self.d_out = _positive_int("d_out", d if d_out is None else d_out)
        self.bottleneck = _positive_int("bottleneck", bottleneck)
        self.guidance_dim = _positive_int("guidance_dim", d if guidance_dim is None else guidance_dim)
        self.activation = activation
        down_cols = 2 * bottleneck if activation == "swiglu" else bottleneck
        kw = dict(embed_dim=embed_dim, rank=rank, device=device, dtype=dtype, generator=generator)
        self.down = HyperNetwork(self.guidance_dim, self.d_in, down_cols, static_init="kaiming", **kw)
        self.up = HyperNetwork(self.guidance_dim, bottleneck, self.d_out, static_init="zeros", **kw)

    def generate(self, guidance: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(K_down (B, d_in, 2h or h), K_up (B, h, d_out)) in the parameters' dtype."""
        return self.down(guidance), self.up(guidance)

    def forward(self, x: torch.Tensor, guidance: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
                weights: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if (guidance is None) == (weights is None):
            raise ValueError("guidance, weights: expected exactly one of them, got "
                             f"{'both' if guidance is not None else 'neither'}")
        _checks.tensor("x", x, ndim=3)
        if weights is None:
            weights = self.generate(guidance)
        elif not (isinstance(weights, (tuple, list)) and len(weights) == 2):
            raise TypeError(f"weights: expected a pair (K_down, K_up) from generate(), got {type(weights).__name__}")
        w_down, w_up = (w.to(x.dtype) for w in weights)
        if w_down.shape[0] != x.shape[0]:
            raise ValueError(f"x: expected batch {w_down.shape[0]} (the weights' batch), got shape {tuple(x.shape)}")
        return dynamic_expert(x, w_down, w_up, residual=residual, activation=self.activation)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, bottleneck={self.bottleneck}, "
                f"guidance_dim={self.guidance_dim}, activation={self.activation!r}")
