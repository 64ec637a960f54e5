"""Bar charts from the benchmark rows: one PNG per (GPU, op, shape, dtype).

    python benchmarks/plot.py [--results benchmarks/results] [--out benchmarks/results/plots]
                              [--op rms_norm] [--commit abc1234]

Each figure has one column per mode (fwd, bwd, fwd+bwd) and two rows of bars, one bar per provider:
  top     ms p50, with error bars from p20 to p80;
  bottom  % of the copy bandwidth measured in the same run (memory-bound ops: pct_of_copy_bw), or
          where the op reports no bandwidth (attention) % of the bf16 matmul TFLOP/s measured in the same
          run (pct_of_matmul_flops), each bar labelled with its TFLOP/s.
When a key (GPU, op, shape, dtype, mode, provider, backend) appears several times, the last row in the
file wins (rows are appended, so that is the latest run); --commit keeps only rows whose commit starts
with the given prefix. The copy and matmul reference rows are quoted in the figure title.
Files: <out>/<gpu-slug>/<op>__<shape>__<dtype>.png. matplotlib is imported only when plotting.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MODE_ORDER = ("fwd", "bwd", "fwd+bwd")
PROVIDER_ORDER = ("mmkernels", "eager", "compile", "sdpa", "liger")
REFERENCE_OPS = ("copy", "matmul")


def slug(name: Optional[str]) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", (name or "").lower()).strip("-")
    return s or "unknown"


def shape_key(shape: Dict[str, Any]) -> str:
    """{'rows': 16384, 'hidden': 4096, 'residual': False} -> 'rows16384_hidden4096_residualFalse'."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", "_".join(f"{k}{v}" for k, v in shape.items())) or "noshape"


def provider_label(row: Dict[str, Any]) -> str:
    """'mmkernels[triton]', 'sdpa[flash]', 'eager'."""
    if row.get("backend"):
        return f"{row.get('provider')}[{row['backend']}]"
    return str(row.get("provider"))


