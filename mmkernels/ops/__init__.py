"""The public functional API: each op is a torch custom op with autograd, a fake impl and a backend
dispatch (see mmkernels.backend)."""

from mmkernels.ops.attention import attention
from mmkernels.ops.decode_attention import MAX_DECODE_QUERIES, decode_attention
from mmkernels.ops.dynamic_expert import dynamic_expert
from mmkernels.ops.gated_attention import gated_prompt_attention
from mmkernels.ops.linear_cross_entropy import linear_cross_entropy
from mmkernels.ops.lora import lora_linear
from mmkernels.ops.mom_adapter import mom_adapter
from mmkernels.ops.paca import paca_linear
from mmkernels.ops.paca_adamw import paca_adamw_sync
from mmkernels.ops.phm import phm_adapter, phm_linear
from mmkernels.ops.quantized_linear import QuantizedWeight, quantized_linear
from mmkernels.ops.rms_norm import rms_norm
from mmkernels.ops.rope import rope, rope_cos_sin, rope_inv_freq
from mmkernels.ops.scale_bias import scale_bias
from mmkernels.ops.swiglu import swiglu, swiglu_scale_bias

__all__ = [
    "MAX_DECODE_QUERIES", "QuantizedWeight", "attention", "decode_attention", "dynamic_expert",
    "gated_prompt_attention", "linear_cross_entropy", "lora_linear", "mom_adapter", "paca_adamw_sync", "paca_linear",
    "phm_adapter", "phm_linear", "quantized_linear", "rms_norm", "rope", "rope_cos_sin", "rope_inv_freq", "scale_bias",
    "swiglu", "swiglu_scale_bias",
]
