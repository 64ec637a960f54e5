"""PaCALinear: a frozen nn.Linear whose r randomly chosen input columns are trainable (PaCA).

    W_eff[:, I] = W[:, I] + s * delta      I: r sorted columns, chosen once from (name, seed); delta (d_out, r)
    y = x W_eff^T + b

The weight buffer holds W_eff itself: `sync_()` rewrites its r columns from the kept original columns
(`orig_cols`) and delta; call it after every optimizer step (e.g. from `optimizer.register_step_post_hook`).
Until then the forward uses the previous W_eff; a sync between a forward and its backward is an error
(autograd's in-place check). `unmerge()` writes the original columns back, bit-exact.
delta is float32 (the trainable master) and starts at zero, so a fresh layer computes exactly the base layer.
The forward saves only x[..., I] for the backward (ops.paca_linear).
"""

from __future__ import annotations

import torch
from torch import nn

from mmkernels import _checks, ops
from mmkernels.ops import paca as paca_ops


def check_base_and_rank(base: nn.Linear, r: int):
    """(d_out, d_in) of a PaCA layer's base, after checking it is an nn.Linear with 1 <= r <= d_in."""
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
    d_out, d_in = base.weight.shape
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= d_in:
        raise ValueError(f"r: expected an integer in [1, {d_in}] (in_features), got {r!r}")
    return d_out, d_in


def _shard_rows(t, rows: int) -> slice:
    """The rows of a dim-0-sharded DTensor that this process holds: torch.chunk's pieces, as FSDP2 shards."""
    if not hasattr(t, "device_mesh"):
        raise NotImplementedError(f"PaCALinear: expected the weight and delta both DTensors (FSDP2) or neither, "
                                  f"got one {type(t).__name__}")
    mesh = t.device_mesh
    if mesh.ndim != 1 or [type(p).__name__ for p in t.placements] != ["Shard"] or t.placements[0].dim != 0:
        raise NotImplementedError(f"PaCALinear: expected a weight and delta sharded by rows on a 1-D mesh "
                                  f"(FSDP2), got placements {t.placements} on a {mesh.ndim}-D mesh")
    chunk = -(-rows // mesh.size())
    start = min(mesh.get_local_rank() * chunk, rows)
    return slice(start, min(start + chunk, rows))


class PaCALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, scaling: float = 1.0, seed: int = 0, name: str = "") -> None:
        super().__init__()
        d_out, d_in = check_base_and_rank(base, r)
        _checks.number("scaling", scaling)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name: expected a str, got {type(name).__name__}")
        self.in_features, self.out_features, self.r = d_in, d_out, r
        self.scaling, self.seed, self.name = float(scaling), seed, name
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = self.weight.detach()
        idx = paca_ops.select_columns(d_in, r, paca_ops.layer_seed(name, seed)).to(w.device)
        self.register_buffer("idx", idx)
        self.register_buffer("orig_cols", w.index_select(1, idx).clone())
        self.delta = nn.Parameter(torch.zeros(d_out, r, dtype=torch.float32, device=w.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.paca_linear(x, self.weight, self.delta, self.idx, self.scaling, self.bias)

    def local_rows(self):
        """(weight, orig_cols, delta) as plain tensors over the rows this process holds: the whole tensors, or
        under FSDP2 (weight and delta DTensors sharded by rows) the local shards and orig_cols' same rows."""
        weight, delta, orig = self.weight, self.delta, self.orig_cols
        if hasattr(weight, "to_local") or hasattr(delta, "to_local"):
            rows = _shard_rows(weight, self.out_features)
            if _shard_rows(delta, self.out_features) != rows:
                raise NotImplementedError(f"PaCALinear {self.name!r}: weight and delta are sharded differently")
            weight, delta, orig = weight.to_local(), delta.to_local(), orig[rows]
        return weight, orig, delta

    @torch.no_grad()
    def sync_(self) -> "PaCALinear":
        """W[:, I] = orig + s * delta (fp32 math, one rounding to W's dtype), in place. Under FSDP2 (weight and
        delta sharded by rows) each process writes the rows it holds."""
        weight, orig, delta = self.local_rows()
        paca_ops.sync_columns(weight, orig, delta, self.idx, self.scaling)
        return self

    @torch.no_grad()
    def unmerge(self) -> nn.Linear:
        """Write the original columns back (bit-exact) and return a plain nn.Linear over the original weight.

        The returned layer shares this module's weight and bias tensors (no copy; they stay frozen). This
        module then computes the base layer until the next sync_()."""
        self.weight[:, self.idx] = self.orig_cols
        return self._plain(self.weight, self.bias)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Sync, then return a plain nn.Linear holding a copy of W_eff (and of the bias), for export."""
        self.sync_()
        bias = None if self.bias is None else nn.Parameter(self.bias.detach().clone())
        return self._plain(nn.Parameter(self.weight.detach().clone()), bias)

    def _plain(self, weight: nn.Parameter, bias) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        out.weight = weight
        out.bias = bias
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, r={self.r}, scaling={self.scaling}, seed={self.seed}, "
                f"name={self.name!r}, bias={self.bias is not None}")
