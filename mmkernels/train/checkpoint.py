"""Resumable training checkpoints, written atomically.

    out_dir/checkpoints/step_00000040/
        trainable.safetensors   the trainable parameters by model-relative name (fp32 as trained)
        optimizer.pt            the optimizer's state (keyed by parameter name, not by position)
        state.json              step, scheduler, data loader position, run config, metrics so far
        rng.pt                  the RNG states (torch CPU and CUDA, python)
    out_dir/checkpoints/latest  the name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed into place, and `latest` is
rewritten only after that, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, Optional

import torch

from mmkernels.models.loading import atomic_write

LATEST = "latest"


def checkpoint_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def rng_state() -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: str, step: int, trainable: Dict[str, torch.Tensor], optimizer_state: Dict[str, Any],
         state: Dict[str, Any], keep: int) -> str:
    """Write checkpoint `step`; keep the `keep` newest. Returns its directory."""
    from safetensors.torch import save_file

    root = checkpoint_dir(out_dir)
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    final = os.path.join(root, name)
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
              os.path.join(tmp, "trainable.safetensors"))
    torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
    torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
    with open(os.path.join(tmp, "state.json"), "w", encoding="utf-8") as fh:
        json.dump({"step": step, **state}, fh, indent=2)
    if os.path.exists(final):  # a rerun of the same step (after a resume from an older one)
        shutil.rmtree(final)
    os.replace(tmp, final)

    def write_latest(path):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(name + "\n")

    atomic_write(os.path.join(root, LATEST), write_latest)
    existing = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for old in existing[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return final


def latest(out_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run directory, or None."""
    root = checkpoint_dir(out_dir)
    pointer = os.path.join(root, LATEST)
    if not os.path.exists(pointer):
        return None
    with open(pointer, encoding="utf-8") as fh:
        path = os.path.join(root, fh.read().strip())
    if not os.path.exists(os.path.join(path, "state.json")):
        raise FileNotFoundError(f"checkpoint: {pointer} names {path}, which is incomplete or missing")
    return path


def load(path: str) -> Dict[str, Any]:
    """{"trainable": tensors, "optimizer": state, "rng": states, **state.json} of a checkpoint directory."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "state.json"), encoding="utf-8") as fh:
        out: Dict[str, Any] = json.load(fh)
    out["trainable"] = load_file(os.path.join(path, "trainable.safetensors"))
    out["optimizer"] = torch.load(os.path.join(path, "optimizer.pt"), weights_only=False)
    out["rng"] = torch.load(os.path.join(path, "rng.pt"), weights_only=False)
    return out
