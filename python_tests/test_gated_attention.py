import importlib

import pytest
import torch

import mmkernels
from mmkernels import ops
from mmkernels.reference import gated_attention as ref
from _harness import check_against_reference
from _tolerance import assert_close_to_reference

mod = importlib.import_module("mmkernels.ops.gated_attention")

# (B, T, S, H, H_kv, D, L_p, prompt batch, causal, gate size, gate_fn, kv_start)
CASES = [
    (1, 1, 1, 1, 1, 16, 1, 1, True, 1, "tanh", None),  # T=1, L_p=1
    (2, 7, 7, 4, 2, 64, 10, 1, True, 4, "tanh", None),  # shared text prompt, GQA 2
    (2, 5, 12, 4, 1, 32, 10, 2, True, 4, "raw", (0, 3)),  # per-sample (visual) prompts, KV-cache decode shape
    (2, 17, 17, 2, 2, 16, 64, 1, True, 1, "raw", (0, 5)),  # PEFT-style scalar raw gate, L_p=64
    (1, 9, 9, 4, 4, 128, 3, 1, False, 4, "tanh", None),  # non-causal main segment
    (2, 6, 6, 2, 1, 16, 5, 2, False, 2, "tanh", (5, 6)),  # a sample whose main segment sees no key
    (2, 5, 5, 2, 1, 16, 17, 1, True, 2, "tanh", None),  # L_p=17, one past a power of two: the backward
    # preprocess holds the whole prompt in one tile
]


def _make(case, device, seed=0):
    b, t, s, h, hkv, d, lp, bp, causal, gs, gate_fn, starts = case
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=gen)).to(device).requires_grad_()

    tensors = [rnd(b, t, h, d), rnd(b, s, hkv, d), rnd(b, s, hkv, d), rnd(bp, lp, hkv, d), rnd(bp, lp, hkv, d),
               rnd(gs, s=0.7)]
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device)
    return tensors, causal, gate_fn, kv_start


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_triton_matches_reference(device, case, dtype):
    tensors, causal, gate_fn, kv_start = _make(case, device)
    b, t, _, h, _, d, _, _, _, gs, _, _ = case
    gate_terms = b * t * d * (h if gs == 1 else 1)  # products summed into one gate-gradient element
    check_against_reference(
        lambda q, k, v, pk, pv, g: ops.gated_prompt_attention(q, k, v, pk, pv, g, causal=causal, gate_fn=gate_fn,
                                                              kv_start=kv_start),
        tensors, backend="triton", dtype=dtype, name=f"gated{case}", reduced={5: gate_terms},
    )


