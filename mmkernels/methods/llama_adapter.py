"""LLaMA-Adapter V1 and V2 (arXiv 2303.16199, 2304.15010); the math is in METHODS.md sections 1 and 2.

V1: a learned adaption prompt P_l (L_p, hidden) in each of the top `prompt_layers` layers. Its keys and
values go through the layer's own k/v projections (no RoPE) and are attended with a separate softmax,
added as g_h * attention before o_proj, with a zero-initialised gate: training starts from the frozen model.
V2 adds bias/scale tuning of the linear layers (nn.ScaleBiasLinear), unlocked RMSNorm weights, and early
fusion of visual prompts (models/vision.py) into the prompts of the first `fusion_layers` adapter layers
(the paper) or of all of them (the official code).

    model = Llama.from_pretrained(path)
    apply(model, LlamaAdapterConfig(version=2, vision_dim=1024))
    groups = parameter_groups(model)           # {"image_text": {...}, "instruction": {...}}
    set_task(model, "instruction")             # only that group receives gradients
    save_adapter(model, "out/")                # the adapter only, as safetensors + adapter_config.json
    merge(model)                               # fold bias/scale into the weights for inference

The prompt keys/values are computed once per training step, once per model at inference (text prompts,
recomputed only when a weight changes) and once per request at the prefill (visual prompts, kept in the
KV cache), never per decode step.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.methods import _adapter_io
from mmkernels.models.kv_cache import KVCache
from mmkernels.models.llama import Attention, Llama, PromptSegment
from mmkernels.models.vision import VisualProjection
from mmkernels.nn import RMSNorm, ScaleBiasLinear

ATTENTION_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
BIAS_SCALE_TARGETS = ATTENTION_LINEARS + MLP_LINEARS + ("lm_head",)
TASKS = ("image_text", "instruction")


@dataclasses.dataclass
class LlamaAdapterConfig:
    """version 1 or 2 sets the defaults of the V2-only features (bias/scale targets, train_norms).

    prompt_layers: adapter layers counted from the top (None: all layers; V1 7B uses 30 of 32).
    gate_fn "tanh" (official training code, V2) or "raw" (PEFT, litgpt); gate_per_head False gives the one
    scalar per layer of PEFT's AdaptionPrompt. bias_scale_targets: names from BIAS_SCALE_TARGETS
    (default: none for V1, the seven block linears for V2); bias_scale_form "output" (paper, s*(Wx+b)) or
    "input" (W(s*x)+b). vision_dim: the vision tower's feature size; set, it adds a VisualProjection
    (visual_width, visual_blocks, visual_heads) whose output is fused into the prompts of the first
    `fusion_layers` adapter layers (fusion="early") or of all of them (fusion="all").
    """

    version: int = 1
    prompt_len: int = 10
    prompt_layers: Optional[int] = None
    gate_fn: str = "tanh"
    gate_per_head: bool = True
    gate_init: float = 0.0
    bias_scale_targets: Optional[Tuple[str, ...]] = None
    bias_scale_form: str = "output"
    train_norms: Optional[bool] = None
    fusion: str = "early"
    fusion_layers: int = 1
    vision_dim: Optional[int] = None
    visual_width: Optional[int] = None
    visual_blocks: int = 2
    visual_heads: int = 8

    def __post_init__(self) -> None:
        _checks.one_of("version", self.version, (1, 2))
        _checks.one_of("gate_fn", self.gate_fn, ("tanh", "raw"))
        _checks.one_of("fusion", self.fusion, ("early", "all"))
        _checks.one_of("bias_scale_form", self.bias_scale_form, ("output", "input"))
        for name in ("prompt_len", "fusion_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.prompt_layers is not None and (not isinstance(self.prompt_layers, int) or self.prompt_layers < 1):
            raise ValueError(f"prompt_layers: expected None or a positive integer, got {self.prompt_layers!r}")
        if self.bias_scale_targets is None:
            self.bias_scale_targets = () if self.version == 1 else ATTENTION_LINEARS + MLP_LINEARS
        self.bias_scale_targets = tuple(self.bias_scale_targets)
        unknown = [t for t in self.bias_scale_targets if t not in BIAS_SCALE_TARGETS]
        if unknown:
            raise ValueError(f"bias_scale_targets: unknown {unknown}; expected names from {BIAS_SCALE_TARGETS}")
        if self.train_norms is None:
            self.train_norms = self.version == 2
        if self.vision_dim is not None:
            if self.version != 2:
                raise ValueError(f"vision_dim: visual fusion is a V2 feature; got version={self.version}")
            if not isinstance(self.vision_dim, int) or self.vision_dim < 1:
                raise ValueError(f"vision_dim: expected None or a positive integer, got {self.vision_dim!r}")

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bias_scale_targets"] = list(self.bias_scale_targets)
        return out

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "LlamaAdapterConfig":
        return _checks.config_from_dict(cls, raw, "adapter config")


class AdaptionPrompt(nn.Module):
    """The prompt and gate of one attention layer; called by Attention as its `prompt` (models/llama.py)."""

    def __init__(self, cfg: LlamaAdapterConfig, hidden: int, heads: int, fuse_visual: bool, device) -> None:
        super().__init__()
        self.prompt = nn.Parameter(torch.randn(cfg.prompt_len, hidden, device=device))  # N(0, 1), like nn.Embedding
        self.gate = nn.Parameter(torch.full((heads if cfg.gate_per_head else 1,), float(cfg.gate_init), device=device))
        self.gate_fn = cfg.gate_fn
        self.fuse_visual = fuse_visual
        self._static: Optional[Tuple[tuple, PromptSegment]] = None

    def _project(self, attn: Attention, tokens: torch.Tensor, dtype: torch.dtype) -> PromptSegment:
        rows, length = tokens.shape[:2]
        tokens = tokens.to(dtype)
        k = attn.k_proj(tokens).view(rows, length, attn.n_kv_heads, attn.head_dim)
        v = attn.v_proj(tokens).view(rows, length, attn.n_kv_heads, attn.head_dim)
        return PromptSegment(k, v, self.gate, self.gate_fn)

    def _static_key(self, attn: Attention, dtype: torch.dtype) -> tuple:
        # In-place updates (optimizer steps, load_state_dict) bump _version; .to() changes data_ptr.
        params = (self.prompt, *attn.k_proj.parameters(), *attn.v_proj.parameters())
        return (dtype,) + tuple((p.data_ptr(), p._version) for p in params)

    def forward(self, attn: Attention, batch: int, dtype: torch.dtype, visual_prompts: Optional[torch.Tensor],
                kv_cache: Optional[KVCache], layer: int) -> PromptSegment:
        if self.fuse_visual and visual_prompts is not None:
            if tuple(visual_prompts.shape) != (batch, *self.prompt.shape):
                raise ValueError(f"visual_prompts: expected shape ({batch}, {self.prompt.shape[0]}, "
                                 f"{self.prompt.shape[1]}), got {tuple(visual_prompts.shape)}")
            seg = self._project(attn, self.prompt[None] + visual_prompts.to(self.prompt.dtype), dtype)
            if kv_cache is not None:  # once per request: the decode steps reuse it
                kv_cache.prompts[layer] = seg
            return seg
        if kv_cache is not None and layer in kv_cache.prompts:
            return kv_cache.prompts[layer]
        if torch.is_grad_enabled():  # training: once per step, with the graph
            return self._project(attn, self.prompt[None], dtype)
        key = self._static_key(attn, dtype)
        if self._static is None or self._static[0] != key:  # inference: once per model
            self._static = (key, self._project(attn, self.prompt[None], dtype))
        return self._static[1]

    def extra_repr(self) -> str:
        return (f"prompt_len={self.prompt.shape[0]}, gate={tuple(self.gate.shape)}, gate_fn={self.gate_fn!r}, "
                f"fuse_visual={self.fuse_visual}")


def adapter_layers(model: Llama) -> Tuple[int, ...]:
    cfg = model.adapter_config
    n = len(model.layers)
    return tuple(range(n - (cfg.prompt_layers or n), n))


def fusion_layers(model: Llama) -> Tuple[int, ...]:
    """The adapter layers whose prompts receive the visual prompts (none without a vision_dim)."""
    cfg = model.adapter_config
    if cfg.vision_dim is None:
        return ()
    layers = adapter_layers(model)
    return layers if cfg.fusion == "all" else layers[: cfg.fusion_layers]


def apply(model: Llama, cfg: LlamaAdapterConfig) -> Llama:
    """Install LLaMA-Adapter into `model` in place: freeze the base weights, add the prompts and gates,
    wrap the bias/scale targets, unlock the norms and add the visual projection as the config says."""
    if not isinstance(model, Llama):
        raise TypeError(f"model: expected an mmkernels Llama, got {type(model).__name__}")
    if not isinstance(cfg, LlamaAdapterConfig):
        raise TypeError(f"cfg: expected a LlamaAdapterConfig, got {type(cfg).__name__}")
    if getattr(model, "adapter_config", None) is not None:
        raise ValueError("model: LLaMA-Adapter is already applied to this model")
    n, mc = len(model.layers), model.config
    if cfg.prompt_layers is not None and cfg.prompt_layers > n:
        raise ValueError(f"prompt_layers: the model has {n} layers, got prompt_layers={cfg.prompt_layers}")
    model.requires_grad_(False)
    model.adapter_config = cfg
    device = model.embed_tokens.weight.device
    fused = set(fusion_layers(model))
    for i in adapter_layers(model):
        attn = model.layers[i].self_attn
        attn.prompt = AdaptionPrompt(cfg, mc.hidden_size, attn.n_heads, i in fused, device)
    for block in model.layers:
        for name in cfg.bias_scale_targets:
            for owner in (block.self_attn, block.mlp):
                if hasattr(owner, name):
                    setattr(owner, name, ScaleBiasLinear(getattr(owner, name), cfg.bias_scale_form))
    if "lm_head" in cfg.bias_scale_targets:
        model.lm_head = ScaleBiasLinear(model.lm_head, cfg.bias_scale_form)
    if cfg.train_norms:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.requires_grad_(True)
    if cfg.vision_dim is not None:
        model.visual_projection = VisualProjection(cfg.vision_dim, mc.hidden_size, cfg.prompt_len, cfg.visual_width,
                                                   cfg.visual_blocks, cfg.visual_heads).to(device)
    return model


def _require_adapter(model: Llama) -> LlamaAdapterConfig:
    cfg = getattr(model, "adapter_config", None)
    if cfg is None:
        raise ValueError("model: LLaMA-Adapter is not applied (call methods.llama_adapter.apply first)")
    return cfg


def parameter_groups(model: Llama) -> Dict[str, Dict[str, nn.Parameter]]:
    """The adapter's parameters by task of the V2 joint training, disjoint and covering all of them:
    "image_text": the visual projection and the prompts and gates of the fusion layers;
    "instruction": the other prompts and gates, the bias/scale parameters and the norms."""
    cfg = _require_adapter(model)
    early = {f"layers.{i}.self_attn.prompt." for i in fusion_layers(model)}
    groups: Dict[str, Dict[str, nn.Parameter]] = {task: {} for task in TASKS}
    for name, p in model.named_parameters():
        is_prompt = ".self_attn.prompt." in name
        is_bias_scale = name.endswith((".scale", ".bias")) and _owner_is(model, name, ScaleBiasLinear)
        is_norm = cfg.train_norms and name.endswith("norm.weight") and _owner_is(model, name, RMSNorm)
        if name.startswith("visual_projection.") or (is_prompt and any(name.startswith(e) for e in early)):
            groups["image_text"][name] = p
        elif is_prompt or is_bias_scale or is_norm:
            groups["instruction"][name] = p
    return groups


def _owner_is(model: nn.Module, param_name: str, kind: type) -> bool:
    return isinstance(model.get_submodule(param_name.rpartition(".")[0]), kind)


def adapter_parameters(model: Llama) -> Dict[str, nn.Parameter]:
    groups = parameter_groups(model)
    return {**groups["image_text"], **groups["instruction"]}


def set_task(model: Llama, task: Optional[str]) -> None:
    """Let only `task`'s parameter group receive gradients (None: all adapter parameters)."""
    if task is not None:
        _checks.one_of("task", task, TASKS)
    groups = parameter_groups(model)
    for name, group in groups.items():
        for p in group.values():
            p.requires_grad_(task is None or name == task)


