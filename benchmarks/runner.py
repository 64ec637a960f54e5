"""Shared benchmark runner: timing, peak memory, providers, the JSON row schema and the CLI.

Every `bench_<op>.py` script describes its op family with a `Bench` and calls `main(bench)`.

On a CUDA GPU, for every shape x provider x mode it
  1. builds fresh inputs (seeded), resolves the provider to a callable and builds the mode's closure;
  2. calls the closure twice untimed (torch.compile compiles, Triton autotunes here);
  3. records the peak memory of one call (reset_peak_memory_stats + max_memory_allocated, so the
     resident inputs and, for bwd, the saved forward graph are included);
  4. times it with `triton.testing.do_bench(fn, warmup, rep, grad_to_none, quantiles=[0.5, 0.2, 0.8])`
     (L2 is flushed before every timed call; input gradients are reset to None before every timed call);
  5. appends one JSON row to benchmarks/results/<gpu-name-slug>.jsonl.
Once per run, before the op rows, it measures two reference rows: a device-to-device copy (op "copy",
bytes read + written / time) and a large bf16 matmul (op "matmul"). `pct_of_copy_bw` of every row is its
GB/s relative to that copy row, `pct_of_matmul_flops` its TFLOP/s relative to that matmul row.

Without CUDA it runs a correctness smoke on tiny float32 shapes instead (our op with the reference
backend, and with the triton backend through the interpreter, against the reference forward + autograd
backward, via torch.allclose with the tolerance of SMOKE_TOL) and exits 0 with "no GPU: timings are
measured only on a GPU; correctness smoke passed", or 1 if the smoke fails. No timing is ever taken or
written on CPU. Without CUDA this module sets TRITON_INTERPRET=1 before mmkernels (and triton) is
imported, so the triton backend is always part of the smoke; TRITON_INTERPRET=0 from the caller skips it.

Modes:
  fwd      one forward call; inputs require grad, so autograd records the graph as in training.
  bwd      backward only: the forward runs once outside the timed region; every timed call is
           torch.autograd.backward(outputs, fixed grad outputs, retain_graph=True).
  fwd+bwd  forward then backward with the same fixed grad outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # The smoke path runs the triton backend through the interpreter. TRITON_INTERPRET must be set
    # before triton is imported (importing mmkernels imports it), so this happens before any import of
    # mmkernels. An explicit TRITON_INTERPRET=0 from the caller is respected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/bench_x.py` benchmarks the in-tree mmkernels
    sys.path.insert(0, str(REPO_ROOT))

ROW_KEYS: Tuple[str, ...] = (
    "op", "provider", "backend", "mode", "shape", "dtype", "ms_p50", "ms_p20", "ms_p80", "tflops", "gbps",
    "pct_of_copy_bw", "pct_of_matmul_flops", "peak_mem_mb", "gpu", "torch", "triton", "commit",
)
MODES: Tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = [0.5, 0.2, 0.8]  # do_bench returns the timings in this order: p50, p20, p80
NO_GPU_LINE = "no GPU: timings are measured only on a GPU; correctness smoke passed"
# (rtol, atol) of the smoke comparison per input dtype. The smoke runs float32 (the Triton interpreter
# mis-computes bf16 tl.dot, see DESIGN.md), where ours and the reference differ only in summation order.
SMOKE_TOL: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
SMOKE_DTYPE = torch.float32
COPY_BYTES = 1 << 30  # 1 GiB source buffer: far beyond L2
MATMUL_MNK = (8192, 8192, 8192)
MIN_SAMPLES = 10  # stretch `rep` so that slow calls still give this many timed samples (capped below)
MAX_REP_MS = 10_000
DEVICE = "cuda"  # where timed cases run (a module constant so the tests can drive the loop on CPU)


class Unavailable(Exception):
    """A provider cannot run this case (not installed, unsupported shape); skipped with a note."""


# ----------------------------------------------------------------------------------------------------
# Environment and bookkeeping
# ----------------------------------------------------------------------------------------------------


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def git_commit(cwd: Optional[os.PathLike] = None) -> str:
    """`git rev-parse --short HEAD`, plus "-dirty" when tracked files differ from HEAD (untracked files
    do not count, as with `git describe --dirty`); "unknown" outside a git work tree or without git."""
    cwd = str(cwd if cwd is not None else REPO_ROOT)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def env_info() -> Dict[str, Any]:
    """gpu, torch, triton and commit fields of every row."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {
        "gpu": torch.cuda.get_device_name() if HAS_CUDA else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": git_commit(),
    }


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")


