import importlib

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels import ops
from mmkernels.reference import attention as ref
from _harness import check_against_reference
from _tolerance import assert_close_to_reference

attn_mod = importlib.import_module("mmkernels.ops.attention")

# (B, T, S, H, H_kv, D, causal, kv_start): T=1 decode, odd lengths that leave partial blocks, S > T
# (prefill continuation against a KV cache), GQA ratios 1, 2, 4 and a single kv head.
CASES = [
    (1, 1, 1, 1, 1, 16, True, None),
    (2, 7, 7, 4, 2, 64, True, None),
    (1, 33, 33, 4, 1, 32, True, None),
    (2, 1, 19, 4, 4, 128, True, None),
    (1, 5, 37, 2, 2, 64, True, None),
    (2, 17, 17, 4, 1, 16, False, None),
    (1, 9, 23, 2, 1, 32, False, None),
    # S = T + 1 with a full 16-query block (the interpreter's tiles): the block's last query sees the first key
    # of the next key block (the causal key range of the forward / dq, the query range of dk/dv).
    (1, 17, 18, 2, 1, 16, True, None),
    (2, 11, 11, 2, 2, 64, True, (0, 4)),
    (2, 3, 20, 4, 2, 16, True, (2, 18)),  # sample 1: keys 18.. only; query 0 at position 17 sees none
    (2, 6, 6, 2, 1, 16, False, (5, 6)),  # sample 1 sees no key at all
]


def _make(case, device, seed=0):
    b, t, s, h, hkv, d, causal, starts = case
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, t, h, d, generator=gen).to(device).requires_grad_()
    k = torch.randn(b, s, hkv, d, generator=gen).to(device).requires_grad_()
    v = torch.randn(b, s, hkv, d, generator=gen).to(device).requires_grad_()
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device)
    return q, k, v, causal, kv_start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_triton_matches_reference(device, case, dtype):
    q, k, v, causal, kv_start = _make(case, device)
    check_against_reference(
        lambda q, k, v: ops.attention(q, k, v, causal=causal, kv_start=kv_start),
        [q, k, v], backend="triton", dtype=dtype, name=f"attention{case}",
    )


def test_fp16_kv_gradients_accumulate_in_fp32(device):
    """dk and dv sum over the GROUP x T query rows of a kv head, one query tile at a time (16 queries in the
    interpreter, 32 on a GPU): the running sums must stay in float32. Query heads h and h + 4 get the same
    queries and opposite output gradients, so their terms cancel exactly: the true dk and dv are 0, while the
    running sums first grow to O(1). A half-precision accumulator leaves its rounding (~1e-3) in the result,
    float32 about 1e-6 (the floor is 2e-4)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 4, 16, generator=gen).repeat(1, 1, 2, 1)
    k, v = torch.randn(1, 16, 1, 16, generator=gen), torch.randn(1, 16, 1, 16, generator=gen)
    dout = torch.randn(1, 64, 4, 16, generator=gen)
    _fp16_triton_within_reference(device, q, k, v, torch.cat((dout, -dout), 2), "cancelling heads")


def _fp16_triton_within_reference(device, q, k, v, dout, what):
    """Non-causal attention on triton in float16: output and gradients within the tolerance of the float16
    reference against float64."""
    def run(backend, dtype):
        x = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        with mmkernels.use_backend(backend):
            out = ops.attention(*x, causal=False)
        return [out.detach(), *torch.autograd.grad(out, x, dout.to(device, dtype))]

    high, low, ours = run("reference", torch.float64), run("reference", torch.float16), run("triton", torch.float16)
    for name, a, lo, hi in zip(("out", "dq", "dk", "dv"), ours, low, high):
        assert_close_to_reference(a, lo, hi, f"attention fp16 {what} {name}")


def test_fp16_dq_accumulates_in_fp32(device):
    """dq sums over the keys one key tile at a time (16 keys in the interpreter): the running sum must stay in
    float32. The second key tile repeats the first one's keys with negated values, so each key's dq term is
    cancelled exactly by its twin's (equal probabilities, opposite ds; the output, hence delta, is exactly 0):
    the true dq is 0 while the running sum after the first tile is O(1). A half-precision accumulator leaves
    its rounding (~1e-3) in the result, float32 nothing (the floor is 2e-4). More tiles per twin would not do:
    the forward's rescaling between tiles leaves the output a few ulps off 0, so ds loses its exact symmetry."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 16, 1, 16, generator=gen)
    k = torch.randn(1, 16, 1, 16, generator=gen).repeat(1, 2, 1, 1)
    v = torch.randn(1, 16, 1, 16, generator=gen)
    v = torch.cat((v, -v), 1)
    dout = 8 * torch.randn(1, 16, 1, 16, generator=gen)
    _fp16_triton_within_reference(device, q, k, v, dout, "mirrored key tiles")


def test_rows_seeing_no_key_are_zero_with_zero_gradient(device):
    q, k, v, causal, kv_start = _make(CASES[-1], device)
    for be in ("reference", "triton"):
        with mmkernels.use_backend(be):
            out = ops.attention(q, k, v, causal=causal, kv_start=kv_start)
            dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert torch.equal(out[1], torch.zeros_like(out[1])), be
        assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dk[1], torch.zeros_like(dk[1])), be
        assert torch.isfinite(dq).all() and torch.isfinite(dv).all(), be


