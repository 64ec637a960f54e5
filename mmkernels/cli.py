"""The `mmkernels` command: train, generate, export, info, bench, params.

    mmkernels train [--config F] [...]  fine-tune with a method; with no arguments, the built-in multimodal demo
    mmkernels export --adapter D --merge --out O   fold an adapter into the weights: a HF LLaMA checkpoint
    mmkernels info                      versions, device, the compiled extension, the backend of each op
    mmkernels generate [--model DIR]    text generation; with no model, a tiny built-in LLaMA
    mmkernels bench OP [args...]        run benchmarks/bench_OP.py from a source checkout
    mmkernels params [--preset llama-7b] trainable parameters of a method on a model (built on the meta device)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    import torch

    from mmkernels import __version__, backend

    _, triton_why = backend.triton_import_status()
    _, c_why = backend.cuda_extension_status()
    cuda = torch.cuda.is_available()
    device = torch.device(args.device) if args.device else torch.device("cuda" if cuda else "cpu")
    print(f"mmkernels {__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton    {triton_why}")
    print(f"device    {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f"{'' if cuda else ' (no CUDA device visible)'}")
    print(f"_C        {c_why}")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} "
          f"MMK_BACKEND={os.environ.get('MMK_BACKEND', 'auto')}")
    print(f"\nbackend per op on {device}:")
    report = backend.report(device)
    width = max(map(len, report), default=0)
    for op, row in report.items():
        print(f"  {op:<{width}} -> {row['selected']}")
        if args.verbose:
            for name in backend.BACKENDS:
                print(f"      {name:<9} {row[name]}")
    if not args.verbose:
        print("(mmkernels info -v says why each backend is or is not available)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from mmkernels.train import config, distributed, trainer

    cfg = config.from_args(args)
    if args.processes is not None and not args.estimate:
        raise ValueError(f"--processes: only with --estimate (a run has the processes torchrun starts), got "
                         f"--processes {args.processes} without it")
    if args.fit is not None and not args.estimate:
        raise ValueError(f"--fit: only with --estimate, got --fit {args.fit} without it")
    if args.estimate:
        from mmkernels.train import memory

        print(memory.format_estimate(memory.estimate(cfg, args.processes), cfg, args.processes))
        if args.fit is not None:
            budget = memory.parse_size(args.fit, "--fit")
            print(memory.format_fit(memory.fit(cfg, budget, args.processes), budget))
        return 0
    run = trainer.Run.build(cfg)
    run.train()
    if run.dist.world_size > 1:
        distributed.finish()  # under torchrun: leave the process group and exit without teardown
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.adapter is not None:
        from mmkernels.train import inference

        return inference.run_generate(args)
    if args.image:
        raise SystemExit("--image: needs --adapter (a multimodal adapter trained by `mmkernels train`)")
    from mmkernels.models import demo

    return demo.run_generate(args)


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from mmkernels.train import inference

    if not args.merge:
        raise SystemExit("export: only --merge is supported (the adapter directory itself is the unmerged export)")
    inference.export_merged(args.adapter, args.out, args.model, getattr(torch, args.dtype))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"bench_{args.op}.py"
    if not script.exists():
        available = sorted(p.stem[len("bench_"):] for p in root.glob("bench_*.py")) if root.exists() else []
        print(f"mmkernels bench: no benchmark {args.op!r} (looked for {script}); "
              f"available: {available or 'none: benchmarks/ ships with a source checkout'}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.rest])


PRESETS = {
    "llama-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32),
    "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40),
    "tiny": None,
}


def _cmd_params(args: argparse.Namespace) -> int:
    import torch

    from mmkernels.methods import llama_adapter
    from mmkernels.models import Llama, LlamaConfig

    if args.model:
        config = LlamaConfig.from_json(args.model)
        source = args.model
    else:
        preset = PRESETS[args.preset]
        config = LlamaConfig.tiny() if preset is None else LlamaConfig(**preset)
        source = f"preset {args.preset}"
    targets = None
    if args.bias_scale_targets == "all":
        targets = llama_adapter.BIAS_SCALE_TARGETS
    elif args.bias_scale_targets not in (None, "default"):
        targets = tuple(t for t in args.bias_scale_targets.split(",") if t)
    cfg = llama_adapter.LlamaAdapterConfig(version=args.version, prompt_len=args.prompt_len,
                                           prompt_layers=args.prompt_layers, bias_scale_targets=targets)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = Llama(config)
    llama_adapter.apply(model, cfg)
    counts = llama_adapter.count_parameters(model)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    print(f"LLaMA-Adapter V{cfg.version} on {source} ({config.num_hidden_layers} layers, hidden "
          f"{config.hidden_size}): prompt_len={cfg.prompt_len}, prompt_layers={cfg.prompt_layers or 'all'}, "
          f"bias/scale on {list(cfg.bias_scale_targets) or 'nothing'}, train_norms={cfg.train_norms}")
    for name in llama_adapter.TASKS:
        print(f"  {name:<12} {counts[name]:>14,}")
    print(f"  {'trainable':<12} {counts['total']:>14,}")
    print(f"  {'frozen':<12} {base:>14,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a LLaMA with a method (no arguments: the built-in demo)",
                       description="Fine-tune a LLaMA-family model with one of mmkernels' methods. With no "
                                   "arguments: a tiny LLaMA and a tiny CLIP tower (random init) learn a synthetic "
                                   "multimodal multiple-choice task with LLaMA-Adapter V2 on CPU in a few minutes, "
                                   "and report held-out accuracy before and after.")
    from mmkernels.train import config as train_config

    train_config.add_arguments(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("info", help="versions, device, compiled extension and the backend of each op")
    p.add_argument("--device", default=None, help="report for this device (default: cuda if visible, else cpu)")
    p.add_argument("-v", "--verbose", action="store_true", help="say why each backend is (un)available")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("generate", help="generate text (default: a tiny built-in LLaMA, random weights)")
    from mmkernels.models import demo

    demo.add_generate_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("export", help="fold a trained adapter into the base model and write a HF LLaMA checkpoint")
    p.add_argument("--adapter", required=True, help="an adapter directory written by `mmkernels train`")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the weights (required)")
    p.add_argument("--model", default=None, help="the base checkpoint (default: the one the run used)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written weights (default float32)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("bench", help="run a kernel benchmark script (source checkout)")
    p.add_argument("op", help="rms_norm, swiglu, rope, attention, ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("params", help="count a method's trainable parameters on a model config (no weights)")
    p.add_argument("--method", default="llama_adapter", choices=["llama_adapter"], help="the method")
    p.add_argument("--model", default=None, help="a directory with a HF config.json (overrides --preset)")
    p.add_argument("--preset", default="llama-7b", choices=sorted(PRESETS), help="a built-in model shape")
    p.add_argument("--version", type=int, default=1, choices=[1, 2], help="LLaMA-Adapter version")
    p.add_argument("--prompt-len", type=int, default=10)
    p.add_argument("--prompt-layers", type=int, default=30, help="adapter layers from the top (0: all)")
    p.add_argument("--bias-scale-targets", default=None,
                   help="'default' (V1: none, V2: the block linears), 'all' (+ lm_head), or a comma list")
    p.set_defaults(func=_cmd_params)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt_layers", None) == 0:
        args.prompt_layers = None
    return int(args.func(args) or 0)


# What bad input raises (a config key, a path, a shape, a data line): the command reports it in one line.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def console(argv: Optional[List[str]] = None) -> int:
    """The `mmkernels` command: main(), with an input error printed as one line `mmkernels CMD: error: ...` and
    exit status 2 instead of a traceback (MMK_TRACEBACK=1 shows the traceback). main() itself raises, for
    callers and tests."""
    try:
        return main(argv)
    except INPUT_ERRORS as e:
        if os.environ.get("MMK_TRACEBACK", "0") == "1":
            raise
        args = sys.argv[1:] if argv is None else argv
        command = args[0] if args and not args[0].startswith("-") else None
        prog = f"mmkernels {command}" if command else "mmkernels"
        print(f"{prog}: error: {e}", file=sys.stderr)
        print("(MMK_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console())
