"""Boundary checks shared by every public op and module.

Each failure raises TypeError (wrong type or dtype) or ValueError (wrong shape, device or value) and names
the argument, the expected and the actual value.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence, Tuple

import torch

# float64 is accepted so the reference can serve as a float64 oracle; kernels accumulate in float32.
FLOAT_DTYPES: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(
    name: str,
    value: object,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Iterable[torch.dtype]] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that `value` is a tensor with an allowed rank and dtype; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in allowed:
            want = allowed[0] if len(allowed) == 1 else f"one of {allowed}"
            raise ValueError(f"{name}: expected {want} dimensions, got {value.dim()} (shape {tuple(value.shape)})")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype in {dtypes}, got {value.dtype}")
    return value


def has_values(t: torch.Tensor) -> bool:
    """Whether a check may read t's values: not while torch.compile traces (values are data there) and not on
    the meta device (shapes only; memory.estimate traces the model there). Such checks run in eager mode."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _same(attr: str, error: type, tensors: dict):
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for k, v in items[1:]:
        if getattr(v, attr) != getattr(first, attr):
            raise error(f"{k}: expected {attr} {getattr(first, attr)} (the {attr} of {first_name}), got {getattr(v, attr)}")
    return getattr(first, attr)


def same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """Check that all given tensors (None skipped) live on one device; return it."""
    return _same("device", ValueError, tensors)


def same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    """Check that all given tensors (None skipped) share one dtype; return it."""
    return _same("dtype", TypeError, tensors)


def shape(name: str, value: torch.Tensor, expected: Sequence[Optional[int]]) -> None:
    """Check a tensor's shape; None in `expected` matches any size."""
    actual = tuple(value.shape)
    if len(actual) != len(expected) or any(e is not None and a != e for a, e in zip(actual, expected)):
        want = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name}: expected shape {want}, got {actual}")


def number(name: str, value: object) -> float:
    """Check that `value` is a real Python number (bool excluded); return it as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


def positive_float(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def device(name: Optional[str], arg: str = "device") -> torch.device:
    """A device the user named: None or "auto" -> cuda when one is visible, else cpu; a CUDA device that is not
    there, or a name torch does not know, is an error naming `arg`."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"{arg}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{arg}: {name!r} was asked for, but no CUDA device is visible")
    return dev


def one_of(name: str, value: object, allowed: Sequence[object]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {value!r}")


def config_from_dict(cls, raw, source: str):
    """cls(**raw) for a config dataclass, after an error naming every key of `raw` that is not a field."""
    if not isinstance(raw, dict):
        raise TypeError(f"{source}: expected a dict of config fields, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    return cls(**raw)
