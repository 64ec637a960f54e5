"""mmkernels: fused Triton and CUDA kernels for parameter-efficient adaptation of LLaMA-family models."""

from mmkernels.backend import BackendUnavailableError, use_backend

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "use_backend", "__version__"]
