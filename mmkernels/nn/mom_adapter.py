"""MoMAdapter: LaVIN's mixture-of-modality adapter with its router, as an nn.Module on ops.mom_adapter.

    w = softmax((W_r t + b_r) / tau)                     t: the routing token's state (batch, d)
    y = x + s * (w0 (B u + b) + w1 (D u + d_b)),   u = x A^T + a

Parameters (LaVIN's RepAdapter_Router names in brackets; the kernel axis of its 1x1 convolutions dropped):
weight_a (h, d) [conv_A.weight], bias_a (h,) [conv_A.bias], weight_b / weight_d (d, h/G) [conv_B.weight,
conv_D.weight, grouped: output channel c of group c // (d/G) reads u[g h/G : (g+1) h/G]], bias_b / bias_d (d,),
router = nn.Linear(d, 2) [expert_weights]. Init as LaVIN: A xavier-uniform, everything else of the adapter
zero, so a new adapter is the identity.

Dropout on u (LaVIN trains with 0.1): the fused kernel has none. Rule: in training mode with dropout > 0 the
module runs the plain-PyTorch formula (reference.mom_adapter with dropout) instead of the fused op; when the
triton backend is forced, that raises instead of silently dropping the dropout.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from mmkernels import _checks, backend
from mmkernels.ops.mom_adapter import OP, mom_adapter
from mmkernels.reference import mom_adapter as ref


class MoMAdapter(nn.Module):
    def __init__(self, d: int, hidden: int = 8, groups: int = 2, scale: float = 1.0, tau: float = 10.0,
                 dropout: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        for name, value in (("d", d), ("hidden", hidden), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if hidden % groups:
            raise ValueError(f"hidden: expected a multiple of groups ({groups}), got {hidden}")
        if d % groups:
            raise ValueError(f"d: expected a multiple of groups ({groups}), got {d}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout!r}")
        self.d, self.hidden, self.groups = d, hidden, groups
        self.scale = _checks.number("scale", scale)
        self.tau = _checks.positive_float("tau", tau)
        self.dropout = float(dropout)
        kw = dict(device=device, dtype=dtype)
        self.weight_a = nn.Parameter(torch.empty(hidden, d, **kw))
        self.bias_a = nn.Parameter(torch.zeros(hidden, **kw))
        self.weight_b = nn.Parameter(torch.zeros(d, hidden // groups, **kw))
        self.bias_b = nn.Parameter(torch.zeros(d, **kw))
        self.weight_d = nn.Parameter(torch.zeros(d, hidden // groups, **kw))
        self.bias_d = nn.Parameter(torch.zeros(d, **kw))
        self.router = nn.Linear(d, 2, **kw)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.weight_a.device.type == "meta":
            return
        # xavier-uniform of the (h, d, 1) convolution weight: fans d and h
        bound = math.sqrt(6.0 / (self.d + self.hidden))
        self.weight_a.uniform_(-bound, bound)
        for p in (self.bias_a, self.weight_b, self.bias_b, self.weight_d, self.bias_d):
            p.zero_()
        self.router.reset_parameters()

    def routing_weights(self, router_input: torch.Tensor) -> torch.Tensor:
        """softmax((W_r t + b_r) / tau), computed in float32: (batch, d) -> (batch, 2)."""
        _checks.tensor("router_input", router_input, ndim=2)
        _checks.shape("router_input", router_input, (None, self.d))
        logits = nn.functional.linear(router_input.float(), self.router.weight.float(), self.router.bias.float())
        return torch.softmax(logits / self.tau, dim=-1)

    def _params(self):
        return (self.weight_a, self.bias_a, self.weight_b, self.bias_b, self.weight_d, self.bias_d)

    def forward(self, x: torch.Tensor, router_input: Optional[torch.Tensor] = None,
                router_w: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
                eps: float = 1e-6) -> torch.Tensor:
        """x (batch, T, d) -> (batch, T, d). Exactly one of router_input (batch, d), the routing token's
        state, or router_w (batch, 2), weights computed elsewhere (e.g. cached at the prefill). norm_weight:
        fuse the preceding RMSNorm (x is then the un-normalised input; see ops.mom_adapter)."""
        if (router_input is None) == (router_w is None):
            raise ValueError("router_input, router_w: expected exactly one of them, got "
                             f"{'both' if router_w is not None else 'neither'}")
        if router_w is None:
            router_w = self.routing_weights(router_input)
        if self.training and self.dropout > 0:
            if backend.forced_backend() == "triton":
                raise ValueError(f"dropout: the triton mom_adapter kernel has no dropout; got dropout="
                                 f"{self.dropout} in training mode (use dropout=0 or the reference backend)")
            _checks.tensor("x", x, ndim=3)
            backend.select(OP, x.device)  # the usual backend errors, although the reference math runs
            return ref.mom_adapter(x, *self._params(), router_w, self.scale, norm_weight, eps, self.dropout, True)
        return mom_adapter(x, *self._params(), router_w, self.scale, norm_weight, eps)

    # ------------------------------------------------------------------------------------------------
    # Re-parameterisation
    # ------------------------------------------------------------------------------------------------

    def dense_up(self, router_w: torch.Tensor) -> torch.Tensor:
        """U = w0 B_full + w1 D_full (d, h) for one routing-weight vector (2,), in float64."""
        w = router_w.detach().double().reshape(2)
        return (w[0] * ref.expand_grouped(self.weight_b.detach().double(), self.hidden)
                + w[1] * ref.expand_grouped(self.weight_d.detach().double(), self.hidden))

    @torch.no_grad()
    def merge_into(self, linears: Iterable[nn.Linear], router_w: torch.Tensor) -> List[nn.Linear]:
        """Fold the adapter, for ONE routing-weight vector (2,), into the linear layers that read its output:
        W' = W (I + s U A), b' = b + W (s U a + s c) with U = w0 B_full + w1 D_full, c = w0 b + w1 d_b.
        Returns new nn.Linear layers (with a bias) in each input layer's dtype and device; computed in float64."""
        w = router_w.detach().double().reshape(2)
        s = self.scale
        u_mat = self.dense_up(w)                                         # (d, h)
        c = w[0] * self.bias_b.double() + w[1] * self.bias_d.double()
        core = s * (u_mat @ self.weight_a.double())                      # (d, d): x_hat -> adapter output
        shift = s * (u_mat @ self.bias_a.double() + c)                   # (d,)
        out = []
        for lin in linears:
            if not isinstance(lin, nn.Linear) or lin.in_features != self.d:
                raise ValueError(f"linears: expected nn.Linear layers with in_features={self.d}, got {lin!r}")
            wt = lin.weight.double()
            merged = nn.Linear(self.d, lin.out_features, bias=True, device=lin.weight.device, dtype=lin.weight.dtype)
            merged.weight.copy_(wt + wt @ core)
            bias = wt @ shift + (lin.bias.double() if lin.bias is not None else 0.0)
            merged.bias.copy_(bias)
            merged.requires_grad_(lin.weight.requires_grad)
            out.append(merged)
        return out

    # ------------------------------------------------------------------------------------------------
    # LaVIN checkpoints
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_lavin_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load one RepAdapter_Router's state dict (conv_A/conv_B/conv_D weight and bias, expert_weights)."""
        pairs = {"conv_A.weight": self.weight_a, "conv_A.bias": self.bias_a, "conv_B.weight": self.weight_b,
                 "conv_B.bias": self.bias_b, "conv_D.weight": self.weight_d, "conv_D.bias": self.bias_d,
                 "expert_weights.weight": self.router.weight, "expert_weights.bias": self.router.bias}
        missing = sorted(set(pairs) - set(state))
        if missing:
            raise ValueError(f"state: missing {missing}")
        for key, p in pairs.items():
            value = state[key]
            if value.dim() == 3:
                value = value[..., 0]  # the kernel axis of the 1x1 convolution
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"state: {key} has shape {tuple(state[key].shape)}, expected {tuple(p.shape)} "
                                 "(plus a trailing kernel axis of 1 for the convolutions)")
            p.copy_(value)

    def extra_repr(self) -> str:
        return (f"d={self.d}, hidden={self.hidden}, groups={self.groups}, scale={self.scale}, tau={self.tau}, "
                f"dropout={self.dropout}")
