"""Drop-in nn.Modules built on mmkernels.ops."""

from mmkernels.nn.rms_norm import RMSNorm

__all__ = ["RMSNorm"]