def count_parameters(model: Llama) -> Dict[str, int]:
    """Adapter parameter counts: per group and in total."""
    groups = parameter_groups(model)
    counts = {name: sum(p.numel() for p in group.values()) for name, group in groups.items()}
    counts["total"] = sum(counts.values())
    return counts


def merge(model: Llama) -> Llama:
    """For inference export: fold every bias/scale into its linear layer (a plain nn.Linear with a bias)
    and freeze everything. The prompts stay (attention over them cannot be folded into weights)."""
    _require_adapter(model)
    return _adapter_io.merge_modules(model, "llama_adapter", (ScaleBiasLinear,))


def save_adapter(model: Llama, path: str) -> None:
    """Write the adapter alone: `adapter_model.safetensors` (its parameters, fp32 as trained) and
    `adapter_config.json`, each atomically."""
    cfg = _require_adapter(model)
    _adapter_io.save(model, path, "llama_adapter", cfg.to_dict(), adapter_parameters(model))


def load_adapter(model: Llama, path: str) -> Llama:
    """Apply the saved config to a base model (or check it matches the one applied) and load the weights.
    Every saved tensor must match a parameter by name and shape, and every adapter parameter be saved."""
    return _adapter_io.load(model, path, "llama_adapter", LlamaAdapterConfig, "adapter_config", apply,
                            adapter_parameters)