def test_reference_matches_sdpa_and_autograd():
    """The reference is checked against torch SDPA (an independent implementation) and its analytic
    backward against autograd through its forward, in float64."""
    torch.manual_seed(0)
    b, t, h, hkv, d = 2, 13, 4, 2, 16
    q = torch.randn(b, t, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, t, hkv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, t, hkv, d, dtype=torch.float64, requires_grad=True)
    for causal in (True, False):
        expected = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
            is_causal=causal,
        ).transpose(1, 2)
        out = ref.attention(q, k, v, causal=causal)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        for a, e in zip(ref.attention_backward(dout, q.detach(), k.detach(), v.detach(), causal), grads):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    # Left padding equals attention on the unpadded suffix.
    starts = torch.tensor([0, 4])
    out = ref.attention(q, k, v, causal=True, kv_start=starts)
    alone = ref.attention(q[1:, 4:], k[1:, 4:], v[1:, 4:], causal=True)
    torch.testing.assert_close(out[1:, 4:], alone, rtol=1e-12, atol=1e-12)


def test_kv_cache_slices_and_decode_consistency(device):
    """k/v as strided slices of a preallocated cache; decoding one query at a time equals full causal."""
    torch.manual_seed(1)
    b, t, h, hkv, d, max_len = 2, 9, 4, 2, 32, 16
    cache_k = torch.zeros(b, max_len, hkv, d, device=device)
    cache_v = torch.zeros(b, max_len, hkv, d, device=device)
    q = torch.randn(b, t, h, d, device=device)
    cache_k[:, :t] = torch.randn(b, t, hkv, d, device=device)
    cache_v[:, :t] = torch.randn(b, t, hkv, d, device=device)
    with mmkernels.use_backend("triton"):
        full = ops.attention(q, cache_k[:, :t], cache_v[:, :t], causal=True)
        steps = [ops.attention(q[:, i : i + 1], cache_k[:, : i + 1], cache_v[:, : i + 1], causal=True)
                 for i in range(t)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full, ref.attention(q, cache_k[:, :t].contiguous(), cache_v[:, :t].contiguous()),
                               rtol=1e-5, atol=1e-6)


def test_opcheck_and_compile():
    torch.manual_seed(0)
    q = torch.randn(1, 5, 2, 16, requires_grad=True)
    k = torch.randn(1, 7, 1, 16, requires_grad=True)
    v = torch.randn(1, 7, 1, 16, requires_grad=True)
    starts = torch.tensor([2], dtype=torch.int32)
    torch.library.opcheck(attn_mod.attention_fwd, (q, k, v, starts, True, 0.25, "reference"))
    out, lse = attn_mod.attention_fwd(q, k, v, starts, True, 0.25, "reference")
    torch.library.opcheck(attn_mod.attention_bwd,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), starts,
                           True, 0.25, "reference"))

    def f(q, k, v):
        return (ops.attention(q, k, v, causal=True, kv_start=starts) ** 2).sum()

    with mmkernels.use_backend("reference"):
        eager = f(q, k, v)
        ge = torch.autograd.grad(eager, (q, k, v))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
        gc = torch.autograd.grad(compiled, (q, k, v))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


def test_bad_input_messages():
    q = torch.randn(1, 4, 4, 16)
    kv = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="q: expected 4 dimensions, got 3"):
        ops.attention(q[0], kv, kv)
    with pytest.raises(ValueError, match=r"must divide the number of query heads \(4\)"):
        ops.attention(q, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16))
    with pytest.raises(ValueError, match=r"k: expected shape \(1, S, H_kv, 16\)"):
        ops.attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="v: expected the shape of k"):
        ops.attention(q, kv, torch.randn(1, 5, 2, 16))
    with pytest.raises(TypeError, match="k: expected dtype torch.float32"):
        ops.attention(q, kv.half(), kv.half())
    with pytest.raises(ValueError, match="causal attention needs at least as many keys"):
        ops.attention(q, kv[:, :2], kv[:, :2])
    with pytest.raises(ValueError, match=r"kv_start: expected shape \(1,\)"):
        ops.attention(q, kv, kv, kv_start=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="kv_start: expected dtype in"):
        ops.attention(q, kv, kv, kv_start=torch.tensor([0.0]))
    with mmkernels.use_backend("triton"):
        with pytest.raises(ValueError, match="q: head dim 48 is not supported by the triton attention kernel"):
            ops.attention(torch.randn(1, 2, 1, 48), torch.randn(1, 2, 1, 48), torch.randn(1, 2, 1, 48))


@pytest.mark.gpu
@pytest.mark.parametrize("t,d", [(2048, 128), (1000, 64)])
def test_triton_bf16_gpu_vs_sdpa(t, d):
    case = (2, t, t, 8, 2, d, True, None)
    q, k, v, causal, _ = _make(case, "cuda")
    check_against_reference(lambda q, k, v: ops.attention(q, k, v, causal=True), [q, k, v],
                            backend="triton", dtype=torch.bfloat16, name="attention bf16")
    qb, kb, vb = (x.detach().bfloat16() for x in (q, k, v))
    with mmkernels.use_backend("triton"):
        ours = ops.attention(qb, kb, vb, causal=True)
    sdpa = F.scaled_dot_product_attention(qb.transpose(1, 2), kb.transpose(1, 2), vb.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)
    assert (ours.float() - sdpa.float()).abs().max() < 2e-2