# Library knobs a benchmark run may set in the environment to compare variants on the GPU; when set, each
# row's provider carries them, e.g. "mmkernels[MMK_ATTN_BWD_TILES=64,64,8,3/64,64,8,3]".
TAGGED_ENV: Tuple[str, ...] = ("MMK_ATTN_BWD_TILES",)


def tagged(provider: str) -> str:
    tags = [f"{k}={os.environ[k]}" for k in TAGGED_ENV if os.environ.get(k)]
    return f"{provider}[{';'.join(tags)}]" if tags else provider


def make_row(
    *,
    op: str,
    provider: str,
    backend: Optional[str],
    mode: str,
    shape: Dict[str, Any],
    dtype: str,
    ms: Sequence[float],
    flops: Optional[float],
    nbytes: Optional[float],
    copy_gbps: Optional[float],
    peak_mem_mb: Optional[float],
    env: Dict[str, Any],
    matmul_tflops: Optional[float] = None,
) -> Dict[str, Any]:
    """One result row. ms = (p50, p20, p80) in milliseconds. TFLOP/s and GB/s use the median:
    tflops = flops / (ms_p50 * 1e-3) / 1e12, gbps = nbytes / (ms_p50 * 1e-3) / 1e9,
    pct_of_copy_bw = 100 * gbps / copy_gbps, pct_of_matmul_flops = 100 * tflops / matmul_tflops.
    Each is None when one of its inputs is None."""
    p50, p20, p80 = (float(t) for t in ms)
    if not p50 > 0:
        raise ValueError(f"make_row: ms_p50 must be positive, got {p50}")
    tflops = None if flops is None else flops / (p50 * 1e-3) / 1e12
    gbps = None if nbytes is None else nbytes / (p50 * 1e-3) / 1e9
    pct = None if gbps is None or not copy_gbps else 100.0 * gbps / copy_gbps
    pct_flops = None if tflops is None or not matmul_tflops else 100.0 * tflops / matmul_tflops
    row = {
        "op": op,
        "provider": tagged(provider),
        "backend": backend,
        "mode": mode,
        "shape": dict(shape),
        "dtype": dtype,
        "ms_p50": p50,
        "ms_p20": p20,
        "ms_p80": p80,
        "tflops": tflops,
        "gbps": gbps,
        "pct_of_copy_bw": pct,
        "pct_of_matmul_flops": pct_flops,
        "peak_mem_mb": peak_mem_mb,
        "gpu": env.get("gpu"),
        "torch": env.get("torch"),
        "triton": env.get("triton"),
        "commit": env.get("commit"),
    }
    assert tuple(row) == ROW_KEYS
    return row


