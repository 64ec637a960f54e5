"""LoRA (METHODS.md section 8): y = x W^T + (alpha / r) (x A^T) B^T on the target linear layers.

    apply(model, LoRAConfig(rank=8, alpha=16))   # freeze the model, wrap the targets in nn.LoRALinear
    save_adapter(model, "out/"); load_adapter(base_model, "out/")
    merge(model)                                  # fold B A into W: plain nn.Linear layers again
    from_peft(model, peft_model_or_dir)           # PEFT LoRA weights on the same base checkpoint
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Tuple

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.methods import _adapter_io
from mmkernels.models.llama import Llama
from mmkernels.nn import LoRALinear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass
class LoRAConfig:
    """rank r, alpha (scaling alpha / r), dropout on the low-rank input, targets (names of the block's
    linear layers), seed (A's initialisation; B starts at zero so the model starts unchanged)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {self.rank!r}")
        _checks.positive_float("alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets: expected a non-empty subset of {TARGETS}, got {list(self.targets)}")

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "LoRAConfig":
        return _checks.config_from_dict(cls, raw, "adapter config")


def _targets(model: Llama, names) -> Dict[str, Tuple[nn.Module, str]]:
    out = {}
    for i, block in enumerate(model.layers):
        for owner_name, owner in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            for name in names:
                if hasattr(owner, name):
                    out[f"layers.{i}.{owner_name}.{name}"] = (owner, name)
    return out


def apply(model: Llama, cfg: LoRAConfig) -> Llama:
    """Freeze `model` and replace each target linear with a LoRALinear (in place)."""
    if not isinstance(model, Llama):
        raise TypeError(f"model: expected an mmkernels Llama, got {type(model).__name__}")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("model: LoRA is already applied to this model")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed)
    for owner, name in _targets(model, cfg.targets).values():
        setattr(owner, name, LoRALinear(getattr(owner, name), cfg.rank, cfg.alpha, cfg.dropout, generator=gen))
    model.lora_config = cfg
    return model


def adapter_parameters(model: Llama) -> Dict[str, nn.Parameter]:
    if getattr(model, "lora_config", None) is None:
        raise ValueError("model: LoRA is not applied (call methods.lora.apply first)")
    return {n: p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def merge(model: Llama) -> Llama:
    """Replace every LoRALinear by its merged nn.Linear (W + s B A) and freeze everything."""
    adapter_parameters(model)
    return _adapter_io.merge_modules(model, "lora", (LoRALinear,))


def save_adapter(model: Llama, path: str) -> None:
    _adapter_io.save(model, path, "lora", model.lora_config.to_dict(), adapter_parameters(model))


def load_adapter(model: Llama, path: str) -> Llama:
    """Apply the saved config to a base model (or check it matches the one applied) and load A and B."""
    return _adapter_io.load(model, path, "lora", LoRAConfig, "lora_config", apply, adapter_parameters)


_PEFT_KEY = re.compile(r"(?:^|\.)(layers\.\d+\.(?:self_attn|mlp)\.\w+)\.(lora_A|lora_B)(?:\.\w+)?\.weight$")


def from_peft(model: Llama, source, adapter_name: str = "default") -> Llama:
    """Install HF PEFT LoRA weights (a PeftModel, or a directory written by its save_pretrained) into an
    mmkernels Llama loaded from the same base checkpoint. Supported: target modules among TARGETS,
    bias="none", no rsLoRA/DoRA, one rank and alpha for all layers."""
    peft_cfg, state = _adapter_io.read_peft(source, adapter_name)
    kind = str(peft_cfg.get("peft_type", ""))
    if not kind.endswith("LORA"):
        raise ValueError(f"source: expected a PEFT LoRA adapter, got peft_type {kind!r}")
    for flag, ok in (("use_rslora", False), ("use_dora", False), ("bias", "none")):
        if peft_cfg.get(flag, ok) != ok:
            raise ValueError(f"source: PEFT option {flag}={peft_cfg[flag]!r} is not supported (expected {ok!r})")
    if peft_cfg.get("rank_pattern") or peft_cfg.get("alpha_pattern"):
        raise ValueError("source: per-layer rank_pattern / alpha_pattern are not supported")
    tensors, targets = {}, set()
    for key, value in state.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            raise ValueError(f"source: unexpected PEFT tensor {key!r}")
        module, part = match.groups()
        targets.add(module.rsplit(".", 1)[1])
        tensors[f"{module}.{part}"] = value
    unknown = sorted(targets - set(TARGETS))
    if unknown:
        raise ValueError(f"source: LoRA on {unknown} is not supported; expected targets among {TARGETS}")
    cfg = LoRAConfig(rank=int(peft_cfg["r"]), alpha=float(peft_cfg["lora_alpha"]),
                     dropout=float(peft_cfg.get("lora_dropout", 0.0)), targets=tuple(t for t in TARGETS if t in targets))
    apply(model, cfg)
    _adapter_io.load_tensors(adapter_parameters(model), tensors)
    return model
