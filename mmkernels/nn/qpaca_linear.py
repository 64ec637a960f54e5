"""QPaCALinear: PaCA on a quantized frozen base (QPaCA).

    W0 = W with its r selected columns set to zero, stored as int8 or NF4 (both hold zero exactly)
    y  = x deq(W0)^T + x_I (W[:, I] + s delta)^T + b

The selected columns are kept in the weight's own precision, so the trainable part is exact; the rest of
W carries the quantization error (bounds in reference/quantize.py). The first term runs in the Triton
dequantize-in-GEMM kernels (ops.quantized_linear, forward and dx); the second is an (r)-wide GEMM. The
backward saves x_I (tokens x r) and nothing that scales with d_in; delta's gradient is s dy^T x_I.
Unlike PaCALinear there is no sync step: the columns are formed from delta on every forward (d_out x r).
The quantized base (`qdata`, `qscales`) and the kept columns (`cols`) are frozen parameters rather than
buffers, so that FSDP2 shards them like any frozen weight (it leaves buffers whole on every process).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import ops
from mmkernels.nn.paca_linear import check_base_and_rank
from mmkernels.ops import paca as paca_ops
from mmkernels.ops.quantized_linear import QuantizedWeight


class QPaCALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, scaling: float = 1.0, seed: int = 0, name: str = "",
                 kind: str = "nf4", block: int = 64) -> None:
        super().__init__()
        d_out, d_in = check_base_and_rank(base, r)
        self.in_features, self.out_features, self.r = d_in, d_out, r
        self.scaling, self.seed, self.name = float(scaling), seed, name
        w = base.weight.detach()
        idx = paca_ops.select_columns(d_in, r, paca_ops.layer_seed(name, seed)).to(w.device)
        self.register_buffer("idx", idx)
        self.cols = nn.Parameter(w.index_select(1, idx).clone(), requires_grad=False)
        base_zeroed = w.clone()
        base_zeroed[:, idx] = 0
        qw = QuantizedWeight.quantize(base_zeroed, kind, block)
        self.kind, self.block = qw.kind, qw.block
        self.qdata = nn.Parameter(qw.data, requires_grad=False)
        self.qscales = nn.Parameter(qw.scales, requires_grad=False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros(d_out, r, dtype=torch.float32, device=w.device))

    # The parameters that store the frozen weight (packed codes, scales, kept columns): a parameter count
    # takes them as the quantized_numel = d_out x d_in elements they stand for, as for the replaced nn.Linear.
    quantized_storage = ("qdata", "qscales", "cols")

    @property
    def quantized_numel(self) -> int:
        return self.out_features * self.in_features

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qdata, self.qscales, self.kind, (self.out_features, self.in_features), self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = (self.cols.float() + self.scaling * self.delta).to(x.dtype)
        y = ops.quantized_linear(x, self.qweight) + F.linear(x.index_select(-1, self.idx), cols)
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer computes with: deq(W0) with the columns W[:, I] + s delta."""
        w = self.qweight.dequantize(torch.float32)
        w[:, self.idx] = self.cols.float() + self.scaling * self.delta
        return w.to(dtype)

    @torch.no_grad()
    def merge(self, dtype: torch.dtype = None) -> nn.Linear:
        """A plain nn.Linear with the dequantized, updated weight (in the columns' dtype by default)."""
        dtype = dtype or self.cols.dtype
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.cols.device,
                        dtype=dtype)
        out.weight.copy_(self.dequantized_weight(dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, r={self.r}, scaling={self.scaling}, kind={self.kind!r}, "
                f"block={self.block}, name={self.name!r}")
