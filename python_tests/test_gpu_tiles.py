"""Every Triton op family run with its GPU tile configuration, against the reference backend.

Each launch helper in mmkernels/kernels/ picks its tiles (BLOCK sizes, warps, stages, split counts) by asking
mmkernels.kernels._device whether it runs compiled on a GPU and how many SMs the GPU has. Under the Triton
interpreter the answer is "no", so the other kernel tests only ever run the small interpreter tiles. Here a
fixture answers "yes, 132 SMs" (an H100/H200), so the interpreter runs the GPU tiles themselves: 128 x 64
attention blocks, 64-wide chunks, split counts sized for 132 SMs. Every case is larger than one GPU tile in the
dimension that tile covers and not a multiple of it (each test asserts that from the config function itself),
so partial tiles and several programs per dimension are exercised. Forward and every input gradient, triton
vs reference, with the tolerance rule of _tolerance.py, in float32 and (where cheap) float16; bf16 runs at the
interpreter tiles in test_bf16_interpreted.py and at the GPU tiles on a GPU.

Families whose tiles do not depend on the device (rope, swiglu, linear_cross_entropy, paca_adamw) are run
once above their tile size too. lora_linear has no Triton kernel (its GEMMs are torch.matmul) and is not here.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path

import pytest
import torch

import mmkernels
from _harness import check_against_reference
from _tolerance import assert_close_to_reference
from mmkernels.kernels import _device
from mmkernels.ops.attention import attention
from mmkernels.ops.decode_attention import decode_attention
from mmkernels.ops.dynamic_expert import dynamic_expert
from mmkernels.ops.gated_attention import gated_prompt_attention
from mmkernels.ops.linear_cross_entropy import linear_cross_entropy
from mmkernels.ops.mom_adapter import mom_adapter
from mmkernels.ops.paca import paca_linear
from mmkernels.ops.paca_adamw import paca_adamw_sync
from mmkernels.ops.phm import phm_adapter
from mmkernels.ops.quantized_linear import QuantizedWeight, quantized_linear
from mmkernels.ops.rms_norm import rms_norm
from mmkernels.ops.rope import rope, rope_cos_sin, rope_inv_freq
from mmkernels.ops.swiglu import swiglu
from mmkernels.reference import paca as ref_paca

attn_k = importlib.import_module("mmkernels.kernels.attention")
decode_k = importlib.import_module("mmkernels.kernels.decode_attention")
dyn_k = importlib.import_module("mmkernels.kernels.dynamic_expert")
lce_k = importlib.import_module("mmkernels.kernels.linear_cross_entropy")
mom_k = importlib.import_module("mmkernels.kernels.mom_adapter")
paca_k = importlib.import_module("mmkernels.kernels.paca")
phm_k = importlib.import_module("mmkernels.kernels.phm")
quant_k = importlib.import_module("mmkernels.kernels.quant_matmul")
rms_k = importlib.import_module("mmkernels.kernels.rms_norm")

KERNELS = Path(_device.__file__).resolve().parent
SMS = 132  # H100 / H200
F32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def gpu_tiles(monkeypatch):
    """The launch helpers choose their GPU configurations (they read _device through the module)."""
    monkeypatch.setattr(_device, "compiled", lambda device: True)
    monkeypatch.setattr(_device, "sm_count", lambda device: SMS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest.one_thread


def _spans(what: str, size: int, tile: int) -> None:
    """The case covers several GPU tiles, the last one partial (else it would not test what it claims)."""
    assert size > tile and size % tile, (
        f"{what} = {size} must exceed the GPU tile {tile} and not be a multiple of it: enlarge the case")


def _rnd(gen, device, *shape, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen)).to(device).requires_grad_()


def test_launch_helpers_ask_the_device_module():
    """The fixture patches _device's functions; a helper that imported them by name, or asked torch about the
    device itself, would keep its interpreter tiles here and go untested."""
    bypass = re.compile(r"from\s+mmkernels\.kernels\._device\s+import|\.is_cuda\b|device\.type\s*==|torch\.cuda\.")
    for path in sorted(KERNELS.glob("*.py")):
        if path.name in ("_device.py", "__init__.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not bypass.search(line), f"{path.name}:{n} bypasses _device: {line.strip()}"
    cpu = torch.device("cpu")
    assert attn_k._config(64, cpu)[:2] == (128, 64)  # the patch reaches the helpers
    assert quant_k._tiles(cpu)[:3] == (64, 64, 64)


# --------------------------------------------------------------------------------------------- attention

# (B, T, S, H, H_kv, D, causal, kv_start, segment lengths per row or None)
ATTN_CASES = [
    (1, 150, 150, 4, 1, 64, True, None, None),  # GQA 4
    (2, 130, 200, 2, 1, 128, True, (0, 37), None),  # prefill continuation (S > T), left padding
    (2, 150, 150, 2, 2, 64, True, None, ((70, 1, 79), (150,))),  # packed samples straddling the tiles
]
ATTN_PARAMS = [(c, torch.float32) for c in ATTN_CASES] + [(ATTN_CASES[0], torch.float16)]


def _attn_spans(t, s, d, device):
    block_m, block_n, _, _ = attn_k._config(d, device)
    dkdv, dq = attn_k._bwd_configs(d, device)
    _spans("T (forward query tile)", t, block_m)
    _spans("S (forward key tile)", s, block_n)
    _spans("S (dk/dv key tile)", s, dkdv.block_n)
    _spans("T (dq query tile)", t, dq.block_m)


@pytest.mark.parametrize("case,dtype", ATTN_PARAMS, ids=lambda p: str(p))
def test_attention(device, case, dtype):
    """FlashAttention-2 tiles: forward 128 x 64 (4 warps at D=64, 8 at D=128), backward 64 x 64."""
    b, t, s, h, hkv, d, causal, starts, lengths = case
    _attn_spans(t, s, d, device)
    gen = torch.Generator().manual_seed(0)
    q, k, v = _rnd(gen, device, b, t, h, d), _rnd(gen, device, b, s, hkv, d), _rnd(gen, device, b, s, hkv, d)
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device)
    seg = None
    if lengths is not None:
        seg = torch.stack([torch.cat([torch.full((n,), i) for i, n in enumerate(row)]) for row in lengths]).to(device)
    check_against_reference(
        lambda q, k, v: attention(q, k, v, causal=causal, kv_start=kv_start, segment_ids=seg),
        [q, k, v], backend="triton", dtype=dtype, name=f"attention{case}",
    )


@pytest.mark.parametrize("tiles", ["64,64,8,3/64,64,8,3", "32,128,8,3/128,32,8,3"])
def test_attention_backward_tiles_knob(device, monkeypatch, tiles):
    """MMK_ATTN_BWD_TILES (what the GPU pass times against the defaults) replaces the backward tiles; the
    alternatives give the reference's gradients too, with a shared gated prompt (extra dk/dv programs)."""
    monkeypatch.setenv(attn_k.BWD_TILES_ENV, tiles)
    dkdv, dq = attn_k._bwd_configs(128, device)
    assert f"{dkdv.block_m},{dkdv.block_n},{dkdv.warps},{dkdv.stages}/{dq.block_m},{dq.block_n},{dq.warps}," \
           f"{dq.stages}" == tiles
    _spans("S (dk/dv key tile)", 140, dkdv.block_n)
    _spans("T (dq query tile)", 140, dq.block_m)
    gen = torch.Generator().manual_seed(0)
    q, k, v = _rnd(gen, device, 1, 140, 2, 128), _rnd(gen, device, 1, 140, 1, 128), _rnd(gen, device, 1, 140, 1, 128)
    pk, pv = _rnd(gen, device, 1, 10, 1, 128), _rnd(gen, device, 1, 10, 1, 128)
    gate = _rnd(gen, device, 2, scale=0.5)
    check_against_reference(lambda q, k, v, pk, pv, g: gated_prompt_attention(q, k, v, pk, pv, g),
                            [q, k, v, pk, pv, gate], backend="triton", dtype=torch.float32, name=f"tiles {tiles}")


