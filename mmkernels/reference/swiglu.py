"""SwiGLU gating of the LLaMA MLP: out = silu(gate) * up (computed in float32, cast back)."""

from __future__ import annotations

from typing import Tuple

import torch


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g = gate.to(_acc(gate))
    return (g * torch.sigmoid(g) * up.to(g.dtype)).to(gate.dtype)


def swiglu_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """d/dgate = dout * up * sig(g) * (1 + g * (1 - sig(g))),  d/dup = dout * silu(g)."""
    acc = _acc(gate)
    g, u, d = gate.to(acc), up.to(acc), dout.to(acc)
    sig = torch.sigmoid(g)
    dgate = d * u * sig * (1 + g * (1 - sig))
    dup = d * g * sig
    return dgate.to(gate.dtype), dup.to(up.dtype)
