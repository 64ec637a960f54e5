"""The `mmkernels` command: info, generate, bench.

    mmkernels info                      versions, device, the compiled extension, the backend of each op
    mmkernels generate [--model DIR]    text generation; with no model, a tiny built-in LLaMA
    mmkernels bench OP [args...]        run benchmarks/bench_OP.py from a source checkout
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
    for op, row in backend.report(device).items():
        print(f"  {op:<12} -> {row['selected']}")
        if args.verbose:
            for name in backend.BACKENDS:
                print(f"      {name:<9} {row[name]}")
    if not args.verbose:
        print("(mmkernels info -v says why each backend is or is not available)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from mmkernels.models import demo

    return demo.run_generate(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"bench_{args.op}.py"
    if not script.exists():
        available = sorted(p.stem[len("bench_"):] for p in root.glob("bench_*.py")) if root.exists() else []
        print(f"mmkernels bench: no benchmark {args.op!r} (looked for {script}); "
              f"available: {available or 'none: benchmarks/ ships with a source checkout'}", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, str(script), *args.rest])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmkernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="versions, device, compiled extension and the backend of each op")
    p.add_argument("--device", default=None, help="report for this device (default: cuda if visible, else cpu)")
    p.add_argument("-v", "--verbose", action="store_true", help="say why each backend is (un)available")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("generate", help="generate text (default: a tiny built-in LLaMA, random weights)")
    from mmkernels.models import demo

    demo.add_generate_arguments(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="run a kernel benchmark script (source checkout)")
    p.add_argument("op", help="rms_norm, swiglu, rope, attention, ...")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the script")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
