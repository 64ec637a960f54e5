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
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _weight_files(path: str) -> Dict[str, str]:
    """Map each tensor name in the checkpoint to the file holding it."""
    index = os.path.join(path, _INDEX)
    if os.path.exists(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        files = {name: os.path.join(path, fname) for name, fname in weight_map.items()}
        absent = sorted({f for f in files.values() if not os.path.exists(f)})
        if absent:
            raise FileNotFoundError(f"path: shard {absent[0]} listed in {index} does not exist")
        return files
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
    # Ignored: rotary tables some exporters save, and a redundant copy of a tied lm_head.
    ignored = {n for n in found if n.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    unexpected = sorted(n for n in found if n not in expected and n not in ignored)
    if unexpected:
        raise KeyError(f"checkpoint {path}: unexpected tensor {found[unexpected[0]]!r} in "
                       f"{files[found[unexpected[0]]]} ({len(unexpected)} unexpected in all)")
    missing = sorted(n for n in expected if n not in found)
    if missing:
        hf = missing[0] if missing[0] == "lm_head.weight" else f"model.{missing[0]}"
        raise KeyError(f"checkpoint {path}: missing tensor {hf!r} of shape {tuple(expected[missing[0]].shape)} "
                       f"({len(missing)} missing in all)")

    by_file: Dict[str, list] = {}
    for name in expected:
        by_file.setdefault(files[found[name]], []).append(name)
    # Shapes and the dtype come from the headers, so a bad checkpoint fails before any tensor is read.
    for fname, names in by_file.items():
        with safe_open(fname, framework="pt", device="cpu") as fh:
            for name in names:
                meta = fh.get_slice(found[name])
                have, want = tuple(meta.get_shape()), tuple(expected[name].shape)
                if have != want:
                    raise ValueError(f"checkpoint {path}: tensor {found[name]!r} in {fname} has shape "
                                     f"{have}, expected {want}")
                if dtype is None and name == "embed_tokens.weight":
                    stored = meta.get_dtype()
                    if stored not in _DTYPES:
                        raise TypeError(f"checkpoint {path}: tensor {found[name]!r} has dtype {stored}, "
                                        f"expected one of {sorted(_DTYPES)}")
                    dtype = _DTYPES[stored]
    device = torch.device(device if device is not None else "cpu")

    # Each tensor goes to its device and dtype as it is read; assign=True puts it in the module as is.
    state: Dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        with safe_open(fname, framework="pt", device="cpu") as fh:
            for name in names:
                state[name] = fh.get_tensor(found[name]).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: a tied lm_head has no entry
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def atomic_write(path: str, write) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`."""
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

    hf_config = model.config.to_hf_dict()
    hf_config["dtype"] = str(model.embed_tokens.weight.dtype).removeprefix("torch.")

    def write_config(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(hf_config, fh, indent=2)

    atomic_write(os.path.join(path, _SINGLE), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    # An older sharded checkpoint here would take precedence over the new single file: remove it.
    stale_index = os.path.join(path, _INDEX)
    if os.path.exists(stale_index):
        with open(stale_index, encoding="utf-8") as fh:
            shards = set(json.load(fh).get("weight_map", {}).values()) - {_SINGLE}
        os.unlink(stale_index)
        for shard in shards:
            shard_path = os.path.join(path, os.path.basename(shard))
            if os.path.exists(shard_path):
                os.unlink(shard_path)
    atomic_write(os.path.join(path, "config.json"), write_config)