def append_rows(path: os.PathLike, rows: Sequence[Dict[str, Any]]) -> None:
    """Append rows to a JSON-lines file (one object per line), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")


def results_path(out: Optional[str], gpu: Optional[str]) -> Path:
    """Where a run appends its rows: <out or benchmarks/results>/<gpu-name-slug>.jsonl, or `out` itself
    when it names a .jsonl file."""
    if out and out.endswith(".jsonl"):
        return Path(out)
    return Path(out or RESULTS_DIR) / f"{slug(gpu or 'unknown')}.jsonl"


def read_rows(path: os.PathLike) -> List[Dict[str, Any]]:
    rows = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


# ----------------------------------------------------------------------------------------------------
# Op description
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Resolved:
    """A provider resolved for one case: the callable (same signature as the reference), the backend
    recorded in the row, and a context entered around all calls of the case (e.g. an SDPA backend)."""

    fn: Callable
    backend: Optional[str] = None
    context: Callable[[], ContextManager] = contextlib.nullcontext


@dataclasses.dataclass
class Bench:
    """One op family.

    make_inputs(shape, dtype, device, generator) -> tuple of arguments; tensors to differentiate have
        requires_grad=True. `ours` and `reference` are called with them and return a tensor or a tuple.
    flops(shape, mode) / nbytes(shape, mode, dtype): the work of one call of the mode, or None where
        the measure is not meaningful for the op (memory-bound ops have no TFLOP/s, attention no GB/s).
    peers: extra providers, name -> factory(shape, inputs) returning a callable or a `Resolved`, or
        raising `Unavailable(reason)`.
    presets: shape lists for --shapes; the first shape of "default" is the target shape.
    """

    op: str
    ours: Callable
    reference: Callable
    make_inputs: Callable[[Dict[str, Any], torch.dtype, torch.device, torch.Generator], tuple]
    presets: Dict[str, List[Dict[str, Any]]]
    smoke_shapes: List[Dict[str, Any]]
    flops: Callable[[Dict[str, Any], str], Optional[float]]
    nbytes: Callable[[Dict[str, Any], str, torch.dtype], Optional[float]]
    peers: Dict[str, Callable[[Dict[str, Any], tuple], Any]] = dataclasses.field(default_factory=dict)
    description: str = ""

    def provider_names(self) -> List[str]:
        return ["mmkernels", "eager", "compile", *self.peers]


def randn(shape, dtype, device, generator, requires_grad=False, scale=1.0) -> torch.Tensor:
    """Seeded normal values; the generator must live on `device`."""
    t = torch.randn(shape, dtype=torch.float32, device=device, generator=generator) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def generator(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def leaves_of(inputs: Sequence) -> List[torch.Tensor]:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def grad_outputs(outs: Sequence[torch.Tensor], seed: int = 1) -> List[torch.Tensor]:
    """Fixed output gradients: seeded normals with the layout (strides) of each output."""
    grads = []
    for i, o in enumerate(outs):
        g = torch.empty_like(o)
        g.normal_(generator=generator(o.device, seed + i))
        grads.append(g)
    return grads


def resolve(bench: Bench, provider: str, shape: Dict[str, Any], inputs: tuple, device: torch.device) -> Resolved:
    """The provider's callable for this case. "mmkernels" is our op with the automatic backend
    ("mmkernels:<backend>" forces one); "eager" the reference; "compile" the reference under
    torch.compile (compiled afresh for every case)."""
    import mmkernels
    from mmkernels import backend as mmk_backend

    name, _, forced = provider.partition(":")
    if name == "mmkernels":
        if forced:
            ok, why = mmk_backend.availability(forced, bench.op, device)
            if not ok:
                raise Unavailable(why)
            return Resolved(bench.ours, forced, lambda: mmkernels.use_backend(forced))
        return Resolved(bench.ours, mmk_backend.select(bench.op, device))
    if forced:
        raise Unavailable(f"provider {provider!r}: only 'mmkernels' takes a ':<backend>' suffix")
    if name == "eager":
        return Resolved(bench.reference)
    if name == "compile":
        torch._dynamo.reset()
        return Resolved(torch.compile(bench.reference, dynamic=False))
    if name in bench.peers:
        r = bench.peers[name](shape, inputs)
        return r if isinstance(r, Resolved) else Resolved(r)
    raise Unavailable(f"unknown provider {provider!r}; expected one of {bench.provider_names()}")


def build_mode(fn: Callable, inputs: tuple, mode: str) -> Tuple[Callable[[], None], List[torch.Tensor]]:
    """(closure timed for `mode`, tensors whose .grad is reset to None before each timed call)."""
    leaves = leaves_of(inputs)
    if mode == "fwd":

        def run_fwd():
            fn(*inputs)

        return run_fwd, []
    if not leaves:
        raise Unavailable(f"mode {mode}: no input requires grad")
    outs = [o for o in as_tuple(fn(*inputs)) if isinstance(o, torch.Tensor) and o.requires_grad]
    grads = grad_outputs(outs)
    if mode == "bwd":

        def run_bwd():
            torch.autograd.backward(outs, grads, retain_graph=True)

        return run_bwd, leaves
    if mode == "fwd+bwd":
        del outs

        def run_fwd_bwd():
            o = [t for t in as_tuple(fn(*inputs)) if isinstance(t, torch.Tensor) and t.requires_grad]
            torch.autograd.backward(o, grads)

        return run_fwd_bwd, leaves
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


# ----------------------------------------------------------------------------------------------------
# GPU measurement
# ----------------------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], None], *, warmup: int, rep: int, grad_to_none=None) -> List[float]:
    """[p50, p20, p80] milliseconds of one call of `fn` on the GPU, from `triton.testing.do_bench`
    (which flushes L2 before every timed call and sets the .grad of `grad_to_none` to None before it).
    `warmup` and `rep` are milliseconds, as in do_bench."""
    from triton.testing import do_bench

    # Slow calls (eager attention at long T) would give do_bench a single sample in `rep` ms; stretch
    # rep so every case gets at least MIN_SAMPLES timed calls.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    est = start.elapsed_time(end)
    rep = int(max(rep, min(MIN_SAMPLES * est * 1.2, MAX_REP_MS)))
    return list(do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, quantiles=QUANTILES))


def peak_memory_mb(fn: Callable[[], None], leaves: Sequence[torch.Tensor]) -> float:
    """Peak allocated memory (MiB) over one call, resident tensors included."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