@pytest.mark.parametrize("text", ["64,64,8,3", "64,64,8/64,64,8,3", "48,64,8,3/64,64,8,3", "64,64,3,3/64,64,8,3",
                                  "64,64,8,0/64,64,8,3", "a,b,c,d/64,64,8,3"])
def test_attention_backward_tiles_knob_errors(device, monkeypatch, text):
    monkeypatch.setenv(attn_k.BWD_TILES_ENV, text)
    with pytest.raises(ValueError, match="MMK_ATTN_BWD_TILES: expected 'block_m,block_n,warps,stages/"):
        attn_k._bwd_configs(128, device)


# (B, T, H, H_kv, D, L_p, prompt batch, gate size, gate_fn, kv_start)
GATED_CASES = [
    (2, 150, 4, 2, 64, 70, 1, 4, "tanh", None),  # shared prompt longer than a 64-key backward tile
    (2, 140, 2, 1, 128, 10, 2, 1, "raw", (0, 9)),  # per-sample prompts, scalar gate
]


@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in GATED_CASES] + [(GATED_CASES[0], torch.float16)],
                         ids=lambda p: str(p))
def test_gated_prompt_attention(device, case, dtype):
    """The attention tiles plus the prompt segment: BLOCK_P covers the whole prompt in the forward; in the
    backward the prompt's keys are extra 64-key programs of the dk/dv launch."""
    b, t, h, hkv, d, lp, bp, gs, gate_fn, starts = case
    _attn_spans(t, t, d, device)
    if lp > 16:
        _spans("L_p (dk/dv key tile)", lp, attn_k._bwd_configs(d, device)[0].block_n)
    gen = torch.Generator().manual_seed(0)
    tensors = [_rnd(gen, device, b, t, h, d), _rnd(gen, device, b, t, hkv, d), _rnd(gen, device, b, t, hkv, d),
               _rnd(gen, device, bp, lp, hkv, d), _rnd(gen, device, bp, lp, hkv, d), _rnd(gen, device, gs, scale=0.7)]
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device)
    gate_terms = b * t * d * (h if gs == 1 else 1)  # products summed into one gate-gradient element
    check_against_reference(
        lambda q, k, v, pk, pv, g: gated_prompt_attention(q, k, v, pk, pv, g, causal=True, gate_fn=gate_fn,
                                                          kv_start=kv_start),
        tensors, backend="triton", dtype=dtype, name=f"gated{case}", reduced={5: gate_terms},
    )


