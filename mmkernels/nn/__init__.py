"""Drop-in nn.Modules built on mmkernels.ops."""

from mmkernels.nn.lora_linear import LoRALinear
from mmkernels.nn.paca_adamw import PaCAAdamW
from mmkernels.nn.paca_linear import PaCALinear
from mmkernels.nn.qpaca_linear import QPaCALinear
from mmkernels.nn.rms_norm import RMSNorm
from mmkernels.nn.scale_bias_linear import ScaleBiasLinear

__all__ = ["LoRALinear", "PaCAAdamW", "PaCALinear", "QPaCALinear", "RMSNorm", "ScaleBiasLinear"]