@torch.no_grad()
def seeded_hf_llama(config, dtype, device, seed: int = 0):
    """A transformers LlamaForCausalLM (sdpa) with seeded random weights, the same on every run whatever
    transformers' init does: linear weights ~ N(0, 1/fan_in) give logits of O(1) at any width (so the loss
    depends on every layer), norm weights ~ N(1, 0.3), biases zero (drawing nothing from the generator, so the
    other weights do not depend on whether the config has biases)."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    if torch.device(device).type == "meta":  # shapes only (memory traces): no values to draw
        return hf.to(dtype).train()
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in hf.named_parameters():
        if name.endswith(".bias"):
            p.zero_()
            continue
        if "norm" in name:
            std, mean = 0.3, 1.0
        else:
            std, mean = (1.0 if "embed_tokens" in name else p.shape[1] ** -0.5), 0.0
        p.copy_(mean + std * torch.randn(p.shape, device=device, generator=gen))
    return hf.to(dtype).train()


@torch.no_grad()
def mmkernels_llama_from_hf(hf, dtype, device):
    """An mmkernels Llama holding a copy of hf's weights (not shared: PaCA rewrites its weights in place)."""
    from mmkernels.models import Llama, LlamaConfig

    config = LlamaConfig.from_dict(hf.config.to_dict())
    with torch.device(device):
        model = Llama(config)
    model.to(device=device, dtype=dtype)
    state = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in hf.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model.train()


class StepCase:
    """One provider's training step for the step benchmarks: its model, its loss function of the token ids,
    its optimizer, the backend its row reports and a context (e.g. autocast) the step runs in."""

    def __init__(self, model, loss_fn: Callable[[torch.Tensor], torch.Tensor], optimizer, backend: Optional[str],
                 context: Callable = contextlib.nullcontext) -> None:
        self.model, self.loss_fn, self.optimizer, self.backend, self.context = (model, loss_fn, optimizer, backend,
                                                                                context)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def losses(self, ids: torch.Tensor, steps: int) -> List[float]:
        """The losses of `steps` training steps on `ids` (the smokes compare runs by them)."""
        with self.context():
            return [self.step(ids).item() for _ in range(steps)]


def compare_losses(name: str, got: List[float], want: List[float]) -> Optional[str]:
    """A failure line when two loss curves differ beyond the smoke tolerance, else None."""
    return _compare(name, [torch.tensor(got)], [torch.tensor(want)])