def load_rows(results_dir: Path) -> List[Dict[str, Any]]:
    rows = []
    for path in sorted(Path(results_dir).glob("*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    print(f"warning: {path}:{n}: not JSON ({exc}); skipped", file=sys.stderr)
    return rows


def _provider_rank(label: str) -> Tuple[int, str]:
    base = label.split("[")[0]
    return (PROVIDER_ORDER.index(base) if base in PROVIDER_ORDER else len(PROVIDER_ORDER), label)


def group_rows(rows: Sequence[Dict[str, Any]], op: Optional[str] = None, commit: Optional[str] = None):
    """(figures, refs): figures maps (gpu, op, shape_key, dtype) -> {mode: {provider label: row}} with the
    last row winning; refs maps gpu -> {"copy": row, "matmul": row} (the latest of each)."""
    figures: Dict[Tuple[str, str, str, str], Dict[str, Dict[str, Dict[str, Any]]]] = {}
    refs: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for row in rows:
        if commit and not str(row.get("commit", "")).startswith(commit):
            continue
        gpu = row.get("gpu") or "unknown"
        if row.get("op") in REFERENCE_OPS:
            refs.setdefault(gpu, {})[row["op"]] = row
            continue
        if op and row.get("op") != op:
            continue
        key = (gpu, row.get("op"), shape_key(row.get("shape") or {}), row.get("dtype"))
        figures.setdefault(key, {}).setdefault(row.get("mode"), {})[provider_label(row)] = row
    return figures, refs


def _title(key, refs) -> str:
    gpu, op, shape, dtype = key
    parts = [f"{op}  {shape}  {dtype}", gpu]
    ref = refs.get(gpu, {})
    if ref.get("copy") and ref["copy"].get("gbps"):
        parts.append(f"copy {ref['copy']['gbps']:.0f} GB/s")
    if ref.get("matmul") and ref["matmul"].get("tflops"):
        parts.append(f"bf16 matmul {ref['matmul']['tflops']:.0f} TFLOP/s")
    return "  |  ".join(parts)


def bottom_metric(rows: Sequence[Dict[str, Any]]) -> Tuple[str, str]:
    """The row field of the bottom bars, and its axis label: % of copy bandwidth when any row has it,
    else % of matmul FLOP/s, else raw TFLOP/s (rows from a run without the matmul reference)."""
    if any(r.get("pct_of_copy_bw") is not None for r in rows):
        return "pct_of_copy_bw", "% of copy bandwidth"
    if any(r.get("pct_of_matmul_flops") is not None for r in rows):
        return "pct_of_matmul_flops", "% of bf16 matmul TFLOP/s"
    return "tflops", "TFLOP/s"


def _bar_text(metric: str, row: Dict[str, Any]) -> str:
    v = row.get(metric)
    if v is None:
        return "n/a"
    if metric == "pct_of_matmul_flops" and row.get("tflops") is not None:
        return f"{v:.3g}%\n{row['tflops']:.3g} TF/s"
    return f"{v:.3g}"


def plot_figure(plt, key, by_mode: Dict[str, Dict[str, Dict[str, Any]]], refs, path: Path) -> None:
    modes = [m for m in MODE_ORDER if m in by_mode] + sorted(m for m in by_mode if m not in MODE_ORDER)
    all_rows = [r for m in modes for r in by_mode[m].values()]
    metric, metric_label = bottom_metric(all_rows)
    fig, axes = plt.subplots(2, len(modes), figsize=(4.2 * len(modes), 7), squeeze=False)
    for col, mode in enumerate(modes):
        labels = sorted(by_mode[mode], key=_provider_rank)
        rows = [by_mode[mode][lb] for lb in labels]
        xs = list(range(len(labels)))
        p50 = [r["ms_p50"] for r in rows]
        err = [[r["ms_p50"] - r["ms_p20"] for r in rows], [r["ms_p80"] - r["ms_p50"] for r in rows]]
        ax = axes[0][col]
        bars = ax.bar(xs, p50, yerr=err, capsize=4, color=[f"C{i}" for i in xs])
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in p50], fontsize=8)
        ax.margins(y=0.15)  # room for the value labels
        ax.set_title(mode)
        ax.set_ylabel("ms (p50, p20-p80)")
        ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
        ax2 = axes[1][col]
        vals = [r.get(metric) for r in rows]
        shown = [v if v is not None else 0.0 for v in vals]
        bars2 = ax2.bar(xs, shown, color=[f"C{i}" for i in xs])
        ax2.bar_label(bars2, labels=[_bar_text(metric, r) for r in rows], fontsize=8)
        ax2.margins(y=0.2)
        ax2.set_ylabel(metric_label)
        if metric.startswith("pct_"):
            ax2.axhline(100.0, color="grey", linestyle="--", linewidth=1)
        ax2.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle(_title(key, refs), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Bar charts from benchmarks/results/*.jsonl")
    p.add_argument("--results", default=str(RESULTS_DIR), help="folder of *.jsonl rows (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: <results>/plots)")
    p.add_argument("--op", default=None, help="only this op")
    p.add_argument("--commit", default=None, help="only rows whose commit starts with this")
    args = p.parse_args(argv)
    results = Path(args.results)
    out = Path(args.out) if args.out else results / "plots"

    figures, refs = group_rows(load_rows(results), op=args.op, commit=args.commit)
    if not figures:
        print(f"no benchmark rows to plot in {results}/*.jsonl (run a benchmarks/bench_*.py script on a GPU first)")
        return 1
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 2
    for key, by_mode in sorted(figures.items(), key=lambda kv: tuple(map(str, kv[0]))):
        gpu, op, shape, dtype = key
        path = out / slug(gpu) / f"{op}__{shape}__{dtype}.png"
        plot_figure(plt, key, by_mode, refs, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
