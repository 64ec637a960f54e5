"""Benchmark one LLaMA-7B-shaped linear layer with PaCA / QPaCA against LoRA (PEFT and ours) and the frozen layer.

The case is one target linear layer as a method trains it: frozen weight, no bias, input x (B, T, d_in) that
requires grad (the layer sits inside a network), the adapter's trainable parameters. Modes: fwd, bwd,
fwd+bwd (runner's definitions); the backward computes dx and the adapter gradients, never dW.

Shapes (bf16, B=8, T=2048): d_in=d_out=4096 (q/k/v/o of LLaMA-7B), 4096->11008 (gate/up), 11008->4096 (down).
Presets: default = the three; target = 4096x4096 only (also what --quick runs).
Targets (issue; goals that only a GPU run's rows can show met or not): PaCA fwd+bwd >= 1.3x faster than PEFT
LoRA at equal rank, and <= 1.10x the frozen linear; QPaCA of a LLaMA-7B fits in 12 GiB.

Providers (every layer is built from the same seeded weight; adapters hold seeded nonzero values, i.e. a
layer in the middle of training):
    mmkernels_paca_r16   nn.PaCALinear(base, r=16): W_eff held in the weight, only x_I (T x r) saved
    mmkernels_paca_r8    the same with r=8 (equal rank to the LoRA r=8 rows)
    mmkernels_qpaca_nf4  nn.QPaCALinear(base, r=16, kind="nf4", block=64): NF4 base, exact bf16 columns
    mmkernels_qpaca_int8 nn.QPaCALinear(base, r=16, kind="int8")
    mmkernels_lora_r8    nn.LoRALinear(base, rank=8, alpha=16) (ops.lora_linear: one GEMM reads x for W and A)
    mmkernels_lora_r16   the same with rank 16
    peft_lora_r8         HF PEFT's lora.Linear: get_peft_model(wrapper around the nn.Linear, LoraConfig(r=8,
                         lora_alpha=16, target_modules=["proj"], lora_dropout=0.0)), PEFT's defaults (its
                         adapter weights are float32 for a bf16 base: autocast_adapter_dtype=True)
    peft_lora_r16        the same with r=16
    frozen               the bare nn.Linear with a frozen weight: the floor (dx only)
"mmkernels_*" providers take a ":<backend>" suffix (paca and qpaca: the paca_linear / quantized_linear backend;
LoRA has plain-PyTorch GEMMs only). Their failures make the script exit 1; a peer's failure is a note.

FLOP formula (the frozen layer's matmul work, N = B*T; every provider is measured against it, so an adapter's
own GEMMs show up as lost TFLOP/s): fwd = 2*N*d_in*d_out; bwd = 2*N*d_in*d_out (dx); fwd+bwd = the sum.
gbps is null. peak_mem_mb covers the resident weights, x, the saved activations and the gradients.

Weight bytes: each case prints the bytes of its layer's parameters and buffers (`layer_bytes`, checked
against the modules by the smoke), and the run prints the weight bytes of a whole LLaMA-7B under QPaCA-NF4
r=16 (`llama7b_weight_bytes`; weights only: activations and optimizer state come on top).

Like bench_llama_adapter_layer.py, a module benchmark with its own case loop from runner's pieces. Without a
GPU it runs a correctness smoke (float32, tiny shapes): PaCA and QPaCA (reference and triton backends) against
a plain-PyTorch oracle built from the layer's weight, our LoRALinear against PEFT's on the same A and B (output
and the gradients of x and of every adapter parameter), the weight-byte formulas against the modules, and
every provider's closure of every mode once, untimed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

import runner  # sets TRITON_INTERPRET on a machine without GPU before mmkernels (and triton) import
import mmkernels
from mmkernels import backend as mmk_backend

OP = "paca_linear"
QUANT_OP = "quantized_linear"
PROVIDERS = ("mmkernels_paca_r16", "mmkernels_paca_r8", "mmkernels_qpaca_nf4", "mmkernels_qpaca_int8",
             "mmkernels_lora_r8", "mmkernels_lora_r16", "peft_lora_r8", "peft_lora_r16", "frozen")
LORA_ALPHA = 16.0
QPACA_RANK = 16
NF4_BLOCK = 64


def _shape(d_in=4096, d_out=4096, b=8, t=2048):
    return {"B": b, "T": t, "d_in": d_in, "d_out": d_out}


TARGET = _shape()
PRESETS = {"default": [TARGET, _shape(4096, 11008), _shape(11008, 4096)], "target": [TARGET]}
SMOKE_SHAPES = [_shape(128, 48, b=2, t=5), _shape(64, 80, b=1, t=3)]
SPEC = types.SimpleNamespace(  # what runner.parse_args reads of a Bench
    op=OP, presets=PRESETS, provider_names=lambda: list(PROVIDERS),
    description="One LLaMA-7B linear layer: PaCA / QPaCA vs LoRA (PEFT and ours) vs the frozen layer.",
)


def flops(shape: Dict[str, Any], mode: str) -> float:
    one = 2.0 * shape["B"] * shape["T"] * shape["d_in"] * shape["d_out"]
    return {"fwd": one, "bwd": one, "fwd+bwd": 2 * one}[mode]


def nbytes(shape: Dict[str, Any], mode: str, dtype: torch.dtype) -> Optional[float]:
    return None  # compute-bound: no meaningful GB/s


# ----------------------------------------------------------------------------------------------------
# Weight bytes
# ----------------------------------------------------------------------------------------------------


def parse_provider(provider: str) -> Tuple[str, Optional[int], Optional[str]]:
    """'mmkernels_paca_r16:triton' -> ('paca', 16, 'triton'); kinds: frozen, paca, qpaca_nf4, qpaca_int8,
    lora, peft_lora."""
    name, _, forced = provider.partition(":")
    if name not in PROVIDERS:
        raise runner.Unavailable(f"unknown provider {provider!r}; expected one of {list(PROVIDERS)}")
    if forced and not name.startswith("mmkernels"):
        raise runner.Unavailable(f"provider {provider!r}: only 'mmkernels_*' providers take a ':<backend>' suffix")
    if name == "frozen":
        return "frozen", None, None
    body = name[len("mmkernels_"):] if name.startswith("mmkernels_") else name
    if body.startswith("qpaca_"):
        return body, QPACA_RANK, forced or None
    kind, _, rank = body.rpartition("_r")
    return kind, int(rank), forced or None


def layer_bytes(kind: str, r: Optional[int], d_in: int, d_out: int, elem: int = 2, block: int = NF4_BLOCK) -> int:
    """Bytes of a layer's parameters and buffers (weights, adapter, kept columns, indices) for a base weight
    of `elem` bytes per element. PaCA's delta is float32; PEFT keeps its LoRA factors in float32."""
    w = d_out * d_in
    if kind == "frozen":
        return w * elem
    if kind == "paca":  # W_eff + original columns + delta + idx (int64)
        return w * elem + d_out * r * elem + d_out * r * 4 + r * 8
    if kind in ("qpaca_nf4", "qpaca_int8"):
        blocks = -(-w // block)  # the last NF4 block is zero-padded (reference/quantize.py nf4_blocks)
        base = blocks * (block // 2 + 4) if kind == "qpaca_nf4" else (w + d_out * 4)
        return base + d_out * r * elem + d_out * r * 4 + r * 8
    if kind == "lora":  # [W; A] in one buffer + B, all in the base dtype
        return (d_out + r) * d_in * elem + d_out * r * elem
    if kind == "peft_lora":
        return w * elem + (r * d_in + d_out * r) * 4
    raise ValueError(f"kind: unknown layer kind {kind!r}")


def module_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


LLAMA7B = dict(hidden=4096, intermediate=11008, layers=32, vocab=32000)


def llama7b_weight_bytes(kind: str = "qpaca_nf4", r: int = QPACA_RANK, elem: int = 2) -> int:
    """All weights of a LLaMA-7B with `kind` on q, k, v, o, gate, up, down: targets + embeddings, lm_head, norms."""
    h, i = LLAMA7B["hidden"], LLAMA7B["intermediate"]
    per_layer = (4 * layer_bytes(kind, r, h, h, elem) + 2 * layer_bytes(kind, r, h, i, elem)
                 + layer_bytes(kind, r, i, h, elem) + 2 * h * elem)
    return LLAMA7B["layers"] * per_layer + 2 * LLAMA7B["vocab"] * h * elem + h * elem


# ----------------------------------------------------------------------------------------------------
# The layers, with the same (seeded) values
# ----------------------------------------------------------------------------------------------------


def make_values(shape: Dict[str, Any], device, gen) -> Dict[str, torch.Tensor]:
    """float32 base weight and adapter values (A, B for LoRA of the largest rank; deltas for PaCA)."""
    d_in, d_out = shape["d_in"], shape["d_out"]

    def rnd(*size, scale=1.0):
        return torch.randn(*size, device=device, generator=gen) * scale

    r_max = 16
    return {"weight": rnd(d_out, d_in, scale=d_in ** -0.5), "lora_A": rnd(r_max, d_in, scale=d_in ** -0.5),
            "lora_B": rnd(d_out, r_max, scale=0.05), "delta": rnd(d_out, r_max, scale=0.05)}


class _Wrapper(nn.Module):
    """The smallest model PEFT can wrap: one linear layer named `proj`."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@torch.no_grad()
def build_layer(kind: str, r: Optional[int], shape, dtype, device, vals) -> Tuple[nn.Module, List[torch.Tensor]]:
    """(layer, its trainable parameters in a fixed order)."""
    from mmkernels.nn.lora_linear import LoRALinear
    from mmkernels.nn.paca_linear import PaCALinear
    from mmkernels.nn.qpaca_linear import QPaCALinear

    base = nn.Linear(shape["d_in"], shape["d_out"], bias=False, device=device, dtype=dtype)
    base.weight.copy_(vals["weight"])
    base.requires_grad_(False)
    if kind == "frozen":
        return base, []
    if kind == "paca":
        layer = PaCALinear(base, r, name="layer")
        layer.delta.copy_(vals["delta"][:, :r])
        layer.sync_()
        return layer, [layer.delta]
    if kind.startswith("qpaca_"):
        layer = QPaCALinear(base, r, name="layer", kind=kind[len("qpaca_"):], block=NF4_BLOCK)
        layer.delta.copy_(vals["delta"][:, :r])
        return layer, [layer.delta]
    if kind == "lora":
        layer = LoRALinear(base, r, alpha=LORA_ALPHA)
        layer.lora_A.copy_(vals["lora_A"][:r])
        layer.lora_B.copy_(vals["lora_B"][:, :r])
        return layer, [layer.lora_A, layer.lora_B]
    if kind == "peft_lora":
        missing = [m for m in ("peft", "transformers") if importlib.util.find_spec(m) is None]
        if missing:
            raise runner.Unavailable(f"{' and '.join(missing)} not installed")
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about wrapping a model that is no transformers model
            model = get_peft_model(_Wrapper(base), LoraConfig(r=r, lora_alpha=LORA_ALPHA, target_modules=["proj"],
                                                              lora_dropout=0.0))
        layer = model.base_model.model.proj
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.copy_(vals["lora_A"][:r])
        b.copy_(vals["lora_B"][:, :r])
        return layer, [a, b]
    raise ValueError(f"kind: unknown layer kind {kind!r}")


class Case:
    """One provider's callable fn(x, *params) -> output (params only so that build_mode resets their
    gradients; fn reaches them through the layer), its inputs, the row's backend and a context."""

    def __init__(self, fn: Callable, inputs: tuple, backend: Optional[str], layer: nn.Module,
                 context: Callable = contextlib.nullcontext) -> None:
        self.fn, self.inputs, self.backend, self.layer, self.context = fn, inputs, backend, layer, context


def _backend_op(kind: str) -> Optional[str]:
    return OP if kind == "paca" else QUANT_OP if kind.startswith("qpaca_") else None


def make_case(provider: str, shape: Dict[str, Any], dtype, device) -> Case:
    kind, r, forced = parse_provider(provider)
    op = _backend_op(kind)
    context = contextlib.nullcontext
    if forced:
        if op is None:
            raise runner.Unavailable(f"provider {provider!r}: {kind} has no backend choice (plain PyTorch GEMMs)")
        ok, why = mmk_backend.availability(forced, op, device)
        if not ok:
            raise runner.Unavailable(why)
        context = lambda: mmkernels.use_backend(forced)  # noqa: E731
    gen = runner.generator(device)
    vals = make_values(shape, device, gen)
    x = runner.randn((shape["B"], shape["T"], shape["d_in"]), dtype, device, gen, requires_grad=True)
    layer, params = build_layer(kind, r, shape, dtype, device, vals)

    def fn(x, *_params):
        return layer(x)

    backend = (forced or mmk_backend.select(op, device)) if op else None
    return Case(fn, (x, *params), backend, layer, context)


# ----------------------------------------------------------------------------------------------------
# GPU: the case loop
# ----------------------------------------------------------------------------------------------------


def run_case(provider: str, shape, mode: str, dtype, warmup: int, rep: int, copy_gbps, env,
             matmul_tflops=None) -> Dict[str, Any]:
    device = torch.device(runner.DEVICE)
    case = make_case(provider, shape, dtype, device)
    with case.context():
        fn, leaves = runner.build_mode(case.fn, case.inputs, mode)
        for _ in range(2):  # autotune / allocator warm-up, untimed
            fn()
        peak = runner.peak_memory_mb(fn, leaves)
        ms = runner.time_fn(fn, warmup=warmup, rep=rep, grad_to_none=leaves or None)
    return runner.make_row(
        op=OP, provider=provider.partition(":")[0], backend=case.backend, mode=mode, shape=shape,
        dtype=runner.dtype_name(dtype), ms=ms, flops=flops(shape, mode), nbytes=nbytes(shape, mode, dtype),
        copy_gbps=copy_gbps, peak_mem_mb=peak, env=env, matmul_tflops=matmul_tflops,
    )


def print_weight_bytes(providers: List[str], shape: Dict[str, Any], dtype: torch.dtype) -> None:
    elem = torch.empty(0, dtype=dtype).element_size()
    parts = []
    for provider in providers:
        try:
            kind, r, _ = parse_provider(provider)
        except runner.Unavailable:
            continue
        parts.append(f"{provider}={layer_bytes(kind, r, shape['d_in'], shape['d_out'], elem) / 2**20:.1f}")
    print(f"weights (MiB): {'  '.join(parts)}")


def run(args) -> int:
    s = runner.begin(args, PRESETS)
    print(f"LLaMA-7B weights under QPaCA-NF4 r={QPACA_RANK}: {llama7b_weight_bytes() / 2**30:.2f} GiB "
          f"(bf16 frozen: {llama7b_weight_bytes('frozen') / 2**30:.2f} GiB; activations and optimizer state not included)")
    errors, noted = 0, set()
    for shape in s.shapes:
        print(f"--- {OP} {shape} {args.dtype}")
        print_weight_bytes(args.providers, shape, s.dtype)
        for provider in args.providers:
            for mode in args.modes:
                errors += runner.record_case(s.out, noted, provider, mode, shape, lambda: run_case(
                    provider, shape, mode, s.dtype, s.warmup, s.rep, s.copy_gbps, s.env, s.matmul_tflops))
    return runner.finish(errors)


# ----------------------------------------------------------------------------------------------------
# CPU: correctness smoke
# ----------------------------------------------------------------------------------------------------


def _fwd_bwd(case: Case) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    with case.context():
        out = case.fn(*case.inputs)
        torch.autograd.backward([out], runner.grad_outputs([out]))
    return out.detach(), [t.grad for t in case.inputs]


def oracle(case: Case, kind: str) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Output and gradients of (x, delta) from the method's formula in plain PyTorch autograd:
    W_full = base with columns I replaced by cols + s delta; y = x W_full^T."""
    from mmkernels.ops.quantized_linear import QuantizedWeight

    layer = case.layer
    x = case.inputs[0].detach().clone().requires_grad_(True)
    delta = layer.delta.detach().clone().requires_grad_(True)
    with torch.no_grad():
        if kind == "paca":
            base, cols = layer.weight.detach().float().clone(), layer.orig_cols.float()
        else:  # the quantized base is what QPaCA promises to compute with outside the columns
            w0 = QuantizedWeight(layer.qdata, layer.qscales, layer.kind, (layer.out_features, layer.in_features),
                                 layer.block)
            base, cols = w0.dequantize(torch.float32), layer.cols.float()
        base[:, layer.idx] = 0
    onehot = F.one_hot(layer.idx, layer.in_features).to(base.dtype)  # (r, d_in): scatters the columns
    w_full = base + (cols + layer.scaling * delta) @ onehot
    out = F.linear(x, w_full.to(x.dtype))
    torch.autograd.backward([out], runner.grad_outputs([out]))
    return out.detach(), [x.grad, delta.grad]


def smoke() -> List[str]:
    device, dtype = torch.device("cpu"), runner.SMOKE_DTYPE
    failures: List[str] = []
    backends = runner.smoke_backends(OP, device)
    noted = set()
    for shape in SMOKE_SHAPES:
        checked = []
        # PaCA and QPaCA against the formula.
        for provider in ("mmkernels_paca_r16", "mmkernels_paca_r8", "mmkernels_qpaca_nf4", "mmkernels_qpaca_int8"):
            kind, _, _ = parse_provider(provider)
            for b in backends:
                try:
                    case = make_case(f"{provider}:{b}", shape, dtype, device)
                    got_out, got_grad = _fwd_bwd(case)
                    want_out, want_grad = oracle(case, kind)
                except Exception as exc:
                    failures.append(f"{OP} {shape} {provider}[{b}]: {type(exc).__name__}: {exc}")
                    continue
                for what, got, want in (("output", [got_out], [want_out]), ("grad of x", got_grad[:1], want_grad[:1]),
                                        ("grad of delta", got_grad[1:], want_grad[1:])):
                    err = runner._compare(f"{OP} {shape} {provider}[{b}] {what}", got, want)
                    if err:
                        failures.append(err)
                checked.append(f"{provider}[{b}]")
        # Our LoRALinear against PEFT's lora.Linear on the same weight, A and B.
        for r in (8, 16):
            try:
                want_out, want_grad = _fwd_bwd(make_case(f"peft_lora_r{r}", shape, dtype, device))
            except runner.Unavailable as exc:
                if str(exc) not in noted:
                    noted.add(str(exc))
                    print(f"smoke: no PEFT to compare LoRA with ({exc})")
                continue
            try:
                got_out, got_grad = _fwd_bwd(make_case(f"mmkernels_lora_r{r}", shape, dtype, device))
            except Exception as exc:
                failures.append(f"{OP} {shape} mmkernels_lora_r{r}: {type(exc).__name__}: {exc}")
                continue
            for what, got, want in (("output", [got_out], [want_out]), ("grads of x, A, B", got_grad, want_grad)):
                err = runner._compare(f"{OP} {shape} mmkernels_lora_r{r} vs peft {what}", got, want)
                if err:
                    failures.append(err)
            checked.append(f"mmkernels_lora_r{r}")
        # The byte formulas against the modules, at bf16 (the benchmark's dtype) and the smoke's float32.
        for provider in PROVIDERS:
            kind, r, _ = parse_provider(provider)
            for dt in (torch.bfloat16, torch.float32):
                try:
                    case = make_case(provider, shape, dt, device)
                except runner.Unavailable:
                    continue
                have = module_bytes(case.layer)
                want = layer_bytes(kind, r, shape["d_in"], shape["d_out"], torch.empty(0, dtype=dt).element_size())
                if have != want:
                    failures.append(f"{OP} {shape} {provider} {dt}: layer_bytes {want}, the module holds {have}")
        # Every provider's timed closure of every mode builds and runs once, untimed.
        for provider in PROVIDERS:
            for mode in runner.MODES:
                try:
                    case = make_case(provider, shape, dtype, device)
                    with case.context():
                        fn, _ = runner.build_mode(case.fn, case.inputs, mode)
                        fn()
                except runner.Unavailable as exc:
                    if (provider, str(exc)) not in noted:
                        noted.add((provider, str(exc)))
                        print(f"smoke: provider {provider} not run: {exc}")
                except Exception as exc:
                    failures.append(f"{OP} {shape} {provider} {mode} closure: {type(exc).__name__}: {exc}")
        print(f"smoke: {OP} {shape}: checked {', '.join(checked) or 'nothing'}")
    return failures + runner.flop_failures(OP, PRESETS, flops, runner.MODES)


def main(argv: Optional[List[str]] = None) -> int:
    args = runner.parse_args(SPEC, argv)
    return runner.run_or_smoke(run, args, smoke)


if __name__ == "__main__":
    sys.exit(main())