def step_ids(shape: Dict[str, Any], device) -> torch.Tensor:
    """The seeded (B, T) token ids a training-step case trains on (shape keys B, T, vocab)."""
    gen = generator(torch.device(device), seed=7)
    return torch.randint(0, shape["vocab"], (shape["B"], shape["T"]), device=device, generator=gen)


def time_step_case(case: StepCase, *, op: str, mode: str, provider: str, shape, dtype, warmup: int, rep: int,
                   copy_gbps, env, matmul_tflops, flops: float):
    """(ms quantiles, row) of one whole training step on step_ids(shape): two untimed steps (optimizer state,
    autotuning, the allocator), the peak memory of one step, then the timing."""
    ids = step_ids(shape, DEVICE)
    with case.context():

        def fn():
            case.step(ids)

        for _ in range(2):
            fn()
        peak = peak_memory_mb(fn, [])
        ms = time_fn(fn, warmup=warmup, rep=rep)
    row = make_row(op=op, provider=provider.partition(":")[0], backend=case.backend, mode=mode, shape=shape,
                   dtype=dtype_name(dtype), ms=ms, flops=flops, nbytes=None, copy_gbps=copy_gbps, peak_mem_mb=peak,
                   env=env, matmul_tflops=matmul_tflops)
    return ms, row


def _free() -> None:
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def measure_copy(env, warmup: int, rep: int) -> Dict[str, Any]:
    """Device-to-device copy of COPY_BYTES: GB/s = (bytes read + bytes written) / time."""
    n = COPY_BYTES // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    fn = functools.partial(dst.copy_, src)
    fn()
    peak = peak_memory_mb(fn, [])
    ms = time_fn(fn, warmup=warmup, rep=rep)
    row = make_row(
        op="copy", provider="torch", backend=None, mode="fwd", shape={"bytes": COPY_BYTES}, dtype="bf16",
        ms=ms, flops=None, nbytes=2 * COPY_BYTES, copy_gbps=None, peak_mem_mb=peak, env=env,
    )
    row["pct_of_copy_bw"] = 100.0
    del src, dst, fn
    _free()
    return row


def measure_matmul(env, warmup: int, rep: int) -> Dict[str, Any]:
    """bf16 (M, K) @ (K, N): TFLOP/s = 2 M N K / time."""
    m, n, k = MATMUL_MNK
    a = torch.randn(m, k, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=DEVICE)
    fn = functools.partial(torch.matmul, a, b)
    fn()
    peak = peak_memory_mb(fn, [])
    ms = time_fn(fn, warmup=warmup, rep=rep)
    row = make_row(
        op="matmul", provider="torch", backend=None, mode="fwd", shape={"M": m, "N": n, "K": k}, dtype="bf16",
        ms=ms, flops=2.0 * m * n * k, nbytes=None, copy_gbps=None, peak_mem_mb=peak, env=env,
    )
    row["pct_of_matmul_flops"] = 100.0
    del a, b, fn
    _free()
    return row


def _autograd_context(provider: str, mode: str) -> ContextManager:
    # AOTAutograd donates saved buffers to the compiled backward by default, which forbids
    # retain_graph=True; the bwd mode needs retain_graph, so it compiles without donation.
    if provider == "compile" and mode == "bwd":
        import torch._functorch.config as functorch_config  # not an attribute of torch until imported

        if hasattr(functorch_config, "donated_buffer"):
            return functorch_config.patch(donated_buffer=False)
    return contextlib.nullcontext()


