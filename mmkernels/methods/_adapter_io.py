"""Adapter-only checkpoints shared by the methods: `adapter_model.safetensors` (the method's parameters by
model-relative name) and `adapter_config.json` ({"method": name, **config}), each written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Dict, Tuple

import torch
from torch import nn

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(path: str, method: str, config: Dict[str, Any], params: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

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
