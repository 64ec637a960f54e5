"""Every Triton kernel in bfloat16, on CPU: the kernels' own CPU tests, called with bf16 at one or two of
their shapes, through the interpreter with its bfloat16 mended (_interpreter_bf16.py, installed by
conftest.py: casts round to nearest even and tl.dot multiplies exact float32 copies, as on a GPU). Against
the reference with the usual rule (3x the error of the reference run in bf16, plus bf16's floor). On a GPU
the `gpu`-marked bf16 tests run the compiled kernels at training sizes instead."""

import importlib

import pytest
import torch

from conftest import HAS_CUDA
import _interpreter_bf16

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="a GPU is here: its bf16 tests run the compiled kernels")

# (module, test function, its arguments besides device and dtype, index of the case in the module's list)
PLAN = [
    ("test_attention", "test_triton_matches_reference", "case", "CASES", (0, 3)),
    ("test_gated_attention", "test_triton_matches_reference", "case", "CASES", (0, 2)),
    ("test_attention_segments", "test_triton_matches_reference", "case", "CASES", (0,)),
    ("test_decode_attention", "test_triton_matches_reference", "case", "CASES", (1, 2)),
    ("test_rope_swiglu", "test_rope_triton_matches_reference", "case", "ROPE_CASES", (0,)),
    ("test_rope_swiglu", "test_swiglu_scale_bias_triton_matches_reference", "shape", "SCALE_BIAS_SHAPES", (3,)),
    ("test_scale_bias_linear", "test_scale_bias_triton_matches_reference", "shape", "SCALE_BIAS_SHAPES", (3,)),
    ("test_linear_cross_entropy", "test_triton_matches_naive_oracle", "case", "CASES", (0,)),
    ("test_paca", "test_paca_linear_triton_matches_reference", "case", "CASES", (0,)),
    ("test_quantized_linear", "test_triton_matches_the_dequantized_reference", "case", "CASES", (0, 1)),
    ("test_mom_adapter", "test_triton_matches_reference", "case", "CASES_FP32", (0,)),
    ("test_phm", "test_kernel_matches_reference", "shape", "SHAPES", (0,)),
    ("test_dynamic_expert", "test_triton_matches_reference", "shape", "SHAPES", (0,)),
    ("test_rms_norm", "test_triton_matches_reference", "shape", "SHAPES", (0, 1)),
]
ITEMS = [(m, f, arg, lst, i) for m, f, arg, lst, idx in PLAN for i in idx]


@pytest.mark.parametrize("module,function,arg,cases,index", ITEMS,
                         ids=[f"{m}.{f}[{i}]" for m, f, _, _, i in ITEMS])
def test_kernel_in_bf16(request, device, module, function, arg, cases, index):
    mod = importlib.import_module(module)
    fn = getattr(mod, function)
    kwargs = {arg: getattr(mod, cases)[index], "device": device, "dtype": torch.bfloat16}
    extra = {"small_blocks": True, "activation": "swiglu", "with_residual": True}
    for name in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
        if name in extra and name not in kwargs:
            kwargs[name] = extra[name]
        elif name == "monkeypatch":
            kwargs[name] = request.getfixturevalue("monkeypatch")
    fn(**kwargs)


def test_swiglu_and_the_paca_kernels_in_bf16(device, monkeypatch):
    from test_paca import test_delta_grad_kernel, test_gather_kernel, test_sync_kernel
    from test_rope_swiglu import test_swiglu_triton_matches_reference

    test_swiglu_triton_matches_reference(device, (3, 1031), torch.bfloat16)
    test_gather_kernel(device, 17, torch.bfloat16)
    test_delta_grad_kernel(device, torch.bfloat16, 3, monkeypatch)
    test_sync_kernel(device, torch.bfloat16, 17)


def test_the_mended_interpreter_is_needed():
    """The checks above can fail: with the interpreter as Triton ships it, bf16 attention is far off."""
    import test_attention

    with _interpreter_bf16.removed():
        with pytest.raises(AssertionError, match="exceeds"):
            test_attention.test_triton_matches_reference(torch.device("cpu"), test_attention.CASES[0], torch.bfloat16)


def test_the_mended_casts_are_torchs():
    """float32 -> bfloat16 rounds to nearest even (ties, carries into the exponent, overflow to inf,
    subnormals) and bfloat16 -> float32 is exact, bit for bit as torch converts."""
    import numpy as np

    values = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-12, -(1 + 2**-8 + 2**-12), 2 - 2**-9,
                           3.4e38, -float("inf"), 1e-40, -0.0, 65504.0])
    got = _interpreter_bf16.f32_to_bf16_bits(values.numpy())
    assert (got == values.bfloat16().view(torch.int16).numpy().view(np.uint16)).all()
    back = _interpreter_bf16.bf16_bits_to_f32(got)
    assert torch.equal(torch.from_numpy(back), values.bfloat16().float())
    assert np.isnan(_interpreter_bf16.bf16_bits_to_f32(_interpreter_bf16.f32_to_bf16_bits(np.float32("nan"))))
