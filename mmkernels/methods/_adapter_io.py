"""Adapter-only checkpoints shared by the methods: `adapter_model.safetensors` (the method's parameters by
model-relative name) and `adapter_config.json` ({"method": name, **config}), each written atomically; and
the merge that folds an adapter into plain layers (after which it can no longer be saved as an adapter)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

from mmkernels.models.loading import atomic_write

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@torch.no_grad()
def merge_modules(model: nn.Module, method: str, kinds: Tuple[type, ...]) -> nn.Module:
    """A method's merge(): replace every submodule of one of `kinds` by its merge() (a plain nn.Linear),
    freeze the model, and mark `method` merged: `save` refuses it from then on."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, kinds):
                setattr(module, name, child.merge())
    model.requires_grad_(False)
    model.merged_adapters = getattr(model, "merged_adapters", set()) | {method}
    return model


def save(model: nn.Module, path: str, method: str, config: Dict[str, Any], params: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    if method in getattr(model, "merged_adapters", ()):
        raise ValueError("model: the adapter was merged into the weights; save the model instead")

    os.makedirs(path, exist_ok=True)
    tensors = {name: p.detach().contiguous().cpu() for name, p in params.items()}
    atomic_write(os.path.join(path, WEIGHTS_FILE), lambda tmp: save_file(tensors, tmp))

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"method": method, **config}, fh, indent=2)

    atomic_write(os.path.join(path, CONFIG_FILE), write_json)


def read(path: str, method: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(the config dict without "method", the tensors) of an adapter saved by `save` for `method`."""
    from safetensors.torch import load_file

    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"path: no {name} in {path}")
    with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as fh:
        raw = json.load(fh)
    found = raw.pop("method", None)
    if found != method:
        raise ValueError(f"path: {path} holds a {found!r} adapter, expected {method!r}")
    return raw, load_file(os.path.join(path, WEIGHTS_FILE))


def load(model: nn.Module, path: str, method: str, config_cls, config_attr: str,
         apply: Callable[[nn.Module, Any], Any], parameters: Callable[[nn.Module], Dict[str, nn.Parameter]],
         check: Optional[Callable[[nn.Module, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]] = None):
    """A method's load_adapter: apply the saved config to a base model (or check that the config already
    applied, model.<config_attr>, equals it), then load the weights strictly. The config is built by
    config_cls.from_saved_dict where the class has one (a saved file may predate an option), else by
    config_cls.from_dict. `check(model, tensors)` may validate and remove saved tensors that are not
    parameters (returning the rest)."""
    raw, tensors = read(path, method)
    cfg = getattr(config_cls, "from_saved_dict", config_cls.from_dict)(raw)
    current = getattr(model, config_attr, None)
    if current is None:
        apply(model, cfg)
    elif current != cfg:
        raise ValueError(f"model: the applied {method} config {current} differs from the saved {cfg}")
    if check is not None:
        tensors = check(model, tensors)
    load_tensors(parameters(model), tensors)
    return model


@torch.no_grad()
def load_tensors(params: Dict[str, nn.Parameter], tensors: Dict[str, torch.Tensor]) -> None:
    """Copy tensors into params by name; every name must match both ways, with equal shapes."""
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter weights: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise ValueError(f"adapter weights: {name} has shape {tuple(tensors[name].shape)}, "
                             f"expected {tuple(p.shape)}")
        p.copy_(tensors[name])


def read_peft(source, adapter_name: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(PEFT config dict, PEFT adapter state dict) of a PeftModel's adapter `adapter_name`, or of a
    directory written by PeftModel.save_pretrained (adapter_config.json + adapter_model.safetensors)."""
    if isinstance(source, (str, os.PathLike)):
        from safetensors.torch import load_file

        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not os.path.exists(os.path.join(source, name)):
                raise FileNotFoundError(f"source: no {name} in {source}")
        with open(os.path.join(source, CONFIG_FILE), encoding="utf-8") as fh:
            return json.load(fh), load_file(os.path.join(source, WEIGHTS_FILE))
    from peft import get_peft_model_state_dict

    if adapter_name not in getattr(source, "peft_config", {}):
        raise ValueError(f"adapter_name: {adapter_name!r} is not an adapter of the given PEFT model")
    return source.peft_config[adapter_name].to_dict(), get_peft_model_state_dict(source, adapter_name=adapter_name)
