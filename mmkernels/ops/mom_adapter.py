"""mom_adapter: LaVIN's mixture-of-modality adapter, optionally fused with the preceding RMSNorm.

    x_hat = x   or   rms_norm(x) * norm_weight         (x: (batch, T, d))
    u     = x_hat A^T + a                              A (h, d), a (h,)
    y     = x_hat + s * (w0 (B u + b) + w1 (D u + d_b))    router_w (batch, 2) = (w0, w1) per sample

B and D (d, h/G) are grouped: output channel c of group g = c // (d/G) reads u[g h/G : (g+1) h/G]. This is
the weight of LaVIN's grouped nn.Conv1d(h, d, 1, groups=G) with its kernel axis dropped (conv_B.weight[:, :, 0]),
so its checkpoints map 1:1 (see nn.MoMAdapter.load_lavin_state_dict).

With norm_weight the attention norm runs inside the op: x_hat stays in float32 (a separate RMSNorm would
round it to x's dtype first) and the backward also returns d norm_weight. Gradients flow to x, every
parameter, router_w (per sample: summed over its tokens) and norm_weight.

Memory: the forward saves x, u (h = 8 fp32 values per token) and, with the norm, rstd (one per token); never y
or x_hat. No dropout here: LaVIN's training dropout on u is served by nn.MoMAdapter (see there).

Backends: triton (one forward kernel, one backward kernel plus a torch reduction of per-program partials)
and reference. The triton kernels take h <= MAX_TRITON_HIDDEN; beyond it the automatic choice runs the
reference and a forced triton backend raises. float64 inputs run the reference math under either backend.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from mmkernels import _checks, backend
from mmkernels.reference import mom_adapter as ref

OP = "mom_adapter"
backend.register_op(OP, ("triton", "reference"))

MAX_TRITON_HIDDEN = 64  # the kernels keep (tokens, h) tiles of u and du in registers


def _kernel_runs(impl: str, x: Tensor) -> bool:
    return impl == "triton" and x.dtype != torch.float64  # the kernels compute in fp32


@torch.library.custom_op("mmkernels::mom_adapter_fwd", mutates_args=())
def mom_adapter_fwd(x: Tensor, A: Tensor, a: Tensor, B: Tensor, b: Tensor, D: Tensor, d_b: Tensor, router_w: Tensor,
                    norm_weight: Optional[Tensor], scale: float, eps: float, impl: str
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """x (batch, T, d) -> (y (batch, T, d), u (batch, T, h) fp32 (fp64 for fp64 x), rstd (batch, T), or an
    empty tensor without the norm)."""
    if _kernel_runs(impl, x):
        from mmkernels.kernels import mom_adapter as kernels

        return kernels.mom_adapter_fwd(x, A, a, B, b, D, d_b, router_w, norm_weight, scale, eps)
    y, u, rstd = ref.mom_adapter_fwd(x, A, a, B, b, D, d_b, router_w, scale, norm_weight, eps)
    return y, u, (rstd if rstd is not None else u.new_empty(0))


@torch.library.custom_op("mmkernels::mom_adapter_bwd", mutates_args=())
def mom_adapter_bwd(dy: Tensor, x: Tensor, u: Tensor, rstd: Tensor, A: Tensor, a: Tensor, B: Tensor, b: Tensor,
                    D: Tensor, d_b: Tensor, router_w: Tensor, norm_weight: Optional[Tensor], scale: float, impl: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, da, dB, db, dD, dd_b, drouter_w, dnorm_weight or an empty tensor), in the inputs' dtypes."""
    if _kernel_runs(impl, x):
        from mmkernels.kernels import mom_adapter as kernels

        return kernels.mom_adapter_bwd(dy, x, u, rstd, A, a, B, b, D, d_b, router_w, norm_weight, scale)
    grads = ref.mom_adapter_backward(dy, x, u, rstd if norm_weight is not None else None, A, a, B, b, D, d_b,
                                     router_w, scale, norm_weight)
    return (*grads[:-1], grads[-1] if grads[-1] is not None else x.new_empty(0))


@mom_adapter_fwd.register_fake
def _(x, A, a, B, b, D, d_b, router_w, norm_weight, scale, eps, impl):
    acc = torch.promote_types(x.dtype, torch.float32)
    batch, t, _ = x.shape
    rstd = x.new_empty((batch, t) if norm_weight is not None else (0,), dtype=acc)
    return torch.empty_like(x), x.new_empty(batch, t, A.shape[0], dtype=acc), rstd


