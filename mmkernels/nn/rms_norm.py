"""RMSNorm as a drop-in module on mmkernels.ops.rms_norm (weight gradient included)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmkernels import ops


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight; forward(x, residual) also returns h = x + residual."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return ops.rms_norm(x, self.weight, self.eps, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