def test_fp16_gradient_sums_accumulate_in_fp32(device):
    """The main and the prompt segment's dk and dv sum over the GROUP x T query rows of a kv head, one query tile
    at a time: the running sums must stay in float32. Query heads h and h + 2 get the same queries and opposite
    output gradients (one fixed gate), so their terms cancel exactly: the true dk, dv, d prompt_k and d prompt_v
    are 0 while the running sums first grow to O(1). A half-precision accumulator leaves its rounding (~1e-3) in
    the result, float32 about 1e-6 (the floor is 2e-4)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 64, 2, 16, generator=gen).repeat(1, 1, 2, 1)
    k, v, pk, pv = (torch.randn(1, 16, 1, 16, generator=gen) for _ in range(4))
    dout = torch.randn(1, 64, 2, 16, generator=gen)
    dout = torch.cat((dout, -dout), 2)

    def run(backend, dtype):
        x = [t.to(device, dtype).requires_grad_() for t in (q, k, v, pk, pv)]
        with mmkernels.use_backend(backend):
            out = ops.gated_prompt_attention(*x, 0.8, causal=False, gate_fn="raw")
        return [out.detach(), *torch.autograd.grad(out, x, dout.to(device, dtype))]

    high, low, ours = run("reference", torch.float64), run("reference", torch.float16), run("triton", torch.float16)
    names = ("out", "dq", "dk", "dv", "d prompt_k", "d prompt_v")
    for name, a, lo, hi in zip(names, ours, low, high):
        assert_close_to_reference(a, lo, hi, f"gated fp16 cancelling heads {name}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_zero_gate_is_exactly_base_attention(device, backend):
    (q, k, v, pk, pv, _), causal, _, kv_start = _make(CASES[2], device)
    zero = torch.zeros(4, device=device, requires_grad=True)
    with mmkernels.use_backend(backend), torch.no_grad():
        gated = ops.gated_prompt_attention(q, k, v, pk, pv, zero, causal=causal, kv_start=kv_start)
        base = ops.attention(q, k, v, causal=causal, kv_start=kv_start)
    assert torch.equal(gated, base)
    # ... and the gate still receives a gradient (the zero-init gate must be able to learn).
    with mmkernels.use_backend(backend):
        out = ops.gated_prompt_attention(q, k, v, pk, pv, zero, causal=causal, kv_start=kv_start)
        (dgate,) = torch.autograd.grad(out.sum(), zero)
    assert dgate.abs().min() > 0


def test_reference_backward_matches_autograd():
    (q, k, v, pk, pv, g), causal, gate_fn, kv_start = _make(CASES[2], "cpu")
    (q1, k1, v1, pk1, pv1, g1), _, _, _ = _make(CASES[1], "cpu")
    for (tensors, c, fn, ks) in (((q, k, v, pk, pv, g), causal, gate_fn, kv_start), ((q1, k1, v1, pk1, pv1, g1),
                                                                                       True, "tanh", None)):
        x = [t.detach().double().requires_grad_() for t in tensors]
        out = ref.gated_prompt_attention(*x, c, fn, None, ks)
        dout = torch.randn_like(out)
        expected = torch.autograd.grad(out, x, dout)
        scale = x[0].shape[-1] ** -0.5
        _, out_main, lse, lse_p = mod.gated_prompt_attention_fwd(*x, ks, c, scale, fn, "reference")
        actual = mod.gated_prompt_attention_bwd(dout, *[t.detach() for t in x], out_main, lse, lse_p, ks, c, scale,
                                                fn, "reference")
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_fixed_scale_cross_attention(device):
    """IP-Adapter / MACS: non-causal main segment, a float scale lambda, no gate parameter."""
    (q, k, v, pk, pv, _), _, _, _ = _make(CASES[4], device)
    with mmkernels.use_backend("triton"), torch.no_grad():
        out = ops.gated_prompt_attention(q, k, v, pk, pv, 0.6, causal=False, gate_fn="raw")
        expected = ops.attention(q, k, v, causal=False) + 0.6 * ops.attention(q, pk, pv, causal=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_opcheck_and_compile():
    (q, k, v, pk, pv, g), causal, gate_fn, kv_start = _make(CASES[2], "cpu")
    args = (q, k, v, pk, pv, g, kv_start, causal, 0.25, gate_fn, "reference")
    torch.library.opcheck(mod.gated_prompt_attention_fwd, args)

    def f(q, k, v, pk, pv, g):
        return ops.gated_prompt_attention(q, k, v, pk, pv, g, causal=causal, gate_fn=gate_fn,
                                          kv_start=kv_start).square().sum()

    with mmkernels.use_backend("reference"):
        eager = f(q, k, v, pk, pv, g)
        ge = torch.autograd.grad(eager, (q, k, v, pk, pv, g))
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, pk, pv, g)
        gc = torch.autograd.grad(compiled, (q, k, v, pk, pv, g))
    torch.testing.assert_close(compiled, eager)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e)


def test_bad_input_messages():
    q, kv = torch.randn(2, 4, 4, 16), torch.randn(2, 4, 2, 16)
    pk = torch.randn(1, 3, 2, 16)
    gate = torch.zeros(4)
    with pytest.raises(ValueError, match=r"prompt_k: expected shape \(1 or 2, L_p >= 1, 2, 16\)"):
        ops.gated_prompt_attention(q, kv, kv, torch.randn(3, 3, 2, 16), pk, gate)
    with pytest.raises(ValueError, match="prompt_v: expected the shape of prompt_k"):
        ops.gated_prompt_attention(q, kv, kv, pk, torch.randn(1, 4, 2, 16), gate)
    with pytest.raises(ValueError, match=r"gate: expected shape \(4,\) or \(1,\), got \(3,\)"):
        ops.gated_prompt_attention(q, kv, kv, pk, pk, torch.zeros(3))
    with pytest.raises(ValueError, match="gate_fn: expected one of"):
        ops.gated_prompt_attention(q, kv, kv, pk, pk, gate, gate_fn="sigmoid")
    with pytest.raises(ValueError, match="prompt length 129 exceeds the supported 128"):
        ops.gated_prompt_attention(q, kv, kv, torch.randn(1, 129, 2, 16), torch.randn(1, 129, 2, 16), gate)
    with pytest.raises(TypeError, match="gate: expected a tensor"):
        ops.gated_prompt_attention(q, kv, kv, pk, pk, "0.5")