def run_case(bench: Bench, provider: str, shape, mode: str, dtype: torch.dtype, warmup: int, rep: int,
             copy_gbps: Optional[float], env, matmul_tflops: Optional[float] = None) -> Dict[str, Any]:
    device = torch.device(DEVICE)
    inputs = bench.make_inputs(shape, dtype, device, generator(device))
    resolved = resolve(bench, provider, shape, inputs, device)
    with resolved.context(), _autograd_context(provider.partition(":")[0], mode):
        fn, leaves = build_mode(resolved.fn, inputs, mode)
        for _ in range(2):  # compile / autotune / allocator warm-up, untimed
            fn()
        peak = peak_memory_mb(fn, leaves)
        ms = time_fn(fn, warmup=warmup, rep=rep, grad_to_none=leaves or None)
    return make_row(
        op=bench.op, provider=provider.partition(":")[0], backend=resolved.backend, mode=mode, shape=shape,
        dtype=dtype_name(dtype), ms=ms, flops=bench.flops(shape, mode), nbytes=bench.nbytes(shape, mode, dtype),
        copy_gbps=copy_gbps, peak_mem_mb=peak, env=env, matmul_tflops=matmul_tflops,
    )


def _fmt(row: Dict[str, Any]) -> str:
    rate = ""
    if row["tflops"] is not None:
        rate += f"  {row['tflops']:8.1f} TFLOP/s"
    if row["gbps"] is not None:
        rate += f"  {row['gbps']:8.1f} GB/s"
    if row["pct_of_copy_bw"] is not None:
        rate += f"  {row['pct_of_copy_bw']:5.1f}% of copy"
    if row["pct_of_matmul_flops"] is not None:
        rate += f"  {row['pct_of_matmul_flops']:5.1f}% of matmul"
    backend = f"[{row['backend']}]" if row["backend"] else ""
    return (
        f"{row['op']:<9} {row['provider'] + backend:<22} {row['mode']:<8} {row['ms_p50']:9.4f} ms "
        f"[{row['ms_p20']:.4f}, {row['ms_p80']:.4f}]{rate}  peak {row['peak_mem_mb']:.0f} MiB"
    )


# ----------------------------------------------------------------------------------------------------
# CPU correctness smoke
# ----------------------------------------------------------------------------------------------------


def _fwd_bwd(fn: Callable, inputs: tuple):
    outs = [o for o in as_tuple(fn(*inputs))]
    diff = [o for o in outs if o.requires_grad]
    torch.autograd.backward(diff, grad_outputs(diff))
    return [o.detach() for o in outs], [t.grad for t in leaves_of(inputs)]


def _clone(inputs: tuple) -> tuple:
    return tuple(
        t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs
    )


def _compare(name: str, got, want) -> Optional[str]:
    """torch.allclose with the tolerance of the reference's dtype; shapes and dtypes must match exactly
    (allclose alone would broadcast)."""
    if len(got) != len(want):
        return f"{name}: {len(got)} tensors, expected {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None:
            return f"{name} #{i}: missing"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{name} #{i}: got {tuple(a.shape)} {a.dtype}, expected {tuple(b.shape)} {b.dtype}"
        rtol, atol = SMOKE_TOL.get(b.dtype, SMOKE_TOL[torch.float32])
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            err = (a.double() - b.double()).abs().max().item()
            return f"{name} #{i}: max abs error {err:.3g} fails allclose(rtol={rtol}, atol={atol})"
    return None


def smoke_backends(op: str, device: torch.device) -> List[str]:
    """The mmkernels backends a CPU smoke checks `op` on: reference, and triton where it can run (else said)."""
    from mmkernels import backend as mmk_backend

    ok, why = mmk_backend.availability("triton", op, device)
    if not ok:
        print(f"smoke: triton backend not checked ({why})")
    return ["reference", "triton"] if ok else ["reference"]


