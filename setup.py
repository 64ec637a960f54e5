"""Install mmkernels; build the CUDA extension mmkernels._C from csrc/ when it can be built.

MMK_BUILD_CUDA=auto (default): build when torch is a CUDA build and nvcc is found, else install pure Python.
MMK_BUILD_CUDA=1: build, or fail with the reason.   MMK_BUILD_CUDA=0: never build.
MAX_JOBS is honoured by torch's ninja build. The build needs torch importable at build time, so install
with `pip install --no-build-isolation -e .` (pip's isolated build environment has no torch, and this
script then installs pure Python and says so).
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _say(msg: str) -> None:
    print(f"mmkernels setup: {msg}", file=sys.stderr)


def _cuda_extension_plan():
    """Return (ext_modules, cmdclass) for the CUDA build, or ([], {}) with one line saying why not."""
    mode = os.environ.get("MMK_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"MMK_BUILD_CUDA: expected one of auto, 0, 1; got {mode!r}")
    if mode == "0":
        _say("CUDA extension skipped (MMK_BUILD_CUDA=0); installing pure Python")
        return [], {}

    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env, or broken
        torch = None
        reason = f"torch is not importable at build time ({type(exc).__name__}); use --no-build-isolation"
    if torch is not None and reason is None:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None and shutil.which("nvcc") is None:
            reason = "nvcc / CUDA_HOME not found"
    if reason is not None:
        if mode == "1":
            raise SystemExit(f"MMK_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
        _say(f"CUDA extension skipped: {reason}; installing pure Python")
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    arch_flags = os.environ.get("MMK_CUDA_ARCH", "").split()
    if not arch_flags:
        # Hopper first (the project's target), plus Ampere for wider use.
        arch_flags = ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80"]
    ext = CUDAExtension(
        name="mmkernels._C",
        sources=sources,
        extra_compile_args={
            # The C++ standard is left to torch's BuildExtension, which matches the torch headers.
            "cxx": ["-O3"],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *arch_flags],
        },
    )
    _say(f"building the CUDA extension mmkernels._C from {len(sources)} sources")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _cuda_extension_plan()

setup(
    name="mmkernels",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for parameter-efficient adaptation of LLaMA-family models",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "numpy", "safetensors"],
    extras_require={
        # triton is bundled with CUDA torch wheels; on CPU it runs kernels in its interpreter.
        "triton": ["triton>=3.1"],
        "test": ["pytest", "pytest-xdist", "triton>=3.1", "transformers>=4.46", "peft", "tokenizers", "pillow", "pyyaml"],
        # PNG/JPEG images for multimodal training data (.npy/.pt images need nothing), YAML configs.
        "train": ["transformers>=4.46", "pillow", "pyyaml"],
        "bench": ["triton>=3.1", "matplotlib", "transformers>=4.46", "peft"],
    },
    entry_points={"console_scripts": ["mmkernels=mmkernels.cli:console"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
