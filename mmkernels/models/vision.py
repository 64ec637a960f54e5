"""The vision side of multimodal adaptation: a frozen CLIP vision tower and a trainable visual projection.

    features = CLIP(pixels)                                  (B, 1 + patches, vision_dim), frozen
    visual_prompts = VisualProjection(features)              (B, L_p, hidden)

VisualProjection follows LLaMA-Adapter V2's visual branch: the features go through Linear + LayerNorm to
the projection width, L_p learned query tokens are prepended, `blocks` pre-norm transformer blocks mix
queries and features, and the query positions go through Linear + LayerNorm to the LLM's hidden size. The
result is added to the adaption prompts of the fusion layers (methods/llama_adapter.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class VisionTower(nn.Module):
    """A frozen transformers CLIPVisionModel returning all token features after the final LayerNorm.

    Build it from local weights (`from_pretrained(path)`; no hub access is attempted when `path` is a
    directory) or from a CLIPVisionConfig (random init, as in the tests).
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip
        self.clip.requires_grad_(False)
        self.hidden_size = clip.config.hidden_size

    @classmethod
    def from_config(cls, config) -> "VisionTower":
        from transformers import CLIPVisionModel

        return cls(CLIPVisionModel(config))

    @classmethod
    def from_pretrained(cls, path: str, dtype: Optional[torch.dtype] = None) -> "VisionTower":
        import os

        from transformers import CLIPVisionModel

        if not os.path.isdir(path):
            raise FileNotFoundError(f"path: expected a local directory with CLIP vision weights, got {path!r}")
        return cls(CLIPVisionModel.from_pretrained(path, dtype=dtype, local_files_only=True))

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> (B, 1 + patches, vision_dim)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        out = self.clip(pixel_values=pixel_values.to(next(self.clip.parameters()).dtype))
        inner = getattr(self.clip, "vision_model", self.clip)  # transformers 4.x nests it; 5.x does not
        return inner.post_layernorm(out.last_hidden_state)


class VisualProjection(nn.Module):
    """CLIP features (B, N, vision_dim) -> visual prompt tokens (B, prompt_len, hidden_size)."""

    def __init__(self, vision_dim: int, hidden_size: int, prompt_len: int, width: Optional[int] = None,
                 blocks: int = 2, heads: int = 8) -> None:
        super().__init__()
        width = width or vision_dim
        if width % heads:
            raise ValueError(f"visual_heads: expected a divisor of the projection width {width}, got {heads}")
        self.prompt_len = prompt_len
        self.vision_dim = vision_dim
        self.feature_proj = nn.Linear(vision_dim, width)
        self.feature_norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(prompt_len, width) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(blocks)
        )
        self.out_proj = nn.Linear(width, hidden_size)
        self.out_norm = nn.LayerNorm(hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.vision_dim:
            raise ValueError(f"features: expected shape (B, N, {self.vision_dim}), got {tuple(features.shape)}")
        dtype = self.feature_proj.weight.dtype
        x = self.feature_norm(self.feature_proj(features.to(dtype)))
        x = torch.cat([self.queries.to(dtype).expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(self.out_proj(x[:, : self.prompt_len]))
