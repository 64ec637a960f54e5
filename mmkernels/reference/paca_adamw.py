"""One AdamW step on a PaCA delta, followed by the column sync of its weight (the fused step's oracle).

    delta *= 1 - lr wd;   m = lerp(m, g, 1 - b1);   v = b2 v + (1 - b2) g^2
    delta -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)          t: the step, already incremented
    W[:, I] = orig + s delta        (fp32 math, rounded once to W's dtype; see reference.paca.synced_columns)

The update is torch.optim.AdamW's single-tensor path (foreach=False, amsgrad=False, maximize=False) op for op,
so on the same device it gives bit-identical delta, exp_avg and exp_avg_sq.
"""

from __future__ import annotations

import torch

from mmkernels.reference.paca import sync_columns


def adamw_sync_step(weight: torch.Tensor, orig_cols: torch.Tensor, idx: torch.Tensor, scaling: float,
                    delta: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """In place: weight (d_out, d_in), delta, exp_avg, exp_avg_sq (d_out, r). grad (d_out, r) in delta's
    dtype; orig_cols (d_out, r) in weight's dtype; idx (r,) int; step >= 1 (the count including this step)."""
    with torch.no_grad():
        # Same statements, same order and same scalar types as torch.optim.adam._single_tensor_adam.
        if weight_decay != 0:
            delta.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        delta.addcdiv_(exp_avg, denom, value=-step_size)
        sync_columns(weight, orig_cols, delta, idx, scaling)
