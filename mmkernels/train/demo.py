"""The built-in demonstration task of `mmkernels train`: a synthetic multimodal multiple-choice set the
project generates itself (nothing is downloaded).

Image questions show one coloured shape (circle, square or triangle; red, green, blue or yellow; small,
medium or large) with a random place, tint and exact size on a noisy background, and ask for its colour or
its size.
Text-only questions ask for the colour of a named thing ("What colour is a banana?"; each thing has one
colour), which the model must read from the question. All records are in the
ScienceQA format of train/data.py, with the images written as .npy files beside the jsonl files, so the
demo goes through the same loaders as user data.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 235), "yellow": (235, 215, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (0.07, 0.1), "medium": (0.13, 0.16), "large": (0.2, 0.24)}  # radius / image side
THINGS = {"tomato": "red", "cherry": "red", "ruby": "red", "frog": "green", "leaf": "green", "lime": "green",
          "sky": "blue", "ocean": "blue", "sapphire": "blue", "banana": "yellow", "lemon": "yellow", "sun": "yellow"}
KINDS = ("colour", "size", "text")
_VERSION = 4


def draw(shape: str, colour: str, scale: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a noisy grey background and one filled shape of size class `scale`."""
    img = rng.integers(20, 90, size=(size, size, 3)).astype(np.float32)
    r = rng.uniform(*SIZES[scale]) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(x - cx) <= 0.85 * r) & (np.abs(y - cy) <= 0.85 * r)
    else:  # an upward triangle: apex at the top, base at the bottom
        top, bottom = cy - r, cy + r
        half_width = (y - top) / (bottom - top) * r
        mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    tint = np.array(COLOURS[colour], dtype=np.float32) + rng.normal(0, 12, size=3)
    img[mask] = tint
    return np.clip(img, 0, 255).astype(np.uint8)


def _record(kind: str, rng: np.random.Generator, image_name: str, image_dir: str, size: int) -> Dict:
    colours = list(COLOURS)
    if kind == "text":
        thing = list(THINGS)[rng.integers(len(THINGS))]
        return {"question": f"What colour is a {thing}?", "choices": colours, "answer": colours.index(THINGS[thing])}
    from mmkernels.train.images import save_image_npy

    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = colours[rng.integers(len(colours))]
    sizes = list(SIZES)
    scale = sizes[rng.integers(len(sizes))]
    save_image_npy(os.path.join(image_dir, image_name), draw(shape, colour, scale, size, rng))
    if kind == "colour":
        return {"question": f"What colour is the {shape}?", "choices": colours, "answer": colours.index(colour),
                "image": f"images/{image_name}"}
    return {"question": f"How big is the {shape}?", "choices": sizes, "answer": sizes.index(scale),
            "image": f"images/{image_name}"}


def write_dataset(out_dir: str, n_train: int, n_eval: int, seed: int, image_size: int) -> Dict[str, str]:
    """Write train.jsonl, eval.jsonl and images/ under out_dir (reused when already written with the same
    settings); returns {"train": path, "eval": path}."""
    settings = {"version": _VERSION, "n_train": n_train, "n_eval": n_eval, "seed": seed, "image_size": image_size}
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "eval": os.path.join(out_dir, "eval.jsonl")}
    manifest = os.path.join(out_dir, "settings.json")
    if os.path.exists(manifest) and all(os.path.exists(p) for p in paths.values()):
        with open(manifest, encoding="utf-8") as fh:
            if json.load(fh) == settings:
                return paths
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in (("train", n_train), ("eval", n_eval)):
        rows: List[Dict] = []
        for i in range(count):
            kind = KINDS[i % len(KINDS)]
            rows.append(_record(kind, rng, f"{split}_{i:05d}.npy", image_dir, image_size))
        _write_whole(paths[split], "".join(json.dumps(r) + "\n" for r in rows))
    _write_whole(manifest, json.dumps(settings))
    return paths


def _write_whole(path: str, text: str) -> None:
    """Every process of a torchrun run writes the same data set: each file appears whole (a temporary file
    renamed over it), so a process reading it while another writes never sees a partial one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
