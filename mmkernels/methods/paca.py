"""PaCA and QPaCA (METHODS.md section 6): r trainable input columns per target linear layer.

    apply(model, PaCAConfig(rank=16))                    # PaCALinear on the targets, base frozen
    apply(model, PaCAConfig(rank=16, quantize="nf4"))    # QPaCALinear: NF4 (or int8) base, exact columns
    sync_after_step(optimizer, model)                    # PaCALinear: rewrite W_eff after every step
    fused_optimizer(model, groups, lr=..)                # or PaCAAdamW: the step and the rewrite in one pass
    save_adapter / load_adapter / merge

Columns are chosen from (the layer's name in the model, seed), so a saved adapter reloads onto the same
columns; the saved file holds each layer's deltas and its column indices (checked on load).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.methods import _adapter_io
from mmkernels.methods.lora import TARGETS, _targets
from mmkernels.models.llama import Llama
from mmkernels.nn import PaCALinear
from mmkernels.nn.paca_adamw import PaCAAdamW
from mmkernels.nn.qpaca_linear import QPaCALinear

PaCALayer = Union[PaCALinear, QPaCALinear]


@dataclasses.dataclass
class PaCAConfig:
    """rank r (columns per layer), scaling s of delta, targets (the block's linear layers), seed (column
    choice), quantize None | "int8" | "nf4" (QPaCA's base), block (NF4 block size)."""

    rank: int = 16
    scaling: float = 1.0
    targets: Tuple[str, ...] = TARGETS
    seed: int = 0
    quantize: Optional[str] = None
    block: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected a positive integer, got {self.rank!r}")
        self.targets = tuple(self.targets)
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"targets: expected a non-empty subset of {TARGETS}, got {list(self.targets)}")
        _checks.one_of("quantize", self.quantize, (None, "int8", "nf4"))
        if not isinstance(self.block, int) or self.block < 2 or self.block % 2:
            raise ValueError(f"block: expected an even integer >= 2, got {self.block!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "PaCAConfig":
        return _checks.config_from_dict(cls, raw, "adapter config")


def apply(model: Llama, cfg: PaCAConfig) -> Llama:
    """Freeze `model` and replace each target linear with a PaCALinear (or QPaCALinear), in place."""
    if not isinstance(model, Llama):
        raise TypeError(f"model: expected an mmkernels Llama, got {type(model).__name__}")
    if getattr(model, "paca_config", None) is not None:
        raise ValueError("model: PaCA is already applied to this model")
    targets = _targets(model, cfg.targets)
    model.requires_grad_(False)
    for name, (owner, attr) in targets.items():
        setattr(owner, attr, make_layer(getattr(owner, attr), name, cfg))
    model.paca_config = cfg
    return model


def make_layer(base: nn.Linear, name: str, cfg: PaCAConfig) -> PaCALayer:
    """The PaCALinear (or QPaCALinear) that replaces the target `base` named `name` in the model."""
    r = min(cfg.rank, base.in_features)
    if cfg.quantize is None:
        return PaCALinear(base, r, cfg.scaling, cfg.seed, name=name)
    return QPaCALinear(base, r, cfg.scaling, cfg.seed, name=name, kind=cfg.quantize, block=cfg.block)


def layers(model: Llama) -> Dict[str, PaCALayer]:
    if getattr(model, "paca_config", None) is None:
        raise ValueError("model: PaCA is not applied (call methods.paca.apply first)")
    return {n: m for n, m in model.named_modules() if isinstance(m, (PaCALinear, QPaCALinear))}


def adapter_parameters(model: Llama) -> Dict[str, nn.Parameter]:
    return {f"{n}.delta": m.delta for n, m in layers(model).items()}


@torch.no_grad()
def sync(model: Llama) -> None:
    """Rewrite W_eff's columns of every PaCALinear from its delta (QPaCALinear needs none)."""
    for layer in layers(model).values():
        if isinstance(layer, PaCALinear):
            layer.sync_()


def sync_after_step(optimizer: torch.optim.Optimizer, model: Llama):
    """Call sync(model) after every optimizer.step(); returns the hook handle (handle.remove() detaches)."""
    layers(model)
    return optimizer.register_step_post_hook(lambda *_: sync(model))


def fused_optimizer(model: Llama, groups: List[Dict[str, Any]], **adamw: Any) -> Optional[PaCAAdamW]:
    """PaCAAdamW over AdamW's param groups of deltas: torch.optim.AdamW(groups, **adamw) followed by sync(model)
    in one pass per layer (under FSDP2, on each process's row shards). None where it does not apply: a grouped
    tensor is not a PaCALinear's delta (QPaCALinear needs no sync; a parameter of another method)."""
    owners = {id(m.delta): m for m in layers(model).values() if isinstance(m, PaCALinear)}
    fused_groups = []
    for group in groups:
        params = list(group["params"])
        if any(id(p) not in owners for p in params):
            return None
        fused_groups.append({**group, "params": [owners[id(p)] for p in params]})
    return PaCAAdamW(fused_groups, **adamw)


def merge(model: Llama) -> Llama:
    """Replace every PaCA layer by a plain nn.Linear holding W_eff (dequantized for QPaCA); freeze all."""
    layers(model)
    return _adapter_io.merge_modules(model, "paca", (PaCALinear, QPaCALinear))


def save_adapter(model: Llama, path: str) -> None:
    """The deltas and each layer's column indices (`<layer>.idx`), with the config."""
    tensors = dict(adapter_parameters(model))
    tensors.update({f"{n}.idx": m.idx for n, m in layers(model).items()})
    _adapter_io.save(model, path, "paca", model.paca_config.to_dict(), tensors)


def load_adapter(model: Llama, path: str) -> Llama:
    """Apply the saved config (or check it equals the applied one), check the columns, load the deltas."""
    return _adapter_io.load(model, path, "paca", PaCAConfig, "paca_config", apply, adapter_parameters,
                            check=_check_columns)


def _check_columns(model: Llama, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The columns come from the config and the layer names; the saved ones must be the same."""
    rest = dict(tensors)
    for name, layer in layers(model).items():
        saved = rest.pop(f"{name}.idx", None)
        if saved is None:
            raise ValueError(f"adapter weights: missing ['{name}.idx']")
        if not torch.equal(saved.to(layer.idx.device, layer.idx.dtype), layer.idx):
            raise ValueError(f"adapter weights: the saved columns of {name} differ from the ones the config "
                             f"selects (a different seed or layer naming)")
    return rest
