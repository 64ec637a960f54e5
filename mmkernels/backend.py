"""Backend selection: which implementation (reference, triton, cuda) runs an op.

Every op family registers the backends it implements, fastest first. For each call the op asks
`select(op, tensor)`, which returns the first backend that is available for the tensor's device, or the
forced one. A backend is forced by the environment variable ``MMK_BACKEND`` or, with priority, by the
context manager ``use_backend(name)``. Forcing a backend that cannot run the call is an error
(`BackendUnavailableError`), never a silent fallback.

Rules:
- ``reference``: plain PyTorch, any device, always available.
- ``triton``: CUDA tensors when triton imports and a GPU is visible; CPU tensors only when
  ``TRITON_INTERPRET=1`` is set (the interpreter is slow, so it is never picked automatically on CPU).
- ``cuda``: the compiled extension ``mmkernels._C``, CUDA tensors, and only for ops that have a csrc
  kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Dict, Iterator, Optional, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "triton", "cuda")

_ENV_VAR = "MMK_BACKEND"
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("mmk_backend", default=None)
_OPS: Dict[str, Tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was forced for an op and device it cannot serve."""


def register_op(op: str, backends: Tuple[str, ...]) -> None:
    """Declare the backends an op family implements, in order of preference (fastest first)."""
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"register_op({op!r}): unknown backends {unknown}; expected a subset of {BACKENDS}")
    if "reference" not in backends:
        raise ValueError(f"register_op({op!r}): every op needs a 'reference' backend, got {backends}")
    _OPS[op] = tuple(backends)


def registered_ops() -> Dict[str, Tuple[str, ...]]:
    return dict(_OPS)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force a backend for every op called inside the block (``None`` restores automatic choice)."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by `use_backend` (first) or by ``MMK_BACKEND``, or None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(_ENV_VAR, "").strip()
    if env and env != "auto":
        return _check_name(env, f"environment variable {_ENV_VAR}")
    return None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_import_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"triton does not import ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


@functools.lru_cache(maxsize=None)
def cuda_extension_status() -> Tuple[bool, str]:
    try:
        from mmkernels import _C  # noqa: F401
    except Exception as exc:
        return False, f"mmkernels._C is not built ({type(exc).__name__}: {exc})"
    return True, "mmkernels._C is built"


def cuda_ops():
    """The csrc kernels as torch ops (torch.ops.mmkernels_C), for the `cuda` backend of an op."""
    from mmkernels import _C  # noqa: F401  (loading it registers torch.ops.mmkernels_C)

    return torch.ops.mmkernels_C


def availability(backend: str, op: str, device: torch.device) -> Tuple[bool, str]:
    """Whether `backend` can run `op` on `device`, and why (or why not)."""
    _check_name(backend, "availability")
    if op not in _OPS:
        raise ValueError(f"availability: unknown op {op!r}; registered ops are {sorted(_OPS)}")
    if backend not in _OPS[op]:
        return False, f"op {op!r} has no {backend} implementation (it has {_OPS[op]})"
    if backend == "reference":
        return True, "plain PyTorch"
    if backend == "triton":
        ok, why = triton_import_status()
        if not ok:
            return False, why
        if device.type == "cuda":
            return True, why
        if device.type == "cpu" and triton_interpret():
            return True, f"{why}, interpreter (TRITON_INTERPRET=1)"
        return False, f"triton runs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; got a {device.type} tensor"
    # cuda
    if device.type != "cuda":
        return False, f"the cuda backend runs CUDA tensors; got a {device.type} tensor"
    return cuda_extension_status()


def select(op: str, device: torch.device) -> str:
    """The backend that runs `op` for tensors on `device`: the forced one, or the fastest available.

    Under torch.compile the choice is made once, when the function is traced, and baked into the graph
    as a constant: `use_backend` around a call of an already compiled function does not re-dispatch.
    """
    return _select(op, device.type)


@torch.compiler.assume_constant_result
def _select(op: str, device_type: str) -> str:
    device = torch.device(device_type)
    forced = forced_backend()
    if forced is not None:
        ok, why = availability(forced, op, device)
        if not ok:
            raise BackendUnavailableError(
                f"backend {forced!r} was forced for op {op!r} on device {device}, but it is unavailable: {why}"
            )
        return forced
    if op not in _OPS:
        raise ValueError(f"select: unknown op {op!r}; registered ops are {sorted(_OPS)}")
    for name in _OPS[op]:
        if device.type == "cpu" and name == "triton":
            continue  # the interpreter is for tests; reference is the fast CPU path
        if availability(name, op, device)[0]:
            return name
    return "reference"


def report(device: Optional[torch.device] = None) -> Dict[str, Dict[str, str]]:
    """For each registered op: the backend `select` picks on `device`, and each backend's status."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: Dict[str, Dict[str, str]] = {}
    for op in sorted(_OPS):
        row: Dict[str, str] = {}
        try:
            row["selected"] = select(op, device)
        except BackendUnavailableError as exc:
            row["selected"] = f"error: {exc}"
        for name in BACKENDS:
            ok, why = availability(name, op, device)
            row[name] = ("yes: " if ok else "no: ") + why
        out[op] = row
    return out
