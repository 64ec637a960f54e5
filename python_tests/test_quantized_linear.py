"""ops.quantized_linear: the Triton dequantize-in-GEMM kernels (forward and dx) against the dequantized
reference, for int8 and NF4, on odd shapes; the quantization error of the layer against the bound."""

import pytest
import torch

import mmkernels
from mmkernels.ops.quantized_linear import QuantizedWeight, quantized_linear, quantized_linear_bwd, \
    quantized_linear_fwd
from mmkernels.reference import quantize as qz
from _tolerance import assert_close_to_reference


def _weight(d_out, d_in, seed=0):
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.05


CASES = [  # (x shape, d_out, d_in, kind, block)
    ((1, 64), 5, 64, "nf4", 64),
    ((2, 7, 96), 33, 96, "nf4", 32),
    ((3, 40), 7, 40, "nf4", 64),  # d_in below the block: blocks span rows, the last is padded
    ((2, 5, 36), 9, 36, "nf4", 16),  # 16 does not divide 36
    ((19, 48), 24, 48, "int8", 64),
    ((3, 5, 40), 70, 40, "int8", 64),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_the_dequantized_reference(device, case, dtype):
    x_shape, d_out, d_in, kind, block = case
    qw = QuantizedWeight.quantize(_weight(d_out, d_in), kind, block)
    qw = QuantizedWeight(qw.data.to(device), qw.scales.to(device), kind, qw.shape, block)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*x_shape[:-1], d_in, generator=gen, dtype=torch.float64).to(device)
    dy = torch.randn(*x_shape[:-1], d_out, generator=gen, dtype=torch.float64).to(device)

    def run(backend, dt):
        xs = x.detach().to(dt).requires_grad_()
        with mmkernels.use_backend(backend):
            y = quantized_linear(xs, qw)
        y.backward(dy.to(dt))
        return y.detach(), xs.grad

    high, low, ours = run("reference", torch.float64), run("reference", dtype), run("triton", dtype)
    for name, a, lo, hi in zip(("y", "dx"), ours, low, high):
        assert_close_to_reference(a, lo, hi, f"quantized_linear {name} {case} {dtype}")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_layer_error_bound(kind):
    """|x (W - deq W)^T| <= sum_i |x_i| * elementwise bound, per output; NF4 and int8 bounds as documented."""
    w = _weight(16, 128, seed=2)
    qw = QuantizedWeight.quantize(w, kind, 64)
    x = torch.randn(9, 128, dtype=torch.float64)
    err = (quantized_linear(x, qw) - x @ w.t()).abs()
    if kind == "int8":
        elem = (qw.scales.double() / 2)[:, None].expand(16, 128)
    else:
        elem = (qw.scales.double() * qz.NF4_MAX_GAP / 2).repeat_interleave(64).reshape(16, 128)
    assert torch.all(err <= x.abs() @ elem.t() * (1 + 1e-6))
    assert qw.nbytes < w.numel() * (1.1 if kind == "int8" else 0.6)  # ~1 byte / ~0.5 byte per weight


def test_opcheck_and_errors():
    qw = QuantizedWeight.quantize(_weight(8, 64).float(), "nf4", 32)
    x = torch.randn(4, 64)
    args = (qw.data, qw.scales, "nf4", 8, 64, 32, "reference")
    torch.library.opcheck(quantized_linear_fwd, (x, *args))
    torch.library.opcheck(quantized_linear_bwd, (torch.randn(4, 8), *args))
    with pytest.raises(ValueError, match="x: expected last dim 64"):
        quantized_linear(torch.randn(2, 63), qw)
    with pytest.raises(TypeError, match="weight: expected a QuantizedWeight"):
        quantized_linear(x, torch.randn(8, 64))
    with pytest.raises(ValueError, match="kind: expected one of"):
        QuantizedWeight.quantize(torch.randn(8, 64), "fp4")
