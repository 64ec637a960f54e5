"""Read and write HF LLaMA checkpoints: config.json + safetensors (one file or sharded with an index)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmkernels.models.config import LlamaConfig
from mmkernels.models.llama import Llama

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


def _weight_files(path: str) -> Dict[str, str]:
    """Map each tensor name in the checkpoint to the file holding it."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    single = os.path.join(path, _SINGLE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"path: no {_SINGLE} or {_INDEX} in {path}")
    with safe_open(single, framework="pt") as fh:
        return {name: single for name in fh.keys()}


def _our_name(hf_name: str) -> str:
    return hf_name[len("model."):] if hf_name.startswith("model.") else hf_name


def load_pretrained(path: str, dtype: Optional[torch.dtype] = None, device=None) -> Llama:
    """Build a Llama from a HF checkpoint directory. dtype defaults to the checkpoint's."""
    config = LlamaConfig.from_json(path)
    files = _weight_files(path)
    with torch.device("meta"):
        model = Llama(config)
    expected = {name: p for name, p in model.named_parameters()}  # tied weights appear once
    found = {_our_name(n): n for n in files}
    unexpected = sorted(n for n in found if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise KeyError(f"checkpoint {path}: unexpected tensor {found[unexpected[0]]!r} in "
                       f"{files[found[unexpected[0]]]} ({len(unexpected)} unexpected in all)")
    missing = sorted(n for n in expected if n not in found)
    if missing:
        raise KeyError(f"checkpoint {path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")

    state: Dict[str, torch.Tensor] = {}
    by_file: Dict[str, list] = {}
    for name in expected:
        by_file.setdefault(files[found[name]], []).append(name)
    for fname, names in by_file.items():
        with safe_open(fname, framework="pt", device="cpu") as fh:
            for name in names:
                tensor = fh.get_tensor(found[name])
                want = tuple(expected[name].shape)
                if tuple(tensor.shape) != want:
                    raise ValueError(f"checkpoint {path}: tensor {found[name]!r} in {fname} has shape "
                                     f"{tuple(tensor.shape)}, expected {want}")
                state[name] = tensor
    if dtype is None:
        dtype = state["embed_tokens.weight"].dtype
    model = model.to_empty(device=device or "cpu")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(dtype=dtype)


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_pretrained(model: Llama, path: str) -> None:
    """Write config.json and model.safetensors under HF names (tied lm_head omitted), atomically."""
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for name, p in model.named_parameters():  # a tied lm_head is not listed: it is embed_tokens
        hf = name if name == "lm_head.weight" else f"model.{name}"
        tensors[hf] = p.detach().to("cpu").contiguous()

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(model.config.to_hf_dict(), fh, indent=2)

    _atomic_write(os.path.join(path, "config.json"), write_config)
    _atomic_write(os.path.join(path, _SINGLE), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
