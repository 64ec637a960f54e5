"""Packed samples in the attention ops: segment_ids (B, T) keeps every sample of a packed row to itself.

The Triton kernels are checked against the reference (tolerance rule of _tolerance.py) and against the
truth the packing stands for: each sample run on its own. The reference mask itself is checked against
torch SDPA with an explicit boolean mask.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

import mmkernels
from _harness import check_against_reference
from _tolerance import assert_close_to_reference
from mmkernels.kernels.attention import segment_ranges
from mmkernels.ops.attention import attention
from mmkernels.ops.gated_attention import gated_prompt_attention
from mmkernels.reference import attention as ref

attn_mod = importlib.import_module("mmkernels.ops.attention")
gated_mod = importlib.import_module("mmkernels.ops.gated_attention")


def _ids(*lengths_per_row, dtype=torch.int32):
    """Segment ids of packed rows from the sample lengths of each row: ids 0, 1, 2, ... per row."""
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in lengths_per_row]
    return torch.stack(rows).to(dtype)


def _rand(gen, device, *shape, s=1.0):
    return (s * torch.randn(*shape, generator=gen)).to(device).requires_grad_()


def _qkv(b, t, h, hkv, d, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return _rand(gen, device, b, t, h, d), _rand(gen, device, b, t, hkv, d), _rand(gen, device, b, t, hkv, d)


# (H, H_kv, D, causal, segment lengths per row, kv_start, id dtype). T odd and not a multiple of the 16-wide
# interpreter blocks, segments that straddle blocks, segments of length 1, GQA 1/2/4.
CASES = [
    (4, 2, 16, True, ((5, 9, 7), (1, 18, 2)), None, torch.int32),
    (4, 1, 32, False, ((3, 1, 1, 12, 6), (23,)), None, torch.int64),
    (2, 2, 64, True, ((1,) * 6 + (11,), (9, 8)), (0, 3), torch.int32),  # kv_start inside the first sample
    (2, 1, 16, True, ((33, 4), (1, 16, 1, 19)), None, torch.int64),  # key blocks fully skipped
]


def _case(case, device):
    h, hkv, d, causal, lengths, starts, id_dtype = case
    seg = _ids(*lengths, dtype=id_dtype).to(device)
    b, t = seg.shape
    q, k, v = _qkv(b, t, h, hkv, d, device)
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device)
    return q, k, v, causal, seg, kv_start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_triton_matches_reference(device, case, dtype):
    q, k, v, causal, seg, kv_start = _case(case, device)
    check_against_reference(
        lambda q, k, v: attention(q, k, v, causal=causal, kv_start=kv_start, segment_ids=seg),
        [q, k, v], backend="triton", dtype=dtype, name=f"segments{case}",
    )


def test_unordered_ids_are_masked_not_skipped(device):
    """Ids that repeat non-contiguously (not the usual packing): the mask must still be exact; such rows
    must not use the run-based block skip (sample 7 of row 1 comes back after whole blocks of sample 2).
    The first row is ordered, so both paths run in one launch."""
    seg = torch.tensor([[0] * 20 + [1] * 20, [7] * 18 + [2] * 14 + [7] * 6 + [2] * 2]).to(device)
    q, k, v = _qkv(2, 40, 2, 1, 16, device, seed=3)
    for causal in (True, False):
        check_against_reference(
            lambda q, k, v: attention(q, k, v, causal=causal, segment_ids=seg),
            [q, k, v], backend="triton", dtype=torch.float32, name=f"unordered causal={causal}",
        )


def test_segment_ranges():
    seg = torch.tensor([[0, 0, 1, 2, 2, 2], [5, 5, 5, 5, 5, 5], [1, 0, 0, 1, 1, 1]])
    r = segment_ranges(seg)
    assert r.dtype == torch.int32 and r.shape == (3, 2, 6)
    assert r[0, 0].tolist() == [0, 0, 2, 3, 3, 3] and r[0, 1].tolist() == [2, 2, 3, 6, 6, 6]
    assert r[1, 0].tolist() == [0] * 6 and r[1, 1].tolist() == [6] * 6
    assert r[2, 0].tolist() == [0] * 6 and r[2, 1].tolist() == [6] * 6  # unordered: no skipping


def _outs_and_grads(fn, tensors, dtype, dout_seed=7):
    """fn(*tensors cast to dtype) and the gradients of every tensor for a fixed random output gradient."""
    x = [t.detach().to(dtype).requires_grad_() for t in tensors]
    out = fn(*x)
    gen = torch.Generator().manual_seed(dout_seed)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, dtype)
    return [out.detach(), *torch.autograd.grad(out, x, dout)]


def _separately(seg, run):
    """The result of a packed op computed sample by sample: run(b, lo, hi) -> [out, dq, dk, dv, *rest] for
    sample tokens [lo, hi) of row b; out/dq/dk/dv are concatenated back, `rest` (prompt grads) summed."""
    rows = []
    rest = None
    for b in range(seg.shape[0]):
        bounds = torch.nonzero(torch.diff(seg[b].cpu(), prepend=seg[b, :1].cpu() - 1)).flatten().tolist()
        bounds.append(seg.shape[1])
        pieces = [run(b, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        rows.append([torch.cat([p[i] for p in pieces], 1) for i in range(4)])
        for p in pieces:
            rest = p[4:] if rest is None else [a + c for a, c in zip(rest, p[4:])]
    return [torch.cat([r[i] for r in rows], 0) for i in range(4)] + list(rest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_equals_each_sample_alone(device, dtype):
    """The packed Triton result (outputs and all gradients) against each sample run on its own by the
    reference: within the tolerance rule, the float64 per-sample run being the truth."""
    seg = _ids((4, 1, 13, 3), (9, 1, 11), dtype=torch.int64).to(device)
    q, k, v = _qkv(2, 21, 4, 2, 32, device, seed=1)
    with mmkernels.use_backend("triton"):
        packed = _outs_and_grads(lambda q, k, v: attention(q, k, v, segment_ids=seg), (q, k, v), dtype)

    # The packed run's output gradient, sliced per sample (_outs_and_grads draws it with seed 7).
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def alone_with(prec):
        def run(b, lo, hi):
            sl = (slice(b, b + 1), slice(lo, hi))
            x = [t[sl].detach().to(prec).requires_grad_() for t in (q, k, v)]
            with mmkernels.use_backend("reference"):
                out = attention(*x)
                grads = torch.autograd.grad(out, x, dout[sl].to(device, prec))
            return [out.detach(), *grads]
        return run

    low = _separately(seg, alone_with(dtype))
    high = _separately(seg, alone_with(torch.float64))
    names = ("out", "dq", "dk", "dv")
    for name, a, lo, hi in zip(names, packed, low, high):
        assert_close_to_reference(a, lo, hi, f"packed vs alone {name} {dtype}")


def test_one_segment_is_no_segments(device):
    """A row that is one sample gives exactly the unsegmented result (ids of any value, int32 or int64)."""
    q, k, v = _qkv(2, 19, 2, 1, 16, device, seed=2)
    for seg, causal in ((torch.zeros(2, 19, dtype=torch.int32), False),
                        (torch.full((2, 19), 2**40, dtype=torch.int64), True)):
        seg = seg.to(device)
        with mmkernels.use_backend("triton"):
            plain = _outs_and_grads(lambda q, k, v: attention(q, k, v, causal=causal), (q, k, v), torch.float32)
            packed = _outs_and_grads(lambda q, k, v: attention(q, k, v, causal=causal, segment_ids=seg),
                                     (q, k, v), torch.float32)
        for a, e in zip(packed, plain):
            assert torch.equal(a, e)


def test_int64_ids_are_not_narrowed(device):
    """Ids that differ only above 32 bits are different samples."""
    seg = torch.tensor([[0] * 8 + [2**32] * 9], dtype=torch.int64, device=device)
    q, k, v = _qkv(1, 17, 2, 2, 16, device, seed=4)
    with mmkernels.use_backend("triton"), torch.no_grad():
        out = attention(q, k, v, segment_ids=seg)
        second = attention(q[:, 8:], k[:, 8:], v[:, 8:])
    torch.testing.assert_close(out[:, 8:], second, rtol=1e-5, atol=1e-6)


def test_reference_matches_sdpa_with_explicit_mask_and_autograd():
    """The reference's segment mask against SDPA with an explicit boolean mask, and its analytic backward
    against autograd through its forward (float64)."""
    torch.manual_seed(0)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3], [4, 4, 4, 4, 4, 4, 9, 9, 9, 9, 5]])
    b, t, h, hkv, d = 2, 11, 4, 2, 16
    q = torch.randn(b, t, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, t, hkv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, t, hkv, d, dtype=torch.float64, requires_grad=True)
    same = seg[:, :, None] == seg[:, None, :]
    for causal in (True, False):
        mask = same & torch.ones(t, t, dtype=torch.bool).tril() if causal else same
        expected = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2), v.repeat_interleave(2, 2).transpose(1, 2),
            attn_mask=mask[:, None],
        ).transpose(1, 2)
        out = ref.attention(q, k, v, causal=causal, segment_ids=seg)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        mine = ref.attention_backward(dout, q.detach(), k.detach(), v.detach(), causal, None, None, seg)
        for a, e in zip(mine, grads):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# Gated: (prompt batch, L_p, gate size, gate_fn, causal, dtype)
GATED = [(1, 10, 4, "tanh", True, torch.float32), (2, 5, 1, "raw", False, torch.float16),
         (2, 3, 4, "tanh", True, torch.float32)]


@pytest.mark.parametrize("gcase", GATED, ids=["shared_prompt_fp32", "per_sample_prompt_fp16", "per_sample_fp32"])
def test_gated_matches_reference(device, gcase):
    bp, lp, gs, gate_fn, causal, dtype = gcase
    seg = _ids((6, 1, 10), (2, 15), dtype=torch.int64).to(device)
    b, t, h, hkv, d = 2, 17, 4, 2, 16
    q, k, v = _qkv(b, t, h, hkv, d, device, seed=5)
    gen = torch.Generator().manual_seed(6)
    pk, pv, g = _rand(gen, device, bp, lp, hkv, d), _rand(gen, device, bp, lp, hkv, d), _rand(gen, device, gs, s=0.7)
    check_against_reference(
        lambda q, k, v, pk, pv, g: gated_prompt_attention(q, k, v, pk, pv, g, causal=causal, gate_fn=gate_fn,
                                                          segment_ids=seg),
        [q, k, v, pk, pv, g], backend="triton", dtype=dtype, name=f"gated segments{gcase}",
        reduced={5: b * t * d * (h if gs == 1 else 1)},
    )


def test_gated_packed_equals_each_sample_alone(device):
    """A shared prompt seen by every packed sample: the packed result equals the samples run alone (the
    prompt and gate gradients being the sums over the samples)."""
    seg = _ids((7, 1, 9), dtype=torch.int32).to(device)
    q, k, v = _qkv(1, 17, 4, 1, 16, device, seed=8)
    gen = torch.Generator().manual_seed(9)
    pk, pv, g = _rand(gen, device, 1, 6, 1, 16), _rand(gen, device, 1, 6, 1, 16), _rand(gen, device, 4, s=0.7)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    x = [t.detach().requires_grad_() for t in (q, k, v, pk, pv, g)]
    with mmkernels.use_backend("triton"):
        out = gated_prompt_attention(*x, segment_ids=seg)
        packed = [out.detach(), *torch.autograd.grad(out, x, dout.to(device, out.dtype))]

    def run_with(prec):
        def run(b, lo, hi):
            sl = (slice(b, b + 1), slice(lo, hi))
            y = [t[sl].detach().to(prec).requires_grad_() for t in (q, k, v)]
            y += [t.detach().to(prec).requires_grad_() for t in (pk, pv, g)]
            with mmkernels.use_backend("reference"):
                o = gated_prompt_attention(*y)
                grads = torch.autograd.grad(o, y, dout[sl].to(device, prec))
            return [o.detach(), *grads]
        return run

    low, high = _separately(seg, run_with(torch.float32)), _separately(seg, run_with(torch.float64))
    for i, (a, lo, hi) in enumerate(zip(packed, low, high)):
        assert_close_to_reference(a, lo, hi, f"gated packed vs alone {i}")


def test_opcheck_and_compile():
    seg = _ids((3, 4), dtype=torch.int64)
    q, k, v = _qkv(1, 7, 2, 1, 16, "cpu", seed=10)
    torch.library.opcheck(attn_mod.attention_fwd, (q, k, v, None, True, 0.25, "reference", seg))
    out, lse = attn_mod.attention_fwd(q, k, v, None, True, 0.25, "reference", seg)
    torch.library.opcheck(attn_mod.attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                   out.detach(), lse.detach(), None, True, 0.25, "reference", seg))
    gen = torch.Generator().manual_seed(11)
    pk, pv, g = _rand(gen, "cpu", 1, 3, 1, 16), _rand(gen, "cpu", 1, 3, 1, 16), _rand(gen, "cpu", 2)
    torch.library.opcheck(gated_mod.gated_prompt_attention_fwd,
                          (q, k, v, pk, pv, g, None, True, 0.25, "tanh", "reference", seg))

    def f(q, k, v, pk, pv, g):
        return (attention(q, k, v, segment_ids=seg).square().sum()
                + gated_prompt_attention(q, k, v, pk, pv, g, segment_ids=seg).square().sum())

    tensors = (q, k, v, pk, pv, g)
    with mmkernels.use_backend("reference"):
        eager = f(*tensors)
        ge = torch.autograd.grad(eager, tensors)
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(*tensors)
        gc = torch.autograd.grad(compiled, tensors)
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


def test_bad_input_messages():
    q, kv = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    pk, gate = torch.randn(1, 3, 2, 16), torch.zeros(4)
    seg = torch.zeros(2, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"segment_ids: expected shape \(2, 5\), got \(2, 4\)"):
        attention(q, kv, kv, segment_ids=seg[:, :4])
    with pytest.raises(ValueError, match=r"segment_ids: expected 2 dimensions, got 1"):
        attention(q, kv, kv, segment_ids=seg[0])
    with pytest.raises(TypeError, match="segment_ids: expected dtype in"):
        attention(q, kv, kv, segment_ids=seg.float())
    longer = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match=r"segment_ids: packed segments need as many keys as queries.*S=8 != T=5"):
        attention(q, longer, longer, segment_ids=seg)
    with pytest.raises(ValueError, match=r"S=8 != T=5"):
        gated_prompt_attention(q, longer, longer, pk, pk, gate, segment_ids=seg)
    with pytest.raises(TypeError, match="segment_ids: expected a torch.Tensor, got list"):
        gated_prompt_attention(q, kv, kv, pk, pk, gate, segment_ids=[[0] * 5] * 2)
    with pytest.raises(ValueError, match="segment_ids: needs as many keys as queries"):
        ref.attention(q, longer, longer, segment_ids=seg)


@pytest.mark.gpu
@pytest.mark.parametrize("gated", [False, True])
def test_triton_bf16_gpu(gated):
    """bf16 on a GPU at training sizes: samples of varied length packed into rows of 1000 tokens."""
    lengths = ((300, 1, 199, 500), (17, 983))
    seg = _ids(*lengths, dtype=torch.int64).cuda()
    b, t, h, hkv, d = 2, 1000, 8, 2, 64
    q, k, v = _qkv(b, t, h, hkv, d, "cuda", seed=12)
    if not gated:
        check_against_reference(lambda q, k, v: attention(q, k, v, segment_ids=seg), [q, k, v],
                                backend="triton", dtype=torch.bfloat16, name="segments bf16")
        return
    gen = torch.Generator().manual_seed(13)
    pk, pv, g = _rand(gen, "cuda", 1, 10, hkv, d), _rand(gen, "cuda", 1, 10, hkv, d), _rand(gen, "cuda", h, s=0.7)
    check_against_reference(
        lambda q, k, v, pk, pv, g: gated_prompt_attention(q, k, v, pk, pv, g, segment_ids=seg),
        [q, k, v, pk, pv, g], backend="triton", dtype=torch.bfloat16, name="gated segments bf16",
        reduced={5: b * t * d},
    )
