import pytest
import torch

import mmkernels
from mmkernels import ops
import importlib

mod = importlib.import_module("mmkernels.ops.decode_attention")
from _tolerance import assert_close_to_reference

# (B, T, S, H, H_kv, D, L_p or 0 (no prompt), prompt batch, gate size, gate_fn, kv_start)
CASES = [
    (1, 1, 1, 1, 1, 16, 0, 1, 1, "tanh", None),  # one key, no prompt
    (2, 1, 37, 4, 2, 64, 10, 1, 4, "tanh", None),  # text prompt shared by the batch, GQA 2
    (3, 1, 200, 8, 2, 32, 1, 3, 1, "raw", (0, 17, 150)),  # L_p=1, per-sample (visual) prompts, left padding
    (2, 3, 70, 4, 4, 128, 10, 1, 4, "raw", (5, 0)),  # several new queries (speculative / chunked decode)
    (2, 16, 40, 4, 1, 16, 64, 2, 4, "tanh", (0, 39)),  # the most queries, GQA 4, L_p=64, a nearly empty row
    (1, 2, 300, 2, 2, 64, 0, 1, 1, "tanh", (40,)),  # long cache (several splits), no prompt
]


def _make(case, device, dtype=torch.float64, seed=0):
    """A cache buffer larger than the S valid positions, so k/v are strided views as in generation."""
    b, t, s, h, hkv, d, lp, bp, gs, gate_fn, starts = case
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device, dtype)

    q = rnd(b, t, h, d)
    k_buf, v_buf = rnd(b, s + 5, hkv, d), rnd(b, s + 5, hkv, d)
    prompt = {}
    if lp:
        prompt = dict(prompt_k=rnd(bp, lp, hkv, d), prompt_v=rnd(bp, lp, hkv, d), gate=rnd(gs, s=0.7).float(),
                      gate_fn=gate_fn)
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device)
    return q, k_buf[:, :s], v_buf[:, :s], prompt, kv_start


def _run(backend, q, k, v, prompt, kv_start):
    with mmkernels.use_backend(backend), torch.no_grad():
        return ops.decode_attention(q, k, v, kv_start=kv_start, **prompt)


