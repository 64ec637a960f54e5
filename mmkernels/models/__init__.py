"""The thin model layer: LLaMA, its KV cache, checkpoint loading, tokenizers and generation."""

from mmkernels.models.config import LlamaConfig
from mmkernels.models.llama import Llama

__all__ = ["Llama", "LlamaConfig"]
