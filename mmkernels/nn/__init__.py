"""Drop-in nn.Modules built on mmkernels.ops."""

from mmkernels.nn.hypernetwork import DynamicExpert, HyperNetwork
from mmkernels.nn.lora_linear import LoRALinear
from mmkernels.nn.mom_adapter import MoMAdapter
from mmkernels.nn.paca_adamw import PaCAAdamW
from mmkernels.nn.paca_linear import PaCALinear
from mmkernels.nn.phm_adapter import PHMAdapter
from mmkernels.nn.qpaca_linear import QPaCALinear
from mmkernels.nn.rms_norm import RMSNorm
from mmkernels.nn.scale_bias_linear import ScaleBiasLinear

__all__ = ["DynamicExpert", "HyperNetwork", "LoRALinear", "MoMAdapter", "PHMAdapter", "PaCAAdamW", "PaCALinear",
           "QPaCALinear", "RMSNorm", "ScaleBiasLinear"]
