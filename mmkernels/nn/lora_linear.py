"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update (LoRA, the baseline of every PEFT
comparison).

    y = x W^T + b + (alpha / r) * (dropout(x) A^T) B^T       A (r, d_in) kaiming-uniform, B (d_out, r) zeros

W and A are allocated as one (d_out + r, d_in) buffer, so that ops.lora_linear reads x once for both
products (one GEMM). A and B have the base weight's dtype. A `.to(dtype)` of the module separates the two
tensors: the op then runs two GEMMs (the same values). With dropout p > 0 the low-rank path reads
dropout(x), a different tensor: it runs unfused in PyTorch, as in PEFT.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import ops


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0, dropout: float = 0.0,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        d_out, d_in = base.weight.shape
        if not isinstance(rank, int) or not 1 <= rank <= min(d_in, d_out):
            raise ValueError(f"rank: expected an integer in [1, {min(d_in, d_out)}], got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.in_features, self.out_features, self.rank = d_in, d_out, rank
        self.alpha, self.scaling = float(alpha), float(alpha) / rank
        w = base.weight
        buffer = torch.empty(d_out + rank, d_in, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            buffer[:d_out].copy_(w)
            a = torch.empty(rank, d_in, dtype=torch.float32)
            bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)), nn.Linear's and PEFT's A init
            a.uniform_(-bound, bound, generator=generator)
            buffer[d_out:].copy_(a)
        self.weight = nn.Parameter(buffer[:d_out], requires_grad=False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(buffer[d_out:])
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=w.dtype, device=w.device))
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 masters on a 16-bit base: the low-rank path runs in x's dtype, the gradients reach the masters.
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        if self.dropout and self.training:
            y = F.linear(x, self.weight, self.bias)
            low = F.linear(F.linear(F.dropout(x, self.dropout, True), a), b)
            return y + self.scaling * low
        return ops.lora_linear(x, self.weight, a, b, self.scaling, self.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear with W + s B A (computed in fp32, rounded once to W's dtype)."""
        w = self.weight.float() + self.scaling * (self.lora_B.float() @ self.lora_A.float())
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=w.device,
                        dtype=self.weight.dtype)
        out.weight.copy_(w)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"dropout={self.dropout}")
