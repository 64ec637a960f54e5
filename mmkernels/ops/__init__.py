"""The public functional API: each op is a torch custom op with autograd, a fake impl and a backend
dispatch (see mmkernels.backend)."""

from mmkernels.ops.rms_norm import rms_norm
from mmkernels.ops.rope import rope, rope_cos_sin, rope_inv_freq
from mmkernels.ops.swiglu import swiglu

__all__ = ["rms_norm", "rope", "rope_cos_sin", "rope_inv_freq", "swiglu"]

try:  # the attention family is landing in parallel; this guard goes once it is in
    from mmkernels.ops.attention import attention  # noqa: F401

    __all__.append("attention")
except ModuleNotFoundError:
    pass
