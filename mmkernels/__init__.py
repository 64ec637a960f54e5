"""mmkernels: fused Triton and CUDA kernels for parameter-efficient adaptation of LLaMA-family models."""

from mmkernels.backend import BackendUnavailableError, use_backend
from mmkernels import ops  # registers every op family with the backend registry

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "ops", "use_backend", "__version__"]
