"""LLaMA configuration, read from and written to a HF `config.json` (transformers 4.x and 5.x layouts)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Union

_ROPE_TYPES = (None, "default", "linear", "llama3")


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size: expected a multiple of num_attention_heads "
                                 f"({self.num_attention_heads}), got {self.hidden_size}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: expected a divisor of num_attention_heads "
                             f"({self.num_attention_heads}), got {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: expected an even number (rotary embedding), got {self.head_dim}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"rope_scaling: expected None or a dict, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in _ROPE_TYPES:
                raise ValueError(f"rope_scaling: rope_type {kind!r} is not supported; expected one of "
                                 f"{_ROPE_TYPES[1:]}")
            if kind in (None, "default"):
                self.rope_scaling = None

    @property
    def eos_ids(self) -> List[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def tiny(cls) -> "LlamaConfig":
        """The built-in tiny model for the byte tokenizer: 256 bytes + bos (256), eos (257), pad (258)."""
        return cls(vocab_size=259, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   rope_theta=10000.0, bos_token_id=256, eos_token_id=257, pad_token_id=258)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "LlamaConfig":
        raw = dict(raw)
        model_type = raw.get("model_type", "llama")
        if model_type not in ("llama", "mistral"):
            raise ValueError(f"model_type: expected 'llama', got {model_type!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if raw.get(flag):
                raise ValueError(f"{flag}: biases in the projections are not supported (got {raw[flag]!r})")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: expected 'silu', got {raw['hidden_act']!r}")
        # transformers 5 keeps theta and the scaling under rope_parameters; 4.x has them at top level.
        rope = raw.get("rope_parameters") or {}
        theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
        scaling = raw.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        fields = {f.name for f in dataclasses.fields(cls)}
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        absent = [name for name in required if raw.get(name) is None]
        if absent:
            raise ValueError(f"config: missing required key(s) {absent}")
        # transformers' LlamaConfig defaults, for a config.json that leaves them out.
        raw.setdefault("bos_token_id", 1)
        raw.setdefault("eos_token_id", 2)
        kwargs = {k: v for k, v in raw.items() if k in fields}
        kwargs.update(rope_theta=float(theta), rope_scaling=scaling)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str) -> "LlamaConfig":
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"config: no config.json at {path}")
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def to_hf_dict(self) -> Dict[str, Any]:
        """A config.json that transformers' LlamaConfig reads (4.x keys; 5.x converts them)."""
        out = dataclasses.asdict(self)
        out.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu",
                   attention_bias=False, mlp_bias=False)
        if out["rope_scaling"] is None:
            del out["rope_scaling"]
        return out