@mom_adapter_bwd.register_fake
def _(dy, x, u, rstd, A, a, B, b, D, d_b, router_w, norm_weight, scale, impl):
    d_norm = torch.empty_like(norm_weight) if norm_weight is not None else x.new_empty(0)
    return (torch.empty_like(x), torch.empty_like(A), torch.empty_like(a), torch.empty_like(B), torch.empty_like(b),
            torch.empty_like(D), torch.empty_like(d_b), torch.empty_like(router_w), d_norm)


def _setup(ctx, inputs, output):
    x, A, a, B, b, D, d_b, router_w, norm_weight, scale, eps, impl = inputs
    _, u, rstd = output
    ctx.save_for_backward(x, u, rstd, A, a, B, b, D, d_b, router_w, norm_weight)
    ctx.scale, ctx.impl = scale, impl


def _backward(ctx, dy, _du, _drstd):
    x, u, rstd, A, a, B, b, D, d_b, router_w, norm_weight = ctx.saved_tensors
    grads = mom_adapter_bwd(dy.contiguous(), x, u, rstd, A, a, B, b, D, d_b, router_w, norm_weight, ctx.scale,
                            ctx.impl)
    d_norm = grads[8] if norm_weight is not None else None
    return (*grads[:8], d_norm, None, None, None)


mom_adapter_fwd.register_autograd(_backward, setup_context=_setup)


def check_params(d: int, A: Tensor, a: Tensor, B: Tensor, b: Tensor, D: Tensor, d_b: Tensor) -> Tuple[int, int]:
    """Validate the adapter parameters for width d; returns (h, groups)."""
    _checks.tensor("A", A, ndim=2)
    h = A.shape[0]
    _checks.shape("A", A, (h, d))
    _checks.tensor("B", B, ndim=2)
    per = B.shape[1]
    if per < 1 or h % per:
        raise ValueError(f"B: expected shape (d, h / groups) with h = {h} (A's rows) divisible by its second dim, "
                         f"got {tuple(B.shape)}")
    groups = h // per
    if d % groups:
        raise ValueError(f"x: expected d divisible by the {groups} groups of B and D, got d = {d}")
    _checks.shape("B", B, (d, per))
    _checks.tensor("D", D, ndim=2)
    _checks.shape("D", D, (d, per))
    for name, t, n in (("a", a, h), ("b", b, d), ("d_b", d_b, d)):
        _checks.tensor(name, t, ndim=1)
        _checks.shape(name, t, (n,))
    _checks.same_dtype(A=A, a=a, B=B, b=b, D=D, d_b=d_b)
    return h, groups


def mom_adapter(x: Tensor, A: Tensor, a: Tensor, B: Tensor, b: Tensor, D: Tensor, d_b: Tensor, router_w: Tensor,
                scale: float = 1.0, norm_weight: Optional[Tensor] = None, eps: float = 1e-6) -> Tensor:
    """y = x_hat + scale * (w0 (B u + b) + w1 (D u + d_b)), u = x_hat A^T + a (see the module docstring).

    x (batch, T, d); A (h, d); a (h,); B, D (d, h/G) grouped; b, d_b (d,); router_w (batch, 2); norm_weight
    (d,) or None. The adapter parameters share one float dtype (fp32 masters with 16-bit x are fine); y has
    x's dtype, every gradient its input's dtype. d must be divisible by the groups G = h / B.shape[1]."""
    _checks.tensor("x", x, ndim=3)
    batch, _, d = x.shape
    h, _ = check_params(d, A, a, B, b, D, d_b)
    _checks.tensor("router_w", router_w, ndim=2)
    _checks.shape("router_w", router_w, (batch, 2))
    if norm_weight is not None:
        _checks.tensor("norm_weight", norm_weight, ndim=1)
        _checks.shape("norm_weight", norm_weight, (d,))
    _checks.same_device(x=x, A=A, a=a, B=B, b=b, D=D, d_b=d_b, router_w=router_w, norm_weight=norm_weight)
    scale = _checks.number("scale", scale)
    eps = _checks.positive_float("eps", eps)
    impl = backend.select(OP, x.device)
    if impl == "triton" and h > MAX_TRITON_HIDDEN:
        if backend.forced_backend() == "triton":
            raise ValueError(f"A: the triton mom_adapter kernels take h <= {MAX_TRITON_HIDDEN} adapter channels, "
                             f"got h = {h}")
        impl = "reference"  # documented rule: the automatic choice skips a kernel that cannot take the shape
    params = [t.contiguous() for t in (A, a, B, b, D, d_b, router_w)]
    y, _, _ = mom_adapter_fwd(x.contiguous(), *params, None if norm_weight is None else norm_weight.contiguous(),
                              scale, eps, impl)
    return y
