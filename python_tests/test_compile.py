"""The custom ops are opaque to torch.compile: fake impls give shapes, autograd is registered."""

import pytest
import torch

import mmkernels
from mmkernels import ops
import importlib

rms_mod = importlib.import_module("mmkernels.ops.rms_norm")
rope_mod = importlib.import_module("mmkernels.ops.rope")
swiglu_mod = importlib.import_module("mmkernels.ops.swiglu")


def _block(x, w, r, cos, sin, g, u):
    y, h = ops.rms_norm(x, w, 1e-6, residual=r)
    q = y.view(2, 5, 2, 8)
    q2, k2 = ops.rope(q, q, cos, sin)
    return (q2 * k2).sum() + ops.swiglu(g, u).sum() + (h * h).sum()


def _inputs():
    torch.manual_seed(0)
    x, r = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    cos, sin = ops.rope_cos_sin(torch.arange(5), ops.rope_inv_freq(8, 10000.0))
    g, u = torch.randn(3, 7, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    return x, w, r, cos, sin, g, u


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_matches_eager(compiler):
    args = _inputs()
    with mmkernels.use_backend("reference"):
        eager = _block(*args)
        eager_grads = torch.autograd.grad(eager, [a for a in args if a.requires_grad])
        compiled = torch.compile(_block, fullgraph=True, backend=compiler)
        out = compiled(*args)
        grads = torch.autograd.grad(out, [a for a in args if a.requires_grad])
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_opcheck_custom_ops():
    torch.manual_seed(0)
    x, w, r = torch.randn(4, 12), torch.randn(12), torch.randn(4, 12)
    rstd = torch.rand(4) + 0.5
    torch.library.opcheck(rms_mod.rms_norm_fwd, (x.requires_grad_(), w.requires_grad_(), 1e-6, "reference"))
    torch.library.opcheck(rms_mod.add_rms_norm_fwd, (x, r.requires_grad_(), w, 1e-6, "reference"))
    torch.library.opcheck(rms_mod.rms_norm_bwd, (torch.randn(4, 12), x.detach(), w.detach(), rstd, None, "reference"))
    q, k = torch.randn(1, 3, 2, 8, requires_grad=True), torch.randn(1, 3, 1, 8, requires_grad=True)
    cos, sin = ops.rope_cos_sin(torch.arange(3), ops.rope_inv_freq(8, 10000.0))
    torch.library.opcheck(rope_mod.rope_rotate, (q, k, cos, sin, False, "reference"))
    g, u = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    torch.library.opcheck(swiglu_mod.swiglu_fwd, (g, u, "reference"))
    torch.library.opcheck(swiglu_mod.swiglu_bwd, (torch.randn(5, 3), g.detach(), u.detach(), "reference"))


def test_opcheck_v2_epilogue_ops():
    """V2's epilogue ops (scale_bias, and swiglu_scale_bias of the MLP): schema, fake impl, autograd
    registration (triton through the interpreter on CPU, and the reference)."""
    scale_bias_mod = importlib.import_module("mmkernels.ops.scale_bias")
    torch.manual_seed(0)
    y, s, b = (torch.randn(shape, requires_grad=True) for shape in ((6, 5), (5,), (5,)))
    for impl in ("reference", "triton"):
        for out_dtype in (torch.float32, torch.float16):
            torch.library.opcheck(scale_bias_mod.scale_bias_fwd, (y, s, b, out_dtype, impl))
        torch.library.opcheck(scale_bias_mod.scale_bias_bwd,
                              (torch.randn(6, 5), y.detach(), s.detach(), b.detach(), impl))
    g, u = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    vectors = [torch.randn(5, requires_grad=True) for _ in range(4)]
    for impl in ("reference", "triton"):
        torch.library.opcheck(swiglu_mod.swiglu_scale_bias_fwd, (g, u, *vectors, impl))
        torch.library.opcheck(swiglu_mod.swiglu_scale_bias_bwd,
                              (torch.randn(6, 5), g.detach(), u.detach(), *(v.detach() for v in vectors), impl))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_fullgraph_compile_of_the_v2_mlp(compiler):
    """models.llama.MLP with output-form ScaleBiasLinears (the fused swiglu epilogue and the down
    projection's scale_bias op) compiles as one graph and matches eager."""
    from torch import nn

    from mmkernels.models.llama import MLP
    from mmkernels.nn import ScaleBiasLinear

    torch.manual_seed(0)
    mlp = MLP.__new__(MLP)
    nn.Module.__init__(mlp)
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = (ScaleBiasLinear(nn.Linear(a, b, bias=False))
                                                 for a, b in ((8, 12), (8, 12), (12, 8)))
    with torch.no_grad():
        for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            layer.scale.uniform_(0.5, 1.5)
            layer.bias.normal_()
    x = torch.randn(3, 4, 8, requires_grad=True)
    params = [x, *(p for p in mlp.parameters() if p.requires_grad)]
    with mmkernels.use_backend("reference"):
        eager = mlp(x).square().sum()
        eager_grads = torch.autograd.grad(eager, params)
        out = torch.compile(lambda t: mlp(t).square().sum(), fullgraph=True, backend=compiler)(x)
        grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)
