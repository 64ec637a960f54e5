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


def swiglu_scale_bias(gate: torch.Tensor, up: torch.Tensor, gate_scale: torch.Tensor, gate_bias: torch.Tensor,
                      up_scale: torch.Tensor, up_bias: torch.Tensor) -> torch.Tensor:
    """silu(s_g (gate + b_g)) * s_u (up + b_u) over the last dim's channels, in float32 (float64 for float64
    gate), cast to gate's dtype."""
    acc = _acc(gate)
    g = (gate.to(acc) + gate_bias.to(acc)) * gate_scale.to(acc)
    u = (up.to(acc) + up_bias.to(acc)) * up_scale.to(acc)
    return (g * torch.sigmoid(g) * u).to(gate.dtype)


def swiglu_scale_bias_backward(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scale: torch.Tensor,
                               gate_bias: torch.Tensor, up_scale: torch.Tensor, up_bias: torch.Tensor
                               ) -> Tuple[torch.Tensor, ...]:
    """(d gate, d up in their dtypes; d s_g, d b_g, d s_u, d b_u in float32 (float64), summed over the rows)."""
    acc = _acc(gate)
    pre_g, pre_u = gate.to(acc) + gate_bias.to(acc), up.to(acc) + up_bias.to(acc)
    s_g, s_u = gate_scale.to(acc), up_scale.to(acc)
    dg_act, du_act = swiglu_backward(dout.to(acc), pre_g * s_g, pre_u * s_u)
    rows = tuple(range(gate.dim() - 1))
    return ((dg_act * s_g).to(gate.dtype), (du_act * s_u).to(up.dtype), (dg_act * pre_g).sum(rows),
            (dg_act * s_g).sum(rows), (du_act * pre_u).sum(rows), (du_act * s_u).sum(rows))
