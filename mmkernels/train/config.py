"""The training configuration: one dataclass, read from a TOML or YAML file and/or command-line flags.

Every field is an option of `mmkernels train` (flag `--field-name`), documented by its `help` metadata;
a config file holds the same keys (and a `[method_options]` table). Flags override the file. An unknown
key, in a file or in `--method-option`, is an error that names it and lists the valid ones.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
from typing import Any, Dict, List, Optional

from mmkernels import _checks

METHODS = ("llama_adapter", "lora", "paca", "lavin", "compacter", "hyperllava")
DATA_FORMATS = ("instruction", "multimodal", "scienceqa")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def _opt(default, help: str, **extra):
    return dataclasses.field(default=default, metadata=dict(help=help, **extra))


@dataclasses.dataclass
class TrainConfig:
    # model
    model: Optional[str] = _opt(None, "HF LLaMA checkpoint directory; unset: the built-in tiny model "
                                      "(random init) with the byte tokenizer")
    tokenizer: Optional[str] = _opt(None, "tokenizer directory (default: the model directory; the byte "
                                          "tokenizer for the built-in tiny model)")
    vision: Optional[str] = _opt(None, "vision tower: a local CLIP vision directory, 'tiny' (random init), or "
                                       "unset for text-only training (the demo, with data unset, uses 'tiny')")
    dtype: str = _opt("auto", "dtype of the frozen weights: auto (bfloat16 on a GPU, float32 on CPU), float32, "
                              "bfloat16, float16; trainable parameters stay float32 and compute runs under "
                              "autocast in this dtype on a GPU", choices=DTYPES)
    device: str = _opt("auto", "auto (cuda if visible, else cpu), cpu, cuda, cuda:N")
    # method
    method: str = _opt("llama_adapter", "the adaptation method (mmkernels.methods)", choices=METHODS)
    method_options: Dict[str, Any] = _opt(None, "the method's config fields (a [method_options] table in a "
                                                "file; --method-option KEY=VALUE on the command line)")
    # data
    data: Optional[str] = _opt(None, "training jsonl; unset: the built-in synthetic multimodal demo task")
    data_format: str = _opt("instruction", "format of --data", choices=DATA_FORMATS)
    eval_data: Optional[str] = _opt(None, "held-out jsonl (scienceqa format: answer accuracy is reported)")
    image_root: Optional[str] = _opt(None, "directory that relative image paths in the data are read from "
                                           "(default: the jsonl's directory)")
    max_len: int = _opt(256, "maximum tokens per sample (instruction data is truncated on the output side)")
    pack: bool = _opt(False, "pack short text samples into rows of max_len (no attention across samples)")
    # optimisation
    batch_size: int = _opt(16, "samples per micro-batch (per process)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_steps: int = _opt(400, "optimizer steps")
    lr: float = _opt(1.5e-2, "peak learning rate")
    lr_multipliers: Dict[str, float] = _opt(None, "learning-rate multipliers by parameter-name prefix, e.g. "
                                                  "{visual_projection = 0.3} (a table in a file; --lr-multiplier "
                                                  "PREFIX=X); the longest matching prefix applies (the demo, with a "
                                                  "visual projection, uses visual_projection = 0.3)")
    min_lr_ratio: float = _opt(0.1, "the cosine schedule ends at lr * min_lr_ratio")
    warmup_steps: int = _opt(5, "linear warmup steps from 0 to lr")
    weight_decay: float = _opt(0.02, "AdamW weight decay")
    beta1: float = _opt(0.9, "AdamW beta1")
    beta2: float = _opt(0.95, "AdamW beta2")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm of the trainable parameters (0: no clipping)")
    fused_optimizer: bool = _opt(True, "the method's fused optimizer where it has one: PaCA steps with PaCAAdamW "
                                       "(AdamW and the W_eff column write in one pass; not with a quantized base, "
                                       "which has no columns to write); false: torch AdamW + a separate sync of "
                                       "the columns")
    seed: int = _opt(0, "seed of the adapter init, the data order and the demo data")
    # memory
    grad_checkpointing: bool = _opt(False, "recompute each block's activations in the backward")
    checkpoint_blocks: Optional[int] = _opt(None, "with grad_checkpointing: recompute only the first N blocks, the "
                                            "others save their activations (default: every block)")
    recompute_attention: bool = _opt(False, "recompute each attention's core in the backward (V2's q/k/v "
                                     "epilogues, rope, the attention) instead of keeping q, k, v and its output")
    fused_loss: bool = _opt(True, "chunked fused lm_head + cross-entropy (never materialises all logits)")
    loss_chunk: Optional[int] = _opt(None, "tokens per chunk of the fused loss (default: chosen by the op)")
    # output
    out_dir: str = _opt("mmkernels-run", "run directory: metrics.jsonl, checkpoints/, adapter/")
    save_every: int = _opt(0, "write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep")
    log_every: int = _opt(1, "write a metrics row every N steps")
    eval_every: int = _opt(0, "evaluate on the held-out data every N steps (0: before and after training only)")
    resume: bool = _opt(False, "continue from the newest checkpoint in out_dir/checkpoints")
    distributed: str = _opt("auto", "auto (ddp when launched by torchrun with WORLD_SIZE>1), none, ddp, fsdp",
                            choices=("auto", "none", "ddp", "fsdp"))
    progress: bool = _opt(True, "a live progress line on the terminal")
    demo_samples: int = _opt(3000, "demo only: training samples of the synthetic task")
    demo_eval_samples: int = _opt(150, "demo only: held-out samples of the synthetic task")

    def __post_init__(self) -> None:
        if self.method_options is None:
            self.method_options = {}
        if self.data is None:  # the built-in demo: a multimodal task
            if self.vision is None:
                self.vision = "tiny"
            if self.lr_multipliers is None and self.method in ("llama_adapter", "lavin"):
                # The visual projection is a small transformer: it learns at a third of the adapters' rate.
                self.lr_multipliers = {"visual_projection": 0.3}
        if self.lr_multipliers is None:
            self.lr_multipliers = {}
        if not isinstance(self.lr_multipliers, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in self.lr_multipliers.values()):
            raise ValueError(f"lr_multipliers: expected a table of parameter-name prefix -> non-negative number, got "
                             f"{self.lr_multipliers!r}")
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options: expected a table of method config fields, got "
                             f"{type(self.method_options).__name__}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}: expected one of {list(choices)}, got {getattr(self, f.name)!r}")
        positive = ("max_len", "batch_size", "grad_accum", "max_steps", "log_every", "keep_checkpoints",
                    "demo_samples", "demo_eval_samples")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        for name in ("warmup_steps", "save_every", "eval_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
        if self.checkpoint_blocks is not None:
            if not isinstance(self.checkpoint_blocks, int) or isinstance(self.checkpoint_blocks, bool) \
                    or self.checkpoint_blocks < 0:
                raise ValueError(f"checkpoint_blocks: expected None or a non-negative integer, got "
                                 f"{self.checkpoint_blocks!r}")
            if not self.grad_checkpointing:
                raise ValueError(f"checkpoint_blocks: applies with grad_checkpointing, which is off (got "
                                 f"checkpoint_blocks={self.checkpoint_blocks})")
        if self.loss_chunk is not None and (not isinstance(self.loss_chunk, int) or self.loss_chunk < 1):
            raise ValueError(f"loss_chunk: expected None or a positive integer, got {self.loss_chunk!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: expected a number in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a number in [0, 1), got {getattr(self, name)!r}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ValueError(f"weight_decay, max_grad_norm: expected non-negative numbers, got "
                             f"{self.weight_decay!r}, {self.max_grad_norm!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any], source: str = "config") -> "TrainConfig":
        return _checks.config_from_dict(cls, raw, source)


def read_file(path: str) -> Dict[str, Any]:
    """The keys of a .toml, .yaml/.yml or .json config file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config: no such file {path!r}")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as fh:
        data = fh.read()
    if ext == ".toml":
        try:
            import tomllib
        except ImportError as exc:  # Python 3.10
            raise RuntimeError(f"config {path}: reading TOML needs Python 3.11+ (tomllib); use YAML or JSON") from exc
        raw = tomllib.loads(data.decode())
    elif ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise RuntimeError(f"config {path}: reading YAML needs PyYAML (pip install pyyaml)") from exc
        raw = yaml.safe_load(data) or {}
    elif ext == ".json":
        raw = json.loads(data)
    else:
        raise ValueError(f"config: expected a .toml, .yaml, .yml or .json file, got {path!r}")
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: expected a table of keys at the top level, got {type(raw).__name__}")
    return raw


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (default None: 'not given', so a config file's value stands)."""
    p.add_argument("--config", default=None, help="a TOML/YAML/JSON file with any of the keys below")
    p.add_argument("--estimate", action="store_true",
                   help="print the expected peak memory split (weights, gradients, optimizer, activations, logits, "
                        "backward) and exit")
    p.add_argument("--fit", default=None, metavar="SIZE",
                   help="with --estimate: the fewest blocks to recompute (--grad-checkpointing --checkpoint-blocks N), "
                        "without and with --recompute-attention, for the step to fit SIZE (e.g. 24GiB, 20000MiB)")
    p.add_argument("--processes", type=int, default=None,
                   help="with --estimate: the run's number of processes, for one process's share under ddp or fsdp "
                        "(default: WORLD_SIZE as torchrun sets it, else 1)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{f.metadata['help']} (default: {default})"
        if f.name == "method_options":
            p.add_argument("--method-option", dest="method_options", action="append", metavar="KEY=VALUE",
                           default=None, help=f.metadata["help"] + "; repeatable; VALUE is a Python/JSON literal")
        elif f.name == "lr_multipliers":
            p.add_argument("--lr-multiplier", dest="lr_multipliers", action="append", metavar="PREFIX=X",
                           default=None, help=f.metadata["help"] + "; repeatable")
        elif isinstance(default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if f.type in ("Optional[int]", Optional[int]):  # loss_chunk, checkpoint_blocks
                kind = int
            p.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"),
                           help=help_text)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def parse_method_options(items: List[str], flag: str = "--method-option") -> Dict[str, Any]:
    """KEY=VALUE strings -> {key: literal value} (a bare word stays a string)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {item!r}")
        key = key.strip()
        out[key.replace("-", "_") if flag == "--method-option" else key] = _literal(value.strip())
    return out


def from_args(args: argparse.Namespace) -> TrainConfig:
    raw: Dict[str, Any] = read_file(args.config) if args.config else {}
    source = f"config {args.config}" if args.config else "config"
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in ("method_options", "lr_multipliers"):
            value = {**raw.get(name, {}), **parse_method_options(value, "--" + name[:-1].replace("_", "-"))}
        raw[name] = value
    return TrainConfig.from_dict(raw, source)