# (B, T, S, H, H_kv, D, L_p or 0, prompt batch, gate size, gate_fn, kv_start)
DECODE_CASES = [
    # 5 * 13 = 65 query rows per kv head > the 64-row tile at D=128; 5 splits of one 64-key tile each
    (1, 13, 300, 10, 2, 128, 10, 1, 10, "tanh", None),
    # 12 programs per split -> 22 splits wanted -> 23 key tiles in 12 splits of 2, the last one of 42 keys;
    # one partial 128-key prompt tile
    (3, 1, 1450, 8, 4, 64, 100, 3, 1, "raw", (0, 17, 700)),
]


@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in DECODE_CASES] + [(DECODE_CASES[1], torch.float16)],
                         ids=lambda p: str(p))
def test_decode_attention(device, case, dtype):
    """Split-KV decode (forward only: the op has no backward). The split count comes from the SM count:
    about two waves of 132 SMs, at most decode_attention.MAX_SPLITS, so a split spans several key tiles only
    when the cache is longer than (wanted splits) x 64 keys."""
    b, t, s, h, hkv, d, lp, bp, gs, gate_fn, starts = case
    rows = (h // hkv) * t
    block_r, block_n, block_p, _, _ = decode_k._config(rows, d, device)
    row_blocks = -(-rows // block_r)
    splits, chunk = decode_k._splits(s, b * hkv * row_blocks, block_n, device)
    assert splits > 1, "several splits"
    _spans("S (split chunk)", s, chunk)
    _spans("S (key tile)", s, block_n)
    if rows > 16:
        _spans("query rows (row tile)", rows, block_r)
    if case == DECODE_CASES[1]:
        assert chunk > block_n and s % chunk < block_n, "splits of several key tiles, the last of one partial tile"

    gen = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device)

    q = rnd(b, t, h, d)
    k, v = rnd(b, s + 5, hkv, d)[:, :s], rnd(b, s + 5, hkv, d)[:, :s]  # strided views of a longer cache
    prompt = {}
    if lp:
        prompt = dict(prompt_k=rnd(bp, lp, hkv, d), prompt_v=rnd(bp, lp, hkv, d), gate=rnd(gs, scale=0.7).float(),
                      gate_fn=gate_fn)
    kv_start = None if starts is None else torch.tensor(starts, dtype=torch.int32, device=device)

    def run(backend, dt):
        args = {n: (x.to(dt) if n in ("prompt_k", "prompt_v") else x) for n, x in prompt.items()}
        with mmkernels.use_backend(backend), torch.no_grad():
            return decode_attention(q.to(dt), k.to(dt), v.to(dt), kv_start=kv_start, **args)

    high, low, ours = run("reference", torch.float64), run("reference", dtype), run("triton", dtype)
    assert ours.dtype == dtype
    assert_close_to_reference(ours, low, high, f"decode {case}")


# ----------------------------------------------------------------------------------- norms, rope, swiglu

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(device, dtype):
    """The backward runs min(rows, 4 x SMs) = 528 programs on a GPU, each striding over rows: 600 rows leave
    72 programs with two rows. (The forward's one program per row and its row block do not depend on the
    device.)"""
    rows, n = 600, 100
    _spans("rows (backward programs)", rows, rms_k._num_bwd_programs(rows, torch.device(device)))
    gen = torch.Generator().manual_seed(0)
    x = _rnd(gen, device, 4, rows // 4, n)
    w = (1 + 0.5 * torch.randn(n, generator=gen)).to(device).requires_grad_()
    r = _rnd(gen, device, 4, rows // 4, n)
    check_against_reference(lambda x, w, r: rms_norm(x, w, 1e-5, residual=r), [x, w, r], backend="triton",
                            dtype=dtype, name="rms_norm", reduced={1: rows})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope(device, dtype):
    """Device-independent tiles: BLOCK_H heads x D/2 with BLOCK_H = 4096 / (D/2) = 64 at D=128; 72 query heads
    span two head blocks. Per-sample positions."""
    b, t, h, hkv, d = 2, 3, 72, 8, 128
    _spans("query heads (head tile)", h, 4096 // (d // 2))
    gen = torch.Generator().manual_seed(0)
    q, k = _rnd(gen, device, b, t, h, d), _rnd(gen, device, b, t, hkv, d)
    pos = (torch.arange(t).repeat(b, 1) + torch.arange(b)[:, None] * 5).to(device)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(d, 10000.0))
    check_against_reference(lambda q, k: rope(q, k, cos, sin), [q, k], backend="triton", dtype=dtype, name="rope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu(device, dtype):
    """Device-independent 1024-element blocks; 2250 elements make three programs, the last partial."""
    _spans("elements (block)", 3 * 5 * 150, 1024)
    gen = torch.Generator().manual_seed(0)
    g, u = _rnd(gen, device, 3, 5, 150), _rnd(gen, device, 3, 5, 150)
    check_against_reference(swiglu, [g, u], backend="triton", dtype=dtype, name="swiglu")


# ------------------------------------------------------------------------------------- losses, linears

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linear_cross_entropy(device, dtype):
    """Device-independent vocabulary block (BLOCK_V_MAX = 4096, the largest, as on a GPU): V = 4500 takes two
    online-logsumexp steps, the second partial; chunks of 4 tokens, label smoothing, ignored targets."""
    lead, d, vocab = (2, 5), 24, 4500
    _spans("V (vocabulary block)", vocab, lce_k.BLOCK_V_MAX)
    gen = torch.Generator().manual_seed(0)
    x = _rnd(gen, device, *lead, d)
    w = _rnd(gen, device, vocab, d, scale=d ** -0.5)
    bias = _rnd(gen, device, vocab, scale=0.5)
    target = torch.randint(0, vocab, lead, generator=gen)
    target[0, 1] = target[1, 3] = -100
    target = target.to(device)
    tokens = target.numel()
    check_against_reference(
        lambda x, w, b: linear_cross_entropy(x, w, target, b, label_smoothing=0.1, chunk_size=4),
        [x, w, bias], backend="triton", dtype=dtype, name="linear_cross_entropy", reduced={1: tokens, 2: tokens},
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paca_linear(device, dtype):
    """d_delta = s dy^T x_I: 64 x 32 tiles of (d_out, r), the 150 tokens split in 64-token ranges over programs
    (enough to fill 2 x 132 SMs: three splits, the last partial), partial sums added afterwards."""
    tokens, d_in, d_out, r = 150, 90, 70, 20
    block_r = paca_k._pow2_block(r, 16, 64)
    tiles = -(-d_out // 64) * -(-r // block_r)
    splits = paca_k._num_splits(tiles, -(-tokens // 64), torch.device(device))
    assert splits == 3, splits
    _spans("tokens (split range)", tokens, 64)
    _spans("d_out (tile)", d_out, 64)
    gen = torch.Generator().manual_seed(0)
    idx = ref_paca.select_columns(d_in, r, 0).to(device)
    w = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).half().float().to(device)
    x = _rnd(gen, device, 2, tokens // 2, d_in)
    delta = _rnd(gen, device, d_out, r, scale=0.1)
    bias = _rnd(gen, device, d_out)
    check_against_reference(lambda x, delta, b: paca_linear(x, w.to(x.dtype), delta, idx, 0.5, b),
                            [x, delta, bias], backend="triton", dtype=dtype, name="paca_linear",
                            reduced={1: tokens, 2: tokens})


# (x shape, d_out, d_in, kind, quantization block)
QUANT_CASES = [((2, 35, 160), 100, 160, "nf4", 32), ((75, 96), 130, 96, "int8", 64)]


@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in QUANT_CASES] + [(QUANT_CASES[0], torch.float16)],
                         ids=lambda p: str(p))
def test_quantized_linear(device, case, dtype):
    """QPaCA's frozen base: dequantize-in-GEMM with 64 x 64 x 64 tiles, forward (K loop) and dx (N loop)."""
    x_shape, d_out, d_in, kind, block = case
    bm, bn, bk, _ = quant_k._tiles(torch.device(device))
    _spans("tokens (M tile)", math.prod(x_shape[:-1]), bm)
    _spans("d_out (N tile)", d_out, bn)
    _spans("d_in (K tile)", d_in, bk)
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.05
    qw = QuantizedWeight.quantize(w, kind, block)
    qw = QuantizedWeight(qw.data.to(device), qw.scales.to(device), kind, qw.shape, block)
    gen = torch.Generator().manual_seed(1)
    x = _rnd(gen, device, *x_shape)
    check_against_reference(lambda x: quantized_linear(x, qw), [x], backend="triton", dtype=dtype,
                            name=f"quantized_linear{case}")


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
def test_paca_adamw(device, wdtype):
    """Device-independent tiles of 32 rows x 32 selected columns: 70 x 40 is 3 x 2 programs, partial in both.
    An optimizer step (no autograd): the kernel's exp_avg equals torch's order of operations, exp_avg_sq is
    within an ulp, delta within a few ulps of the update, and the weight columns are orig + s * (its own delta)
    rounded once."""
    d_out, d_in, r = 70, 90, 40
    _spans("d_out (row tile)", d_out, 32)
    _spans("r (column tile)", r, 32)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(d_out, d_in, generator=gen).to(device, wdtype)
    idx = ref_paca.select_columns(d_in, r, 0).to(device)
    orig = weight[:, idx].clone()
    state = [torch.randn(d_out, r, generator=gen) * 0.1, torch.randn(d_out, r, generator=gen),
             torch.randn(d_out, r, generator=gen) * 0.1, (torch.randn(d_out, r, generator=gen) * 0.01).abs()]
    lr, scaling = 1e-2, 0.5
    results = {}
    for backend in ("triton", "reference"):
        w = weight.clone()
        delta, grad, m, v = (s.clone().to(device) for s in state)
        with mmkernels.use_backend(backend):
            paca_adamw_sync(w, orig, idx, scaling, delta, grad, m, v, 3, lr, (0.9, 0.999), 1e-8, 0.05)
        results[backend] = (w, delta, m, v)
    (w, delta, m, v), (w_ref, delta_ref, m_ref, v_ref) = results["triton"], results["reference"]
    assert torch.equal(m, m_ref)
    torch.testing.assert_close(v, v_ref, rtol=F32_EPS, atol=0)
    torch.testing.assert_close(delta, delta_ref, rtol=1e-6, atol=4 * F32_EPS * lr)
    assert not torch.equal(delta, state[0].to(device))
    assert torch.equal(w[:, idx], ref_paca.synced_columns(orig, delta, scaling, wdtype))
    rest = torch.ones(d_in, dtype=torch.bool, device=device)
    rest[idx] = False
    assert torch.equal(w[:, rest], weight[:, rest])
    torch.testing.assert_close(w, w_ref, rtol=1e-3 if wdtype == torch.float16 else 1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------ adapters

@pytest.mark.parametrize("norm,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.float16)])
def test_mom_adapter(device, norm, dtype):
    """Forward 64 tokens x 128 features (200 = 128 + 72), backward 64 x 64 (200 = 3 x 64 + 8); T = 70 is two
    token blocks, the last partial. The backward runs min(token blocks, SMs / batch) programs per sample, so
    on a GPU every program here owns one token block (a program strides over several only when a sample has
    more than SMs / batch token blocks: T > 64 x 66 at batch 2)."""
    batch, t, d, h, groups = 2, 70, 200, 8, 2
    dev = torch.device(device)
    block_t, block_n, _, _ = mom_k._blocks(d, dev, backward=False)
    bwd_t, bwd_n, _, _ = mom_k._blocks(d, dev, backward=True)
    _spans("T (token tile)", t, block_t)
    _spans("d (forward feature tile)", d, block_n)
    _spans("d (backward feature tile)", d, bwd_n)
    assert mom_k._splits(batch, -(-t // bwd_t), dev) == 2
    gen = torch.Generator().manual_seed(0)
    inputs = [_rnd(gen, device, batch, t, d), _rnd(gen, device, h, d, scale=d ** -0.5), _rnd(gen, device, h, scale=0.5),
              _rnd(gen, device, d, h // groups, scale=0.5), _rnd(gen, device, d, scale=0.5),
              _rnd(gen, device, d, h // groups, scale=0.5), _rnd(gen, device, d, scale=0.5),
              torch.softmax(torch.randn(batch, 2, generator=gen) * 2, -1).to(device).requires_grad_()]
    if norm:
        inputs.append((1 + 0.2 * torch.randn(d, generator=gen)).to(device).requires_grad_())
    tokens = batch * t
    reduced = {1: tokens, 2: tokens * d, 3: tokens, 4: tokens, 5: tokens, 6: tokens, 7: t * d}
    if norm:
        reduced[8] = tokens

    def fn(x, A, a, B, b, D, d_b, w, nw=None):
        return mom_adapter(x, A, a, B, b, D, d_b, w, 0.7, nw)

    check_against_reference(fn, inputs, backend="triton", dtype=dtype, name=f"mom_adapter norm={norm}",
                            reduced=reduced)


def _phm_inputs(lead, d, k, n, r, device):
    g = torch.Generator().manual_seed(0)
    return [_rnd(g, device, *lead, d),
            _rnd(g, device, n, n, n, scale=n ** -0.5), _rnd(g, device, n, d // n, r, scale=(d // n) ** -0.5),
            _rnd(g, device, n, r, k // n, scale=(n * r) ** -0.5), _rnd(g, device, k, scale=0.3),
            _rnd(g, device, n, n, n, scale=n ** -0.5), _rnd(g, device, n, k // n, r, scale=(k // n) ** -0.5),
            _rnd(g, device, n, r, d // n, scale=(n * r) ** -0.5), _rnd(g, device, d, scale=0.3)]


# (leading dims, d, k, n, r): C = n*n*r = 16 -> 64-row blocks; C = 64 -> 32-row blocks
PHM_CASES = [((70,), 200, 72, 4, 1), ((2, 35), 136, 16, 8, 1)]


@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in PHM_CASES] + [(PHM_CASES[0], torch.float16)],
                         ids=lambda p: str(p))
def test_phm_adapter(device, case, dtype):
    """Row blocks of 64 (32 when C = n*n*r > 32), width chunks of 64, bottleneck chunks of up to 64; 8 warps
    in the backward."""
    lead, d, k, n, r = case
    m = math.prod(lead)
    for backward in (False, True):
        _, block_m, block_d, block_k, _, _ = phm_k._config(m, d, k, n, r, torch.device(device), backward)
        _spans("rows (row tile)", m, block_m)
        _spans("d (width tile)", d, block_d)
        if k > 16:
            _spans("k (bottleneck tile)", k, block_k)
    check_against_reference(phm_adapter, _phm_inputs(lead, d, k, n, r, device), backend="triton", dtype=dtype,
                            name=f"phm_adapter{case}")


@pytest.mark.parametrize("activation,dtype", [("swiglu", torch.float32), ("gelu", torch.float32),
                                              ("swiglu", torch.float16)])
def test_dynamic_expert(device, activation, dtype):
    """Device-independent row/column tiles of 64; on a GPU the weight-gradient kernel splits the 150 tokens
    of each sample over programs (enough to fill 2 x 132 SMs: three 64-token splits, the last partial) and
    sums the partials afterwards; under the interpreter it uses one split."""
    bsz, t, d_in, d_out, h = 2, 150, 70, 90, 16
    block_t, block_k, block_n, _ = dyn_k._blocks(t, d_in, d_out, h)
    _spans("T (row tile)", t, block_t)
    _spans("d_in (tile)", d_in, block_k)
    _spans("d_out (tile)", d_out, block_n)
    col_programs = -(-max(d_in, d_out) // 64)
    assert dyn_k._num_splits(col_programs * bsz, -(-t // block_t), torch.device(device)) == 3
    gen = torch.Generator().manual_seed(0)
    cols = 2 * h if activation == "swiglu" else h
    inputs = [_rnd(gen, device, bsz, t, d_in), _rnd(gen, device, bsz, d_in, cols, scale=2.0 / math.sqrt(d_in)),
              _rnd(gen, device, bsz, h, d_out, scale=1 / math.sqrt(h)), _rnd(gen, device, bsz, t, d_out)]
    check_against_reference(lambda x, wd, wu, res: dynamic_expert(x, wd, wu, residual=res, activation=activation),
                            inputs, backend="triton", dtype=dtype, name=f"dynamic_expert[{activation}]",
                            reduced={1: t, 2: t})
