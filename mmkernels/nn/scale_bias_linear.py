"""Bias/scale tuning of a frozen linear layer (LLaMA-Adapter V2).

    form="output" (the paper):   y = s * (W x + b0 + b)      s, b: (out_features,)
    form="input"  (65B chat code): y = W (s * x) + b0 + b     s: (in_features,), b: (out_features,)

W and its original bias b0 stay frozen; s starts at 1 and b at 0, so the layer starts as the base layer.
`merge()` folds s and b into a plain nn.Linear for inference:
    output form: W' = diag(s) W, b' = s * (b0 + b);   input form: W' = W diag(s), b' = b0 + b.
The GEMM is cuBLAS's (F.linear); the elementwise work around it is ops.scale_bias, one kernel pass each in
float32, rounded once to x's dtype (autograd's chain of upcast, add, multiply and downcast made four float32
round trips through memory, forward and backward): (W x + b) * s for the output form; x * s before the GEMM
and + b after it for the input form.

Memory: the scale's gradient needs the tensor it multiplies, W x (output form) or x (input form). Each form
saves that tensor once, in x's dtype, as the GEMM produced or received it; the float32 epilogue is recomputed
from it in the backward. (Left to autograd, the float32 product would keep its float32 operand: twice the
bytes, and with the input form one float32 copy of x per layer reading it, where q, k and v share one x.)
The frozen GEMM saves only W, which is a parameter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import _checks, ops

FORMS = ("output", "input")


class ScaleBiasLinear(nn.Module):
    def __init__(self, base: nn.Linear, form: str = "output") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        _checks.one_of("form", form, FORMS)
        self.form = form
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.base_bias = base.bias
        if self.base_bias is not None:
            self.base_bias.requires_grad_(False)
        p = dict(dtype=torch.float32, device=base.weight.device)  # trainable parameters in fp32
        self.scale = nn.Parameter(torch.ones(self.out_features if form == "output" else self.in_features, **p))
        self.bias = nn.Parameter(torch.zeros(self.out_features, **p))

    def _bias_total(self) -> torch.Tensor:
        return self.bias if self.base_bias is None else self.bias + self.base_bias.to(self.bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dim {self.in_features}, got {tuple(x.shape)}")
        if self.form == "output":
            return self.epilogue(F.linear(x, self.weight), x.dtype)
        y = F.linear(ops.scale_bias(x, self.scale), self.weight)  # x * s, saving x for the scale's gradient
        unit = torch.ones(self.out_features, dtype=torch.float32, device=y.device)  # frozen: nothing saved
        return ops.scale_bias(y, unit, self._bias_total(), out_dtype=x.dtype)

    def epilogue(self, y: torch.Tensor, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Output form: (y + b0 + b) * s for y = W x (F.linear(x, layer.weight)), as out_dtype (forward's: x's;
        default y's): forward(x) in two steps, so that a caller can keep y and recompute the rest
        (models.llama.Attention.recompute)."""
        if self.form != "output":
            raise ValueError(f"epilogue: expected an output-form layer, got form={self.form!r}")
        return ops.scale_bias(y, self.scale, self._bias_total(), out_dtype=out_dtype)

    @staticmethod
    def fused_swiglu(gate: "ScaleBiasLinear", up: "ScaleBiasLinear", x: torch.Tensor) -> torch.Tensor:
        """silu(gate(x)) * up(x) for two output-form layers, their epilogues inside ops.swiglu_scale_bias: only
        the two GEMM outputs are saved (unfused, each layer saves its GEMM output and swiglu saves the two
        scaled tensors again). The epilogues stay in float32 up to the swiglu (unfused, gate(x) and up(x) are
        rounded to x's dtype first). The two layers are read, not called: forward hooks registered on them do
        not run here (models.llama.MLP takes this path for V2)."""
        for name, layer in (("gate", gate), ("up", up)):
            if not isinstance(layer, ScaleBiasLinear) or layer.form != "output":
                raise ValueError(f"{name}: expected an output-form ScaleBiasLinear, got {layer!r}")
        if x.shape[-1] != gate.in_features:
            raise ValueError(f"x: expected last dim {gate.in_features}, got {tuple(x.shape)}")
        return ops.swiglu_scale_bias(F.linear(x, gate.weight), F.linear(x, up.weight), gate.scale, gate._bias_total(),
                                     up.scale, up._bias_total())

    def folded(self):
        """(W', b') with y = x W'^T + b', in fp32 (or wider), differentiable in s and b: what merge() writes,
        and what a fused lm_head loss multiplies by when the lm_head is tuned."""
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        merged_w = self.scale[:, None] * w if self.form == "output" else w * self.scale[None, :]
        merged_b = self._bias_total() * (self.scale if self.form == "output" else 1.0)
        return merged_w, merged_b

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (up to rounding of W' in W's dtype)."""
        merged_w, merged_b = self.folded()
        w = self.weight
        out = nn.Linear(self.in_features, self.out_features, bias=True, device=w.device, dtype=self.weight.dtype)
        out.weight.copy_(merged_w)
        out.bias.copy_(merged_b)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, form={self.form!r}, base_bias={self.base_bias is not None}"
