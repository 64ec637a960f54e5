"""Test setup: without a GPU, Triton kernels run on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test module. It also
mends the interpreter's bfloat16 (_interpreter_bf16.py), so bf16 kernels are tested on CPU too.
Tests marked `gpu` need CUDA and are skipped without it. The csrc kernels are tested on both: on a GPU with
mmkernels._C built, and on the CPU built by tools/cuda_emu (the `csrc_device` fixture).
"""

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if importlib.util.find_spec("triton") is not None:
        # the interpreter's bfloat16 made a GPU's (rounded casts, tl.dot on float32 copies)
        import _interpreter_bf16

        _interpreter_bf16.install()


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16 kernels, csrc kernels, speed sanity)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels are tested on: the GPU when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def one_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): intra-op threads
    only add contention on a shared CPU (20x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def cuda_emu_build():
    """The module tools/cuda_emu/build.py (tools/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "cuda_emu" / "build.py"
    spec = importlib.util.spec_from_file_location("mmk_cuda_emu_build", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def emulated_csrc_ops():
    """torch.ops.mmkernels_C for CPU tensors: csrc built by tools/cuda_emu/build.py (once per process)."""
    return cuda_emu_build().load()


def use_emulated_csrc(monkeypatch):
    """Makes the `cuda` backend run CPU tensors through the emulated csrc build, for one test."""
    from mmkernels import backend

    ops = emulated_csrc_ops()
    real = backend.availability

    def availability(name, op, device):
        if name == "cuda" and device.type == "cpu" and "cuda" in backend.registered_ops().get(op, ()):
            return True, "csrc emulated on the CPU (tools/cuda_emu)"
        return real(name, op, device)

    monkeypatch.setattr(backend, "availability", availability)
    monkeypatch.setattr(backend, "cuda_ops", lambda: ops)
    return ops


@pytest.fixture(params=[pytest.param("emulated", id="emulated"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")])
def csrc_device(request, monkeypatch):
    """The device the csrc kernels (the `cuda` backend) are tested on: a GPU with mmkernels._C built, or the
    CPU, where tools/cuda_emu builds csrc with each CUDA thread a fiber (where a GPU is, only the real one)."""
    if request.param == "cuda":
        from mmkernels import backend

        if not backend.cuda_extension_status()[0]:
            pytest.skip("mmkernels._C is not built")
        return torch.device("cuda")
    if HAS_CUDA:
        pytest.skip("a GPU is here: the csrc kernels run on it (the cuda variant)")
    if shutil.which("g++") is None:
        pytest.skip("the csrc emulation needs g++")
    use_emulated_csrc(monkeypatch)
    return torch.device("cpu")
