"""Serving and export of trained adapters: `mmkernels generate --adapter DIR` and `mmkernels export`.

An adapter directory written by the trainer holds adapter_config.json + adapter_model.safetensors (the
method's own format) and run.json: how the run built its base model and vision tower (model directory or
the built-in tiny model with its seed, vision tower, tokenizer), so both are rebuilt exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch

from mmkernels import _checks
from mmkernels.models import Llama
from mmkernels.train import method_specs

RUN_FILE = "run.json"


def write_run_info(path: str, cfg) -> None:
    from mmkernels.models.loading import atomic_write

    info = {"model": cfg.model, "tokenizer": cfg.tokenizer, "vision": cfg.vision, "seed": cfg.seed,
            "method": cfg.method}
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, RUN_FILE),
                 lambda tmp: open(tmp, "w", encoding="utf-8").write(json.dumps(info, indent=2)))


def read_adapter_info(path: str) -> Tuple[str, Dict[str, Any]]:
    """(method name, run info) of an adapter directory."""
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"adapter: no adapter_config.json in {path!r}")
    with open(config_path, encoding="utf-8") as fh:
        method = json.load(fh).get("method")
    info: Dict[str, Any] = {}
    if os.path.exists(os.path.join(path, RUN_FILE)):
        with open(os.path.join(path, RUN_FILE), encoding="utf-8") as fh:
            info = json.load(fh)
    return method, info


def load(adapter: str, model_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None,
         device: Optional[torch.device] = None):
    """(model with the adapter loaded, tokenizer, vision tower or None, spec) for inference."""
    from mmkernels.train.trainer import build_model, build_vision

    method, info = read_adapter_info(adapter)
    spec = method_specs.get(method)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    seed = info.get("seed", 0)
    model, tokenizer = build_model(model_dir or info.get("model"), info.get("tokenizer"), seed, device, dtype)
    vision = build_vision(info.get("vision"), seed, device, dtype)
    spec.load(model, adapter, vision)
    model.to(device)
    return model.eval(), tokenizer, vision, spec


def run_generate(args: argparse.Namespace) -> int:
    """`mmkernels generate --adapter DIR [--image PATH ...]`."""
    from mmkernels.models import demo
    from mmkernels.train.images import load_image

    demo.check_sampling_args(args)
    device = _checks.device(args.device, "--device") if args.device else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tokenizer, vision, spec = load(args.adapter, args.model, dtype, device)
    prompts = demo._read_prompts(args)
    pixels = None
    if args.image:
        if len(args.image) != len(prompts):
            raise SystemExit(f"--image: expected one image per prompt ({len(prompts)}), got {len(args.image)}")
        if vision is None:
            raise SystemExit(f"--image: the adapter in {args.adapter} was trained without a vision tower")
        size = vision.clip.config.image_size
        pixels = torch.stack([load_image(p, size) for p in args.image]).to(model.embed_tokens.weight.device)
    try:
        with torch.no_grad():
            kwargs = spec.serve_inputs(model, vision, pixels, len(prompts))
    except ValueError as exc:
        if pixels is None:
            raise
        raise SystemExit(f"--image: {exc}") from None
    return demo.generate_and_print(model, tokenizer, prompts, args, f"{args.adapter} ({spec.name})", **kwargs)


def export_merged(adapter: str, out: str, model_dir: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> List[str]:
    """Fold the adapter into the base weights and write a plain HF LLaMA checkpoint (config.json +
    model.safetensors) that transformers loads. Raises when the method keeps parameters that are not LLaMA
    weights after merging (e.g. LLaMA-Adapter's prompts): such a model is served with --adapter instead."""
    model, _, _, spec = load(adapter, model_dir, dtype or torch.float32, torch.device("cpu"))
    if spec.merge is None:
        raise ValueError(f"export: method {spec.name!r} cannot be merged into the base weights")
    spec.merge(model)
    with torch.device("meta"):
        plain = {n for n, _ in Llama(model.config).named_parameters()}
    names = {n for n, _ in model.named_parameters()}
    extra = sorted(names - plain)
    # Merged linears may gain a bias (V2 bias tuning): LLaMA's HF config has no per-layer bias switch.
    if extra:
        raise ValueError(f"export: after merging, the {spec.name} model keeps parameters that a plain LLaMA checkpoint "
                         f"cannot hold ({extra[:4]}{' ...' if len(extra) > 4 else ''}); serve it with "
                         "`mmkernels generate --adapter` instead")
    model.save_pretrained(out)
    print(f"wrote a merged LLaMA checkpoint to {out} (method {spec.name}, adapter {adapter})", file=sys.stderr)
    return sorted(names)
