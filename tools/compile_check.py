"""Compile every Triton kernel of mmkernels for Hopper (sm_90) on a machine without a GPU.

Triton's NVIDIA backend compiles without a device (its wheel carries ptxas): a stand-in driver reports a
Hopper target (capability 9.0, 132 SMs, 227 KiB of shared memory per block, 1024 threads) and launches
nothing, and the launch helpers are told they run on a GPU, so they pick their GPU tiles. Then one training
step of every method the trainer drives, on a one-layer model of LLaMA-7B's widths (hidden 4096, 32 heads,
8 kv heads, head_dim 128, intermediate 11008; bf16 weights, float32 adapters, bf16 autocast; the vocabulary
just past the loss kernel's largest tile),
the multimodal ones also with images through a one-layer CLIP-L/14-shaped tower (small images), and a short generation
with the KV cache, run with the triton backend forced: every kernel variant those
reach is compiled to a cubin and checked against the device limits (Triton raises OutOfResources) and for
register spills: the local-memory stores and loads in its SASS (cuobjdump), of which a kernel may have a
few (a register parked across a loop; --max-spills, default 4). The table lists every variant's registers,
stack and spill instructions.

No kernel runs, so nothing here is computed (the outputs are whatever memory held): this checks that the
kernels build for the GPU with the installed Triton, not that they are right (the gpu tests do that).

    python tools/compile_check.py [--methods lora,paca] [--training-only] [--capability 90] [--max-spills 4]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Tuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_check: TRITON_INTERPRET=1 is set; unset it (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HOPPER = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
          "sm_clock_rate": 1980000, "mem_clock_rate": 3201000, "mem_bus_width": 6144}
METHODS = ("base", "llama_adapter", "lora", "paca", "qpaca_nf4", "qpaca_int8", "compacter", "lavin", "hyperllava")
MULTIMODAL = ("llama_adapter", "lavin", "hyperllava")


class Variant(NamedTuple):
    """One compiled kernel: what ptxas made of it (registers per thread, the stack frame, and the local-memory
    stores and loads in its machine code: register spills) and its launch shape. `key` (Triton's hash) tells
    apart variants that print alike."""

    name: str
    shared: int
    warps: int
    stages: int
    registers: int = -1
    stack: int = -1
    spills: int = -1  # STL + LDL instructions in the SASS
    key: str = ""


class CompiledKernels:
    """Every kernel the stand-in driver was asked to load. Triton creates a kernel's launcher and then loads
    its binary: the launcher opens the row, load_binary completes it with the cubin's resource usage."""

    def __init__(self) -> None:
        self.rows: List[Variant] = []

    def launcher(self, src, metadata):
        self.rows.append(Variant(src.fn.__name__, metadata.shared, metadata.num_warps, metadata.num_stages,
                                 key=metadata.hash))
        return lambda *args, **kwargs: None  # launches nothing

    def loaded(self, registers: int, stack: int, spills: int) -> None:
        self.rows[-1] = self.rows[-1]._replace(registers=registers, stack=stack, spills=spills)


_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_LOCAL_ACCESS = re.compile(r"\b(?:STL|LDL)(?:\.\w+)*\s")


def resource_usage(cubin: bytes) -> Tuple[int, int, int]:
    """(registers per thread, stack bytes per thread, local-memory store and load instructions) of the one
    kernel in a cubin, from cuobjdump (Triton's wheel carries it): its resource report and, when the kernel has
    a stack frame or local memory at all, its SASS (about a second per kernel, so only then). A stack frame
    without local accesses costs nothing; STL/LDL are registers spilled and reloaded."""
    key = hashlib.sha1(cubin).hexdigest()
    if key not in _USAGE:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            report = subprocess.run([_CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True,
                                    check=True).stdout
            found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", report)
            if found is None:
                raise RuntimeError(f"compile_check: no resource usage in cuobjdump's report:\n{report}")
            registers, stack, local = (int(g) for g in found.groups())
            spills = 0
            if stack or local:
                sass = subprocess.run([_CUOBJDUMP, "-sass", f.name], capture_output=True, text=True,
                                      check=True).stdout
                spills = len(_LOCAL_ACCESS.findall(sass))
        _USAGE[key] = (registers, stack, spills)
    return _USAGE[key]


_USAGE: Dict[str, Tuple[int, int, int]] = {}


def max_threads(registers: int, props: Dict[str, int]) -> int:
    """The most threads a block of this kernel may have: registers are allocated per warp in units of 256, out
    of the SM's register file (what the driver reports as the function's max threads per block)."""
    per_warp = -(-registers * props["warpSize"] // 256) * 256
    return min(1024, props["max_num_regs"] // max(per_warp, 1) * props["warpSize"])


class _Utils:
    def __init__(self, props: Dict[str, int], kernels: CompiledKernels) -> None:
        self.props, self.kernels = props, kernels

    def get_device_properties(self, device):
        return dict(self.props)

    def load_binary(self, name, kernel, shared, device):
        registers, stack, spills = resource_usage(kernel)
        self.kernels.loaded(registers, stack, spills)
        # Triton reads spills from the driver as local bytes / 4; the stack frame is where ptxas spills.
        return None, None, registers, stack // 4, max_threads(registers, self.props)

    def unload_module(self, module):
        pass


class StandInDriver:
    """Enough of Triton's CUDA driver for compiling and 'launching': the target and the device limits."""

    def __init__(self, capability: int, kernels: CompiledKernels) -> None:
        self.capability = capability
        self.utils = _Utils(HOPPER, kernels)
        self.launcher_cls = kernels.launcher

    def get_current_target(self):
        return GPUTarget("cuda", self.capability, 32)

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("compile_check: nothing is timed here")


def install(capability: int) -> CompiledKernels:
    """Make Triton compile for `capability` and the launch helpers choose their GPU configurations."""
    from mmkernels import backend
    from mmkernels.kernels import _device

    kernels = CompiledKernels()
    driver.set_active(StandInDriver(capability, kernels))
    backend.triton_interpret = lambda: True  # the triton backend accepts CPU tensors ...
    _device.compiled = lambda device: True   # ... and the helpers pick GPU tiles for them
    _device.sm_count = lambda device: HOPPER["multiprocessor_count"]
    return kernels


class Bf16MatmulsInFloat32(TorchDispatchMode):
    """The workloads' CPU matrix products (the frozen projections and their dX = dY W, also inside the ops'
    CPU implementations, LoRA's and PaCA's) in float32, cast back to bfloat16. Without native bf16
    instructions (an AVX2 CPU) torch multiplies bf16 by a row-major right operand, as every dX = dY W does,
    about 50x slower than float32: at LLaMA-7B widths that was most of the check's ten minutes. Only the
    scaffolding around the kernels changes; what the kernels are given (dtypes, shapes, strides) does not."""

    aten = torch.ops.aten
    PRODUCTS = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.matmul.default,
                aten.mm.out, aten.bmm.out, aten.matmul.out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS and any(_is_bf16(a) for a in args):
            out = kwargs.pop("out", None)
            product = func.overloadpacket(*(a.float() if _is_bf16(a) else a for a in args), **kwargs)
            return product.to(torch.bfloat16) if out is None else out.copy_(product)
        if func.namespace == "mmkernels":  # an op's own products too (LoRA's and PaCA's dX = dY W): its CPU
            with self:                     # implementation runs with this mode in place
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        return func(*args, **kwargs)


def _is_bf16(a) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 and a.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------
# The workloads: one training step per method, and generation
# ----------------------------------------------------------------------------------------------------

OPTIONS = {"base": None, "llama_adapter": ("llama_adapter", {"version": 2}), "lora": ("lora", {"rank": 8}),
           "paca": ("paca", {"rank": 16}), "qpaca_nf4": ("paca", {"rank": 16, "quantize": "nf4"}),
           "qpaca_int8": ("paca", {"rank": 16, "quantize": "int8"}), "compacter": ("compacter", {}),
           "lavin": ("lavin", {}), "hyperllava": ("hyperllava", {"language_layers": 1, "guidance_layer": 0})}


def _model(layers: int = 1):
    from mmkernels.kernels.linear_cross_entropy import BLOCK_V_MAX
    from mmkernels.models import Llama, LlamaConfig

    # vocab: past the cross-entropy kernel's largest vocabulary tile (BLOCK_V_MAX), which is all the kernel
    # sees of it; 32000 would only make the CPU's float matmuls of the chunked loss slower.
    cfg = LlamaConfig(vocab_size=BLOCK_V_MAX + 3, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # finite values: quantizers and checks read them
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.bfloat16) * 0.02)
    return model


def _clip_l(layers: int = 1):
    """A CLIP-L/14-shaped vision tower (width 1024, 16 heads, patch 14) of `layers` layers, bf16, on 56-pixel
    images: 17 tokens instead of 257 (the token count is a runtime size to the kernels; the widths are not)."""
    from transformers import CLIPVisionConfig

    from mmkernels.models.vision import VisionTower

    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                           num_attention_heads=16, image_size=56, patch_size=14, projection_dim=768)
    return VisionTower.from_config(cfg).to(torch.bfloat16).eval()


def train_step(method: str, tokens: int = 13, images: bool = False) -> None:
    """One forward + backward of the trainer's loss (fused linear + cross-entropy) under bf16 autocast;
    `tokens` is odd so the kernels see unaligned sizes, as real batches do. images: a batch with images
    through a CLIP-L-shaped tower (the multimodal methods' vision-side kernels)."""
    from mmkernels.train import method_specs, trainer
    from mmkernels.train.data import Batch

    model = _model(2 if method == "hyperllava" else 1)  # HyperLLaVA: guidance in block 0, an expert in block 1
    vision = _clip_l() if images else None
    pixels = torch.randn(2, 3, 56, 56) if images else None
    if OPTIONS[method] is None:  # the base model with everything trainable that has a kernel: norms, lm_head
        model.norm.weight.requires_grad_(True)
        model.lm_head.weight.requires_grad_(True)
        spec = method_specs.get("lora")  # not applied: only its text inputs are used
    else:
        name, options = OPTIONS[method]
        spec = method_specs.get(name)
        spec.apply(model, options, vision)
    trainer.master_weights(model)
    ids = torch.randint(0, model.config.vocab_size, (2, tokens))
    batch = Batch(ids, ids, torch.ones_like(ids, dtype=torch.bool), pixels, torch.full((2,), images))
    loss_module = trainer.LossModule(model, spec, vision, fused=True, chunk=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_module(batch)
    loss.backward()
    if method == "paca":  # the fused AdamW + column sync of the deltas
        from mmkernels.nn import PaCAAdamW
        from mmkernels.methods import paca

        PaCAAdamW(paca.layers(model).values()).step()


def generation(method: str) -> None:
    """A left-padded prefill (causal attention with kv_start) and decode steps (split-KV decode attention),
    with LLaMA-Adapter's prompt segment when method is llama_adapter."""
    from mmkernels.train import method_specs

    model = _model()
    if method == "llama_adapter":
        method_specs.get("llama_adapter").apply(model, {"version": 1}, None)
    with torch.no_grad():
        model.generate([[1] * 37, [2] * 20], max_new_tokens=3)


def segments() -> None:
    """Packed rows: attention with segment ids, forward and backward, both head dims."""
    from mmkernels import ops

    for dim in (64, 128):
        q = torch.randn(2, 53, 8, dim, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(2, 53, 2, dim, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(2, 53, 2, dim, dtype=torch.bfloat16, requires_grad=True)
        seg = torch.cat([torch.zeros(2, 20, dtype=torch.long), torch.ones(2, 33, dtype=torch.long)], 1)
        ops.attention(q, k, v, causal=True, segment_ids=seg).sum().backward()


def workloads(methods: List[str], shared: bool = True) -> Dict[str, Callable[[], None]]:
    """The training steps of `methods`; shared: also generation and packed attention (every method's)."""
    out: Dict[str, Callable[[], None]] = {f"train {m}": (lambda m=m: train_step(m)) for m in methods}
    for m in MULTIMODAL:
        if m in methods:
            out[f"train {m} with images"] = lambda m=m: train_step(m, images=True)
    if not shared:
        return out
    out["generate base"] = lambda: generation("base")
    out["generate llama_adapter"] = lambda: generation("llama_adapter")
    out["attention segments"] = segments
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma list of training steps (default: %(default)s); '' for generation and packed "
                        "attention only, which run unless --training-only")
    p.add_argument("--training-only", action="store_true",
                   help="only the training steps of --methods, without the generation and packed-attention "
                        "workloads (for a second run beside one that has them)")
    p.add_argument("--capability", type=int, default=90, help="compute capability to compile for (default 90)")
    p.add_argument("--shared-limit", type=int, default=HOPPER["max_shared_mem"],
                   help="shared memory per block in bytes that every kernel must fit (default: Hopper's, %(default)s)")
    p.add_argument("--max-spills", type=int, default=4,
                   help="local-memory load/store instructions (register spills) a kernel may have (default: "
                        "%(default)s: a register or two parked across a loop, one store and one load each, as "
                        "the dynamic expert's row backward has; the spilling tiles this check found had 60+)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    HOPPER["max_shared_mem"] = args.shared_limit
    kernels = install(args.capability)
    import mmkernels

    print(f"compile_check: triton {triton.__version__}, torch {torch.__version__}, target sm_{args.capability}")
    failures = []
    for name, run in workloads(methods, shared=not args.training_only).items():
        start, before = time.perf_counter(), len(kernels.rows)
        try:
            with mmkernels.use_backend("triton"), Bf16MatmulsInFloat32():
                run()
        except Exception as exc:  # every workload is tried; the failures are listed at the end
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print(f"  {name}: FAILED ({failures[-1]})")
            continue
        print(f"  {name}: {len(kernels.rows) - before} kernels compiled, {time.perf_counter() - start:.1f} s")
    distinct = sorted({row.key: row for row in kernels.rows}.values())
    print(f"{len(distinct)} distinct kernel variants (shared memory, warps, stages; registers and stack bytes "
          "per thread, local-memory (spill) instructions):")
    for row in distinct:
        print(f"  {row.name:<32} {row.shared:>7} B  {row.warps:>2} warps  {row.stages} stages  "
              f"{row.registers:>3} regs  {row.stack:>4} B stack  {row.spills:>3} spill instr")
    for row in distinct:
        if row.spills > args.max_spills:
            failures.append(f"{row.name} ({row.warps} warps, {row.stages} stages, {row.shared} B shared): "
                            f"{row.spills} local-memory instructions ({row.stack} B of stack per thread: registers "
                            f"spilled), over --max-spills {args.max_spills}")
    if failures:
        print(f"compile_check FAILED ({len(failures)}):")
        for f in failures:
            print("  " + f)
        return 1
    print("compile_check passed: every kernel compiled for the target and fits its limits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
