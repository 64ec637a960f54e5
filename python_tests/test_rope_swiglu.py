import math

import pytest
import torch

import mmkernels
from mmkernels import ops
from mmkernels.reference import rope as rope_ref
from _harness import check_against_reference


def _qk(b, t, h, hkv, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen).to(device).requires_grad_()
    k = torch.randn(b, t, hkv, d, generator=gen).to(device).requires_grad_()
    return q, k


ROPE_CASES = [
    # (B, T, H, H_kv, D, per-sample positions)
    (1, 1, 1, 1, 16, False),
    (2, 7, 4, 2, 64, False),
    (2, 5, 3, 1, 128, True),
    (1, 9, 6, 3, 48, True),  # head dim whose half is not a power of two
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_triton_matches_reference(device, case, dtype):
    b, t, h, hkv, d, per_sample = case
    q, k = _qk(b, t, h, hkv, d, device)
    pos = torch.arange(t).repeat(b, 1) + torch.arange(b)[:, None] * 3 if per_sample else torch.arange(t)
    cos, sin = ops.rope_cos_sin(pos.to(device), ops.rope_inv_freq(d, 10000.0))
    check_against_reference(
        lambda q, k: ops.rope(q, k, cos, sin), [q, k], backend="triton", dtype=dtype, name=f"rope{case}"
    )


def test_rope_non_contiguous_views(device):
    """q and k as views of a fused qkv projection, as a model produces them."""
    b, t, h, d = 2, 5, 4, 32
    qkv = torch.randn(b, t, 3 * h * d, device=device)
    q = qkv[..., : h * d].view(b, t, h, d)
    k = qkv[..., h * d : 2 * h * d].view(b, t, h, d)
    cos, sin = ops.rope_cos_sin(torch.arange(t, device=device), ops.rope_inv_freq(d, 500000.0))
    with mmkernels.use_backend("triton"):
        qt, kt = ops.rope(q, k, cos, sin)
    qr, kr = rope_ref.rope(q, k, cos, sin)
    torch.testing.assert_close(qt, qr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kt, kr, rtol=1e-6, atol=1e-6)


def test_rope_matches_transformers_formula():
    """Our rotation and frequencies equal the HF LLaMA implementation (rotate_half and llama3 scaling)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as ml

    d, t = 64, 40
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    for cfg_scaling in (None, scaling):
        cfg = transformers.LlamaConfig(hidden_size=4 * d, num_attention_heads=4, rope_theta=10000.0,
                                       rope_scaling=cfg_scaling, max_position_embeddings=64)
        hf_rope = ml.LlamaRotaryEmbedding(cfg)
        x = torch.randn(1, 4, t, d)
        pos = torch.arange(t)[None]
        cos_hf, sin_hf = hf_rope(x, pos)
        q_hf, k_hf = ml.apply_rotary_pos_emb(x, x, cos_hf, sin_hf)
        inv = ops.rope_inv_freq(d, 10000.0, cfg_scaling)
        torch.testing.assert_close(inv, hf_rope.inv_freq, rtol=0, atol=0)
        cos, sin = ops.rope_cos_sin(pos, inv)
        q, _ = ops.rope(x.transpose(1, 2), x.transpose(1, 2), cos, sin)
        torch.testing.assert_close(q.transpose(1, 2), q_hf, rtol=1e-6, atol=1e-6)


def test_llama3_scaling_changes_only_long_wavelengths():
    d = 128
    base = ops.rope_inv_freq(d, 500000.0)
    scaled = ops.rope_inv_freq(d, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    wavelen = 2 * math.pi / base
    assert torch.equal(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])
    torch.testing.assert_close(scaled[wavelen > 8192], base[wavelen > 8192] / 8)


def test_rope_bad_input():
    q = torch.randn(1, 4, 2, 8)
    cos, sin = ops.rope_cos_sin(torch.arange(4), ops.rope_inv_freq(8, 10000.0))
    with pytest.raises(ValueError, match=r"k: expected shape \(1, 4, H_kv, 8\)"):
        ops.rope(q, torch.randn(1, 3, 2, 8), cos, sin)
    with pytest.raises(ValueError, match=r"cos: expected shape \(1 or 1, 4, 4\)"):
        ops.rope(q, q, cos[:, :3], sin[:, :3])
    with pytest.raises(ValueError, match="rope_scaling: rope_type 'yarn' is not supported"):
        ops.rope_inv_freq(8, 10000.0, {"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="llama3 scaling needs key 'low_freq_factor'"):
        ops.rope_inv_freq(8, 10000.0, {"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(ValueError, match="head_dim: expected a positive even number"):
        ops.rope_inv_freq(7, 10000.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 1031), (2, 5, 64)])
def test_swiglu_triton_matches_reference(device, shape, dtype):
    gen = torch.Generator().manual_seed(0)
    g = (3 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
    u = torch.randn(shape, generator=gen).to(device).requires_grad_()
    check_against_reference(ops.swiglu, [g, u], backend="triton", dtype=dtype, name=f"swiglu{shape}")


def test_swiglu_matches_torch_silu():
    g, u = torch.randn(4, 9, dtype=torch.float64), torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(ops.swiglu(g, u), torch.nn.functional.silu(g) * u)


def test_swiglu_bad_input():
    with pytest.raises(ValueError, match=r"up: expected the shape of gate \(2, 3\)"):
        ops.swiglu(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(TypeError, match="up: expected dtype torch.float32"):
        ops.swiglu(torch.randn(2, 3), torch.randn(2, 3).half())


SCALE_BIAS_SHAPES = [(5,), (3, 37), (2, 5, 64), (70, 33), (0, 9), (4, 0)]  # (70, 33): several row chunks, odd channel blocks


def _scale_bias_inputs(shape, device, gen_seed=0):
    gen = torch.Generator().manual_seed(gen_seed)
    n = shape[-1]
    g = (2 * torch.randn(shape, generator=gen)).to(device).requires_grad_()
    u = torch.randn(shape, generator=gen).to(device).requires_grad_()
    vectors = [(0.5 + torch.rand(n, generator=gen)), 0.3 * torch.randn(n, generator=gen),
               (0.5 + torch.rand(n, generator=gen)), 0.3 * torch.randn(n, generator=gen)]
    return g, u, [v.to(device).requires_grad_() for v in vectors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SCALE_BIAS_SHAPES)
def test_swiglu_scale_bias_triton_matches_reference(device, shape, dtype):
    g, u, vectors = _scale_bias_inputs(shape, device)
    rows = max(1, math.prod(shape[:-1]))
    check_against_reference(ops.swiglu_scale_bias, [g, u, *vectors], backend="triton", dtype=dtype,
                            name=f"swiglu_scale_bias{shape}", reduced={i: rows for i in range(2, 6)})


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_swiglu_scale_bias_with_float32_vectors_and_half_activations(device, backend_name):
    """A trainer's case: float32 master scales and biases beside float16 GEMM outputs. Output and gradients
    against float64, within 3x the error of the same math with every input rounded to float16 first."""
    from _tolerance import FLOORS, assert_close_to_reference

    g, u, vectors = _scale_bias_inputs((70, 33), device, gen_seed=1)

    def run(gate, up, vecs, backend):
        leaves = [t.detach().requires_grad_() for t in (gate, up, *vecs)]
        with mmkernels.use_backend(backend):
            out = ops.swiglu_scale_bias(*leaves)
        out.backward(torch.ones_like(out) * 0.5 + torch.linspace(-1, 1, out.shape[-1], device=out.device))
        return [out, *(t.grad for t in leaves)]

    half = (g.half(), u.half())
    got = run(*half, vectors, backend_name)
    low = run(*half, [v.half() for v in vectors], "reference")
    high = run(g.double(), u.double(), [v.double() for v in vectors], "reference")
    assert [t.dtype for t in got] == [torch.float16] * 3 + [torch.float32] * 4
    for i, (a, lo, hi) in enumerate(zip(got, low, high)):
        floor = FLOORS[torch.float16] * (70 ** 0.5 if i >= 3 else 1.0)
        assert_close_to_reference(a.float(), lo.float(), hi, f"output/grad {i}", floor=floor)


def test_swiglu_scale_bias_is_swiglu_of_the_scaled_inputs():
    g, u, vectors = _scale_bias_inputs((4, 9), "cpu")
    g, u = g.detach().double(), u.detach().double()
    s_g, b_g, s_u, b_u = (v.detach().double() for v in vectors)
    want = torch.nn.functional.silu(s_g * (g + b_g)) * (s_u * (u + b_u))
    torch.testing.assert_close(ops.swiglu_scale_bias(g, u, s_g, b_g, s_u, b_u), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(ops.swiglu_scale_bias(g, u, s_g, None, s_u, None),
                               torch.nn.functional.silu(s_g * g) * (s_u * u), rtol=1e-14, atol=1e-14)


def test_swiglu_scale_bias_bad_input():
    g, u, (s_g, b_g, s_u, b_u) = _scale_bias_inputs((3, 8), "cpu")
    with pytest.raises(ValueError, match=r"up: expected the shape of gate \(3, 8\)"):
        ops.swiglu_scale_bias(g, u[:, :4], s_g, b_g, s_u, b_u)
    with pytest.raises(ValueError, match=r"gate_bias: expected shape \(8,\), got \(7,\)"):
        ops.swiglu_scale_bias(g, u, s_g, b_g[:7], s_u, b_u)
    with pytest.raises(ValueError, match=r"up_scale: expected 1 dimensions, got 2"):
        ops.swiglu_scale_bias(g, u, s_g, b_g, s_u[None], b_u)
    with pytest.raises(TypeError, match=r"up_bias: expected dtype in \(torch.float32.*got torch.int64"):
        ops.swiglu_scale_bias(g, u, s_g, b_g, s_u, torch.zeros(8, dtype=torch.long))


@pytest.mark.gpu
def test_rope_swiglu_bf16_gpu():
    q, k = _qk(2, 257, 32, 8, 128, "cuda")
    cos, sin = ops.rope_cos_sin(torch.arange(257, device="cuda"), ops.rope_inv_freq(128, 500000.0))
    check_against_reference(lambda q, k: ops.rope(q, k, cos, sin), [q, k], backend="triton",
                            dtype=torch.bfloat16, name="rope bf16")
    g = torch.randn(4097, 1000, device="cuda").requires_grad_()
    u = torch.randn(4097, 1000, device="cuda").requires_grad_()
    check_against_reference(ops.swiglu, [g, u], backend="triton", dtype=torch.bfloat16, name="swiglu bf16")
    g, u, vectors = _scale_bias_inputs((4097, 1000), "cuda")
    check_against_reference(ops.swiglu_scale_bias, [g, u, *vectors], backend="triton", dtype=torch.bfloat16,
                            name="swiglu_scale_bias bf16", reduced={i: 4097 for i in range(2, 6)})
    check_against_reference(ops.scale_bias, [g, *vectors[:2]], backend="triton", dtype=torch.bfloat16,
                            name="scale_bias bf16", reduced={1: 4097, 2: 4097})