def smoke(bench: Bench) -> List[str]:
    """Returns the failures (empty when the smoke passed). float32, CPU, tiny shapes."""
    import mmkernels

    device = torch.device("cpu")
    failures: List[str] = []
    notes = set()
    backends = smoke_backends(bench.op, device)
    for shape in bench.smoke_shapes:
        base = bench.make_inputs(shape, SMOKE_DTYPE, device, generator(device))
        want_out, want_grad = _fwd_bwd(bench.reference, _clone(base))
        checked = []
        for b in backends:
            try:
                with mmkernels.use_backend(b):
                    got_out, got_grad = _fwd_bwd(bench.ours, _clone(base))
            except Exception as exc:  # a crash is a failure, not a skip
                failures.append(f"{bench.op} {shape} backend={b}: {type(exc).__name__}: {exc}")
                continue
            for what, got, want in (("output", got_out, want_out), ("grad", got_grad, want_grad)):
                err = _compare(f"{bench.op} {shape} backend={b} {what}", got, want)
                if err:
                    failures.append(err)
            checked.append(f"mmkernels[{b}]")
        # Peers that run on CPU (SDPA does) are checked too; the others are noted.
        for name in bench.peers:
            try:
                inputs = _clone(base)
                r = resolve(bench, name, shape, inputs, device)
                with r.context():
                    got_out, got_grad = _fwd_bwd(r.fn, inputs)
            except Exception as exc:
                why = str(exc) if isinstance(exc, Unavailable) else f"{type(exc).__name__} on CPU: {str(exc)[:160]}"
                if (name, why) not in notes:
                    notes.add((name, why))
                    print(f"smoke: provider {name} not checked: {why}")
                continue
            for what, got, want in (("output", got_out, want_out), ("grad", got_grad, want_grad)):
                err = _compare(f"{bench.op} {shape} provider={name} {what}", got, want)
                if err:
                    failures.append(err)
            checked.append(name)
        # The timing closures of every mode build and run (once, untimed) for ours and eager.
        for provider in ("mmkernels", "eager"):
            for mode in MODES:
                try:
                    inputs = _clone(base)
                    r = resolve(bench, provider, shape, inputs, device)
                    with r.context():
                        fn, _ = build_mode(r.fn, inputs, mode)
                        fn()
                except Exception as exc:
                    failures.append(f"{bench.op} {shape} {provider} {mode} closure: {type(exc).__name__}: {exc}")
        print(f"smoke: {bench.op} {shape}: checked {', '.join(checked) or 'nothing'} against the reference")
    # The work formulas are defined for every preset shape and mode.
    for shapes in bench.presets.values():
        for shape in shapes:
            for mode in MODES:
                for dt in DTYPES.values():
                    for v in (bench.flops(shape, mode), bench.nbytes(shape, mode, dt)):
                        if v is not None and not v > 0:
                            failures.append(f"{bench.op} {shape} {mode}: non-positive work count {v}")
    return failures


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def parse_args(bench: Bench, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"bench_{bench.op}.py",
        description=f"Benchmark {bench.op}. {bench.description}".strip(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shapes", choices=sorted(bench.presets), default=None,
                   help="shape preset (default: 'default'; with --quick: the target shape only)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (default bf16)")
    p.add_argument("--providers", default=",".join(bench.provider_names()),
                   help="comma-separated providers (default: %(default)s); 'mmkernels:<backend>' forces a backend")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated modes (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="results folder; rows go to <out>/<gpu-name-slug>.jsonl (default: benchmarks/results). "
                        "A path ending in .jsonl is the file itself")
    p.add_argument("--quick", action="store_true", help="target shape only, shorter warmup/rep (5/20 ms)")
    args = p.parse_args(argv)
    args.providers = [s.strip() for s in args.providers.split(",") if s.strip()]
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    known = set(bench.provider_names())
    for prov in args.providers:
        if prov.partition(":")[0] not in known:
            p.error(f"--providers: unknown provider {prov!r}; expected some of {sorted(known)}")
    for mode in args.modes:
        if mode not in MODES:
            p.error(f"--modes: unknown mode {mode!r}; expected some of {list(MODES)}")
    return args



def run_or_smoke(run: Callable[[argparse.Namespace], int], args: argparse.Namespace,
                 smoke_fn: Callable[[], List[str]]) -> int:
    """A script's exit status: its timed run on a GPU, else its CPU correctness smoke."""
    return run(args) if HAS_CUDA else report_smoke(smoke_fn())


def report_smoke(failures: List[str]) -> int:
    """Print the CPU correctness smoke's outcome; the exit status of a script without a GPU."""
    if failures:
        print(f"correctness smoke FAILED ({len(failures)}):")
        for f in failures:
            print("  " + f)
        return 1
    print(NO_GPU_LINE)
    return 0


def record_case(out: str, noted: set, provider: str, mode: str, shape: Dict[str, Any],
                measure: Callable[[], Dict[str, Any]]) -> int:
    """Run one timed case and append its row. Unavailable providers, out-of-memory and peers' failures are
    noted (no row); returns 1 when one of our own providers failed (the script then exits non-zero)."""
    try:
        row = measure()
        append_rows(out, [row])
        print(_fmt(row))
    except Unavailable as exc:
        if (provider, str(exc)) not in noted:
            noted.add((provider, str(exc)))
            print(f"note: provider {provider} skipped: {exc}")
    except torch.cuda.OutOfMemoryError:
        print(f"note: {provider} {mode} {shape}: out of GPU memory, no row written")
    except Exception as exc:
        if provider.startswith("mmkernels"):
            print(f"ERROR: {provider} {mode} {shape}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
            return 1
        print(f"note: {provider} {mode} {shape} failed, no row written: {type(exc).__name__}: {str(exc)[:300]}")
    finally:
        _free()
    return 0


@dataclasses.dataclass
class Session:
    """What every timed case of one script run shares: the dtype and shapes asked for, the repetitions, the
    environment, the results file and the device's measured copy bandwidth and matmul peak."""
    dtype: torch.dtype
    shapes: List[Dict[str, Any]]
    warmup: int
    rep: int
    env: Dict[str, Any]
    out: Path
    copy_gbps: float
    matmul_tflops: float


def begin(args: argparse.Namespace, presets: Dict[str, List[Dict[str, Any]]],
          step_mode: Optional[str] = None) -> Session:
    """Resolve the arguments, print the environment and record the copy and matmul reference rows. step_mode:
    the one mode of a script whose every case is a training step (a --modes choice is then noted unused)."""
    shapes = presets[args.shapes or "default"]
    if args.quick and args.shapes is None:
        shapes = shapes[:1]
    warmup, rep = (5, 20) if args.quick else (25, 100)
    if step_mode is not None and args.modes != list(MODES):
        print(f"note: --modes is not used here: every case is one training step (mode {step_mode!r})")
    env = env_info()
    out = results_path(args.out, env["gpu"])
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit']}  -> {out}")
    ref_rows = [measure_copy(env, warmup, rep), measure_matmul(env, warmup, rep)]
    append_rows(out, ref_rows)
    for row in ref_rows:
        print(_fmt(row))
    return Session(DTYPES[args.dtype], shapes, warmup, rep, env, out, ref_rows[0]["gbps"], ref_rows[1]["tflops"])


def main(bench: Bench, argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(bench, argv)
    if not HAS_CUDA:
        return report_smoke(smoke(bench))

    s = begin(args, bench.presets)
    errors = 0
    noted = set()
    for shape in s.shapes:
        print(f"--- {bench.op} {shape} {args.dtype}")
        for provider in args.providers:
            for mode in args.modes:
                errors += record_case(s.out, noted, provider, mode, shape, lambda: run_case(
                    bench, provider, shape, mode, s.dtype, s.warmup, s.rep, s.copy_gbps, s.env, s.matmul_tflops))
    return finish(errors)


def flop_failures(op: str, presets: Dict[str, List[Dict[str, Any]]], flops: Callable[..., float],
                  modes: Optional[Sequence[str]] = None) -> List[str]:
    """A failure line per preset shape (and mode, for flops(shape, mode)) whose FLOP count is not positive;
    modes None: a training-step script, flops(shape)."""
    failures = []
    for shapes in presets.values():
        for shape in shapes:
            for mode in (None,) if modes is None else modes:
                if not (flops(shape) if mode is None else flops(shape, mode)) > 0:
                    failures.append(f"{op} {shape}{'' if mode is None else ' ' + mode}: non-positive FLOP count")
    return failures


def finish(errors: int) -> int:
    """A script's exit status: 1 (said) when some mmkernels case failed."""
    if errors:
        print(f"{errors} mmkernels case(s) failed")
        return 1
    return 0
