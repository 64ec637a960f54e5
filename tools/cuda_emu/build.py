"""Build csrc/ for the CPU: its kernels and its torch bindings, unchanged but for the launch syntax.

    python tools/cuda_emu/build.py [OUT_DIR]      # prints the library's path

The `.cu` files compile as C++ against the headers in `include/` (a CUDA runtime whose threads are fibers,
see include/mmk_cuda_emu.h), with every `kernel<<<grid, block, smem, stream>>>(args);` rewritten to
`::mmk_emu::launch([&] { kernel(args); }, grid, block, smem, stream);`. `bindings.cpp` compiles with its
device checks and dispatch key moved from CUDA to CPU tensors (`is_cuda` -> `is_cpu`, `CUDA` -> `CPU`).
Loading the library (`torch.ops.load_library`) registers the `torch.ops.mmkernels_C` ops for CPU
tensors, the same ops the `cuda` backend calls. The `csrc_device` fixture (python_tests/conftest.py) runs the
csrc tests on them; python_tests/test_cuda_emu.py tests the emulator itself. A machine with a GPU runs the
real build instead; this is how csrc is tested without one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
INCLUDE = Path(__file__).resolve().parent / "include"

# The binding's device checks and dispatch key, and what they become for CPU tensors: each must occur.
BINDING_EDITS = (
    (".is_cuda()", ".is_cpu()"),
    ("->is_cuda()", "->is_cpu()"),
    ("TORCH_LIBRARY_IMPL(mmkernels_C, CUDA, m)", "TORCH_LIBRARY_IMPL(mmkernels_C, CPU, m)"),
)


def _matching(text: str, i: int, open_ch: str, close_ch: str, step: int) -> int:
    """Index of the bracket matching text[i] (an open_ch when step is 1, a close_ch when step is -1)."""
    depth = 0
    while 0 <= i < len(text):
        if text[i] == (open_ch if step == 1 else close_ch):
            depth += 1
        elif text[i] == (close_ch if step == 1 else open_ch):
            depth -= 1
            if depth == 0:
                return i
        i += step
    raise ValueError("unbalanced brackets")


def rewrite_launches(source: str, name: str = "<source>") -> str:
    """Every `kernel<<<config>>>(args);` as `::mmk_emu::launch([&] { kernel(args); }, config);`."""
    out, pos, count = [], 0, 0
    while True:
        start = source.find("<<<", pos)
        if start < 0:
            break
        # The kernel expression before <<<: an identifier with its template arguments, maybe qualified.
        k = start
        while k > 0 and source[k - 1].isspace():
            k -= 1
        if source[k - 1] == ">":
            k = _matching(source, k - 1, "<", ">", -1)
        while k > 0 and (source[k - 1].isalnum() or source[k - 1] in "_:"):
            k -= 1
        kernel = source[k:start].strip()
        end_cfg = source.find(">>>", start)
        config = source[start + 3:end_cfg]
        paren = end_cfg + 3
        while source[paren].isspace():
            paren += 1
        if source[paren] != "(" or not kernel:
            raise ValueError(f"{name}: cannot parse the launch at offset {start}")
        close = _matching(source, paren, "(", ")", 1)
        semi = close + 1
        while source[semi].isspace():
            semi += 1
        if source[semi] != ";":
            raise ValueError(f"{name}: expected ';' after the launch at offset {start}")
        args = source[paren + 1:close]
        out.append(source[pos:k])
        out.append(f"::mmk_emu::launch([&] {{ {kernel}({args}); }}, {config});")
        pos = semi + 1
        count += 1
    if count == 0:
        raise ValueError(f"{name}: no kernel launch found")
    out.append(source[pos:])
    return "".join(out)


def emulated_source(source: str, name: str = "<source>") -> str:
    """A .cu file as the C++ the emulator compiles: the device runtime included first (nvcc includes the
    CUDA runtime implicitly) and the launches rewritten."""
    return '#include "mmk_cuda_emu_device.h"\n' + rewrite_launches(source, name)


def edit_bindings(source: str) -> str:
    for old, new in BINDING_EDITS:
        if old not in source:
            raise ValueError(f"csrc/bindings.cpp: expected to find {old!r} (tools/cuda_emu/build.py edits it)")
        source = source.replace(old, new)
    return source


def _sources() -> dict:
    files = {}
    for path in sorted(CSRC.glob("*.cu")):
        files[path.stem + ".cpp"] = emulated_source(path.read_text(), path.name)
    files["bindings.cpp"] = edit_bindings((CSRC / "bindings.cpp").read_text())
    return files


def _flags(sanitize: bool) -> List[str]:
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    flags = ["-std=c++20", "-O1" if sanitize else "-O2", "-g" if sanitize else "-g0", "-fPIC", "-shared",
             "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Werror=return-type",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DTORCH_EXTENSION_NAME=_C",
             f"-I{INCLUDE}", f"-I{CSRC}", *[f"-I{p}" for p in include_paths()],
             f"-I{sysconfig.get_paths()['include']}"]
    if sanitize:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    for lib in library_paths():
        flags += [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    return flags + ["-lc10", "-ltorch", "-ltorch_cpu"]


def build(out_dir: Optional[os.PathLike] = None, sanitize: bool = False) -> Path:
    """Compiles (once per source and flag set) and returns the shared library's path."""
    out = Path(out_dir) if out_dir is not None else ROOT / "build" / "cuda_emu"
    files = _sources()
    headers = sorted(INCLUDE.rglob("*.h")) + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))
    digest = hashlib.sha256()
    for name, text in sorted(files.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    for h in headers:
        digest.update(str(h.relative_to(ROOT)).encode() + b"\0" + h.read_bytes() + b"\0")
    flags = _flags(sanitize)
    digest.update(" ".join(flags).encode())
    tag = digest.hexdigest()[:16]
    lib = out / f"mmkernels_C_emu_{'asan_' if sanitize else ''}{tag}.so"
    if lib.exists():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "build.lock", "w") as lock:  # one builder at a time (pytest-xdist workers wait)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not lib.exists():
            _compile(files, flags, out / f"src_{tag}", lib)
    return lib


def _compile(files: dict, flags: List[str], src_dir: Path, lib: Path) -> None:
    src_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in files.items():
        (src_dir / name).write_text(text)
        paths.append(str(src_dir / name))
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    cmd = ["g++", *paths, "-o", str(tmp), *flags]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building the emulated csrc failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    os.replace(tmp, lib)


def load(out_dir: Optional[os.PathLike] = None):
    """Builds, loads and returns torch.ops.mmkernels_C (for CPU tensors)."""
    import torch

    torch.ops.load_library(str(build(out_dir)))
    return torch.ops.mmkernels_C


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
