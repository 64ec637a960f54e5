"""Image files -> normalised pixel tensors for the CLIP vision tower.

    pixels = (crop(resize(x / 255)) - mean) / std          (3, image_size, image_size) float32

Formats read natively:
- `.npy` / `.pt`: a uint8 array in HWC layout (H, W, 3), or (H, W) grayscale, values 0..255; or a floating
  array in CHW layout (3, H, W), values in [0, 1] (not yet normalised). `.pt` holds one tensor
  (read with weights_only=True).
- `.png`, `.jpg`, `.jpeg`, `.bmp`, `.gif`, `.webp`: through Pillow when it is installed (converted to RGB).

Preprocessing follows CLIP's: bicubic resize (antialiased) so the shortest side is image_size, then a
centre crop of image_size x image_size, then (x - mean) / std per channel. The resize runs in float on
[0, 1] values (CLIP's processor resizes 8-bit images), so pixels can differ from it by about one grey level.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

CLIP_MEAN: Tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: Tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

PIL_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def _as_chw_unit(array, path: str) -> torch.Tensor:
    """A uint8 HWC / HW or float CHW array -> (3, H, W) float32 in [0, 1]."""
    x = torch.as_tensor(array)
    if x.dtype == torch.uint8:
        if x.dim() == 2:
            x = x.unsqueeze(-1).expand(-1, -1, 3)
        if x.dim() != 3 or x.shape[-1] != 3:
            raise ValueError(f"{path}: a uint8 image must have shape (H, W, 3) or (H, W), got {tuple(x.shape)}")
        x = x.permute(2, 0, 1).float() / 255.0
    elif x.is_floating_point():
        if x.dim() != 3 or x.shape[0] != 3:
            raise ValueError(f"{path}: a floating image must have shape (3, H, W) with values in [0, 1], "
                             f"got {tuple(x.shape)}")
        x = x.float()
        if x.numel() and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError(f"{path}: a floating image must have finite values in [0, 1], "
                             f"got range [{x.min().item():.4g}, {x.max().item():.4g}]")
    else:
        raise ValueError(f"{path}: expected a uint8 (H, W, 3) or floating (3, H, W) image, got dtype {x.dtype}")
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"{path}: empty image of shape {tuple(x.shape)}")
    return x.contiguous()


def _read_pil(path: str) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError(f"{path}: reading {os.path.splitext(path)[1]} images needs Pillow: "
                          "pip install pillow (or convert the image to .npy)") from e
    import numpy as np

    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(rgb)


def read_image(path: str) -> torch.Tensor:
    """The image at `path` as (3, H, W) float32 in [0, 1], before resizing and normalisation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file not found")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        import numpy as np

        array = np.load(path, allow_pickle=False)
    elif ext == ".pt":
        array = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(array, torch.Tensor):
            raise ValueError(f"{path}: expected a saved tensor, got {type(array).__name__}")
    elif ext in PIL_EXTENSIONS:
        array = _read_pil(path)
    else:
        raise ValueError(f"{path}: unsupported image extension {ext!r}; expected .npy, .pt or one of "
                         f"{', '.join(PIL_EXTENSIONS)}")
    return _as_chw_unit(array, path)


def preprocess(x: torch.Tensor, image_size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (3, image_size, image_size): shortest-side bicubic resize, centre crop, normalise."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean, std: expected 3 values each (std > 0), got mean={tuple(mean)}, std={tuple(std)}")
    _, h, w = x.shape
    # Sizes as in CLIP's processor: the long side is scaled by the same factor and truncated.
    if h <= w:
        new_h, new_w = image_size, max(image_size, int(image_size * w / h))
    else:
        new_h, new_w = max(image_size, int(image_size * h / w)), image_size
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x.unsqueeze(0), size=(new_h, new_w), mode="bicubic", align_corners=False,
                          antialias=True).squeeze(0).clamp_(0.0, 1.0)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    x = x[:, top:top + image_size, left:left + image_size]
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - m) / s).contiguous()


def load_image(path: str, image_size: int, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """The file at `path` -> (3, image_size, image_size) float32, resized, centre-cropped and normalised."""
    return preprocess(read_image(path), image_size, mean, std)


def save_image_npy(path: str, hwc_uint8) -> None:
    """Write an (H, W, 3) uint8 image (numpy array or tensor) as .npy, the format load_image reads natively."""
    import numpy as np

    array = hwc_uint8.detach().cpu().numpy() if isinstance(hwc_uint8, torch.Tensor) else np.asarray(hwc_uint8)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"hwc_uint8: expected a uint8 array of shape (H, W, 3), got {array.dtype} "
                         f"{tuple(array.shape)}")
    if not str(path).endswith(".npy"):
        raise ValueError(f"path: expected a name ending in .npy, got {path!r}")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # np.save(str) would append .npy to the temp name
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)
