import pytest
import torch

import mmkernels
from mmkernels import ops
from mmkernels.reference import rms_norm as ref
from _harness import check_against_reference

# Odd row lengths (not multiples of any block), a single row, and a 3-D input.
SHAPES = [(1, 8), (3, 17), (7, 64), (5, 127), (2, 3, 96), (33, 256)]


def _inputs(shape, device, with_residual, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=gen)).to(device).requires_grad_()
    r = torch.randn(shape, generator=gen).to(device).requires_grad_() if with_residual else None
    return x, w, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_reference(device, shape, dtype, with_residual):
    x, w, r = _inputs(shape, device, with_residual)
    if with_residual:
        fn = lambda x, w, r: ops.rms_norm(x, w, 1e-5, residual=r)  # noqa: E731
        inputs = [x, w, r]
    else:
        fn = lambda x, w: ops.rms_norm(x, w, 1e-5)  # noqa: E731
        inputs = [x, w]
    check_against_reference(fn, inputs, backend="triton", dtype=dtype, name=f"rms_norm{shape}")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 4096), (1, 4095), (333, 8192)])
def test_triton_bf16_gpu(shape):
    x, w, r = _inputs(shape, "cuda", True)
    check_against_reference(
        lambda x, w, r: ops.rms_norm(x, w, 1e-6, residual=r), [x, w, r],
        backend="triton", dtype=torch.bfloat16, name="rms_norm bf16",
    )


def test_reference_matches_autograd_and_hf_formula():
    """The analytic backward of the reference equals autograd through the forward, in float64."""
    torch.manual_seed(0)
    h = torch.randn(6, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    y = ref.rms_norm(h, w, 1e-6)
    # HF LlamaRMSNorm formula, written out.
    expected = w * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    gh, gw = torch.autograd.grad(y, (h, w), dy)
    dh, dw = ref.rms_norm_backward(dy, h.detach(), w.detach(), ref.rms_norm_rstd(h.detach(), 1e-6))
    torch.testing.assert_close(dh, gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dw, gw, rtol=1e-10, atol=1e-12)


def test_residual_output_is_the_sum(device):
    x, w, r = _inputs((4, 40), device, True)
    with mmkernels.use_backend("triton"):
        y, h = ops.rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, ops.rms_norm(x + r, w, 1e-6), rtol=1e-6, atol=1e-6)


def test_weight_dtype_may_differ_from_input(device):
    """fp16 activations with an fp32 (trainable, master) weight: output in fp16, dw in fp32."""
    x, w, _ = _inputs((5, 48), device, False)
    x16 = x.detach().half().requires_grad_()
    with mmkernels.use_backend("triton"):
        y = ops.rms_norm(x16, w, 1e-6)
        y.float().sum().backward()
    assert y.dtype == torch.float16 and w.grad.dtype == torch.float32
    expected = ref.rms_norm(x16.detach().double(), w.detach().double(), 1e-6)
    assert (y.double() - expected).abs().max() < 5e-3


def test_empty_rows(device):
    x = torch.empty(0, 16, device=device)
    w = torch.ones(16, device=device)
    for be in ("reference", "triton"):
        with mmkernels.use_backend(be):
            assert ops.rms_norm(x, w).shape == (0, 16)


def test_bad_input_messages():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight: expected shape \(8,\)"):
        ops.rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match=r"residual: expected shape \(4, 8\)"):
        ops.rms_norm(x, torch.ones(8), residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match=r"residual: expected dtype torch.float32"):
        ops.rms_norm(x, torch.ones(8), residual=torch.randn(4, 8).half())
    with pytest.raises(TypeError, match="x: expected dtype in"):
        ops.rms_norm(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="eps: expected a positive number"):
        ops.rms_norm(x, torch.ones(8), eps=0.0)
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        ops.rms_norm([1.0], torch.ones(8))