def _check(backend, case, device, dtype):
    q, k, v, prompt, kv_start = _make(case, device)
    high = _run("reference", q, k, v, prompt, kv_start)

    def cast(p):
        return {n: (t.to(dtype) if isinstance(t, torch.Tensor) and n != "gate" else t) for n, t in p.items()}

    low_args = (q.to(dtype), k.to(dtype), v.to(dtype), cast(prompt), kv_start)
    low = _run("reference", *low_args)
    actual = _run(backend, *low_args)
    assert actual.dtype == dtype
    assert_close_to_reference(actual, low, high, f"decode {backend} {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_triton_matches_reference(device, case, dtype):
    _check("triton", case, device, dtype)


# The csrc kernel's head dims, plus shapes that reach its other paths: 8 rows per CTA in several row tiles
# (T=16, GQA 4), many key splits with leading ones emptied by kv_start, a split boundary inside the causal
# tail (T > 1), and per-sample prompts at L_p=128, the most it takes.
CUDA_CASES = [c for c in CASES if c[5] in mod.CUDA_HEAD_DIMS] + [
    (2, 16, 40, 8, 2, 64, 64, 2, 8, "tanh", (0, 39)),
    (1, 1, 1000, 4, 1, 128, 10, 1, 1, "raw", (333,)),
    (3, 5, 515, 4, 2, 64, 0, 1, 1, "tanh", (0, 130, 514)),
    (2, 2, 129, 2, 1, 128, 128, 2, 2, "tanh", None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_cuda_matches_reference(csrc_device, case, dtype):
    _check("cuda", case, csrc_device, dtype)


def _random_cases(count, seed):
    """Shapes in CASES' format that the csrc kernel takes: head dim 64/128, GQA groups 1-5, 1-16 queries, caches
    from T to 900 keys with kv_start anywhere in them (rows that see nothing included), prompts of 1-128 keys
    shared or per sample, either gate form."""
    import random

    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        b, t, hkv, g = rng.randint(1, 3), rng.randint(1, 16), rng.choice([1, 2, 3]), rng.choice([1, 2, 4, 5])
        s = rng.choice([t, t + rng.randint(1, 40), rng.randint(t, 900)])
        lp = rng.choice([0, 1, rng.randint(2, 128)])
        starts = None if rng.random() < 0.4 else tuple(rng.randint(0, s) for _ in range(b))
        cases.append((b, t, s, hkv * g, hkv, rng.choice([64, 128]), lp, rng.choice([1, b]),
                      rng.choice([1, hkv * g]), rng.choice(["tanh", "raw"]), starts))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_random_shapes(csrc_device, monkeypatch, dtype):
    """12 seeded random shapes per dtype, with the grid sized for one SM, seven or an H100's 132 (the
    emulation reads MMK_EMU_SM_COUNT; a GPU sizes it for itself)."""
    for i, case in enumerate(_random_cases(12, seed={torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype])):
        monkeypatch.setenv("MMK_EMU_SM_COUNT", ("1", "7", "132")[i % 3])
        _check("cuda", case, csrc_device, dtype)


@pytest.mark.parametrize("sm_count", ["1", "132"])
def test_cuda_unaligned_rows_take_the_scalar_loads(csrc_device, monkeypatch, sm_count):
    """K/V rows that are not 16-byte aligned (a cache whose rows are padded by one element) run the kernel
    instantiated for scalar loads; one SM's worth of splits and an H100's."""
    monkeypatch.setenv("MMK_EMU_SM_COUNT", sm_count)  # read by the emulation only
    gen = torch.Generator().manual_seed(3)
    b, t, s, h, hkv, d, lp = 2, 3, 300, 4, 2, 64, 7
    for dtype in (torch.float32, torch.float16):
        def padded(*shape):  # rows one element longer than the head dim (sliced after any copy)
            return torch.randn(*shape[:-1], shape[-1] + 1, generator=gen, dtype=torch.float64).to(dtype)

        q = torch.randn(b, t, h, d, generator=gen, dtype=torch.float64).to(dtype)
        bufs = [padded(b, s, hkv, d), padded(b, s, hkv, d), padded(1, lp, hkv, d), padded(1, lp, hkv, d)]
        gate = 0.5 * torch.randn(h, generator=gen)
        kv_start = torch.tensor([3, 0], dtype=torch.int32)

        def run(backend_name, device, cast):
            k, v, pk, pv = (cast(x).to(device)[..., :d] for x in bufs)
            assert backend_name == "reference" or all(x.stride(1) * x.element_size() % 16 for x in (k, v, pk, pv))
            prompt = dict(prompt_k=pk, prompt_v=pv, gate=gate.to(device))
            return _run(backend_name, cast(q).to(device), k, v, prompt, kv_start.to(device)).cpu()

        high = run("reference", "cpu", lambda x: x.double())
        low = run("reference", "cpu", lambda x: x)
        actual = run("cuda", csrc_device, lambda x: x)
        assert_close_to_reference(actual, low, high, f"decode cuda unaligned {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_bf16_gpu_long_cache(backend):
    _check(backend, (4, 1, 4096, 32, 8, 128, 10, 1, 32, "tanh", None), "cuda", torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_matches_the_training_ops(device, backend):
    """decode_attention is the inference twin of attention / gated_prompt_attention (causal)."""
    for case in (CASES[1], CASES[2], CASES[5]):
        q, k, v, prompt, kv_start = _make(case, device, torch.float32)
        with mmkernels.use_backend(backend), torch.no_grad():
            out = ops.decode_attention(q, k, v, kv_start=kv_start, **prompt)
            if prompt:
                p = dict(prompt)
                expected = ops.gated_prompt_attention(q, k, v, p.pop("prompt_k"), p.pop("prompt_v"), p.pop("gate"),
                                                      causal=True, kv_start=kv_start, **p)
            else:
                expected = ops.attention(q, k, v, causal=True, kv_start=kv_start)
        torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_gate_is_exactly_plain_decode(device, backend):
    q, k, v, prompt, kv_start = _make(CASES[1], device, torch.float32)
    prompt["gate"] = torch.zeros_like(prompt["gate"])
    assert torch.equal(_run(backend, q, k, v, prompt, kv_start), _run(backend, q, k, v, {}, kv_start))


def test_bad_input_messages():
    q, kv = torch.randn(1, 17, 2, 16), torch.randn(1, 20, 2, 16)
    with pytest.raises(ValueError, match="at most 16 new queries, got T=17"):
        ops.decode_attention(q, kv, kv)
    q = torch.randn(1, 1, 2, 16, requires_grad=True)
    with pytest.raises(ValueError, match="it has no backward"):
        ops.decode_attention(q, kv, kv)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"give all three or none, got only \['prompt_k'\]"):
            ops.decode_attention(q, kv, kv, prompt_k=kv[:, :3])
        with pytest.raises(ValueError, match=r"gate: expected shape \(2,\) or \(1,\), got \(3,\)"):
            ops.decode_attention(q, kv, kv, prompt_k=kv[:, :3], prompt_v=kv[:, :3], gate=torch.zeros(3))
        with mmkernels.use_backend("triton"):
            with pytest.raises(ValueError, match="head dim 48 is not supported"):
                ops.decode_attention(torch.randn(1, 1, 1, 48), torch.randn(1, 3, 1, 48), torch.randn(1, 3, 1, 48))


def test_opcheck():
    q, k, v, prompt, kv_start = _make(CASES[2], "cpu", torch.float32)
    args = (q, k.contiguous(), v.contiguous(), prompt["prompt_k"], prompt["prompt_v"], prompt["gate"], kv_start,
            0.25, "raw", "reference")
    torch.library.opcheck(mod.decode_attention_op, args)