def encode_images(model: Llama, vision_tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> visual prompts (B, prompt_len, hidden) for model(..., visual_prompts=)."""
    cfg = _require_adapter(model)
    if cfg.vision_dim is None:
        raise ValueError("model: the adapter has no visual projection (its config has vision_dim=None)")
    return model.visual_projection(vision_tower(pixel_values))


_PEFT_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.adaption_(prompt|gate)$")


def from_peft(model: Llama, source, adapter_name: str = "default") -> Llama:
    """Install HF PEFT AdaptionPrompt weights into an mmkernels Llama loaded from the same base checkpoint.

    source: a PeftModel (its adapter `adapter_name`) or a directory written by its save_pretrained
    (adapter_config.json + adapter_model.safetensors). PEFT's form is V1 with one raw scalar gate per layer:
    the config becomes LlamaAdapterConfig(version=1, prompt_len=adapter_len, prompt_layers=adapter_layers,
    gate_fn="raw", gate_per_head=False), and the outputs match PEFT's.
    """
    peft_cfg, state = _adapter_io.read_peft(source, adapter_name)
    kind = str(peft_cfg.get("peft_type", ""))
    if not kind.endswith("ADAPTION_PROMPT"):
        raise ValueError(f"source: expected a PEFT AdaptionPrompt adapter, got peft_type {kind!r}")
    if peft_cfg.get("target_modules", "self_attn") != "self_attn":
        raise ValueError(f"source: expected target_modules 'self_attn', got {peft_cfg['target_modules']!r}")
    cfg = LlamaAdapterConfig(version=1, prompt_len=int(peft_cfg["adapter_len"]),
                             prompt_layers=int(peft_cfg["adapter_layers"]), gate_fn="raw", gate_per_head=False)
    tensors = {}
    for key, value in state.items():
        match = _PEFT_KEY.search(key)
        if match is None:
            raise ValueError(f"source: unexpected PEFT tensor {key!r}")
        layer, what = match.groups()
        tensors[f"layers.{layer}.self_attn.prompt.{what}"] = value[0] if what == "prompt" else value
    apply(model, cfg)
    _adapter_io.load_tensors(adapter_parameters(model), tensors)
    return model
