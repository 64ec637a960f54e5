"""HyperLLaVA (arXiv 2403.13447): dynamic visual and language experts; the math is in METHODS.md section 4.

Language expert, in each of the last `language_layers` blocks:  x_hat = E_L(x) + x + FFN(x).
Our Block calls its MLP on the normed stream and adds the output to the residual afterwards, so the expert
sits beside the MLP on the same input: the block's MLP returns mlp(normed) + E_L(normed) (a forward hook on
block.mlp; the sum is the residual add fused into ops.dynamic_expert). E_L's weights are generated per
sample by hypernetworks (nn.DynamicExpert) from the guidance: the hidden state of the last token output by
block `guidance_layer` (0-based; default L//2 - 1, i.e. after the first half of the blocks, HF's
hidden_states[L//2]). The guidance must exist before the experts run: guidance_layer < the first expert block.
`guidance_at(model, position)` takes the guidance at another position (int, or (B,) per sample), e.g. the
end of the instruction when training on instruction + answer, so that no prediction sees the answer.

Visual expert, on a LLaVA-1.5 projector (mlp2x_gelu: L1 = Linear(vision_dim, hidden), GELU, L2 =
Linear(hidden, hidden)), HyperProjector:  V = L2(GELU(L1(f) + E_V(f))), the expert's output added to L1's
output before the GELU, with guidance = the visual features averaged over tokens. The visual tokens V are
prepended to the text embeddings (`embed_multimodal`) and run through Llama.forward(inputs_embeds=...).

Decoding: with a KV cache, the prefill (kv_cache.length == 0) generates every expert's weights once and keeps
them in kv_cache.prompts["hyperllava"]; later steps reuse them and ignore their own guidance. A prefill split
into several calls takes its guidance from the first call.

Init: the up weights' static part is zero and every dynamic part starts at exactly 0, so a freshly applied
model returns the base model's logits exactly. Trainable: the hypernetworks and static experts, and the
projector (L1, L2, E_V); the base model is frozen. No merge: the expert weights differ per sample, so they
cannot be folded into the model's weights.

    apply(model, HyperLLaVAConfig(language_layers=16, vision_dim=1024))
    embeds = embed_multimodal(model, input_ids, clip_features)     # (B, N_v + T, hidden)
    logits = model(inputs_embeds=embeds)
    save_adapter(model, "out/"); load_adapter(base_model, "out/")
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from mmkernels import _checks
from mmkernels.methods import _adapter_io
from mmkernels.models.llama import Llama
from mmkernels.nn.hypernetwork import DynamicExpert
from mmkernels.ops.dynamic_expert import ACTIVATIONS

CACHE_KEY = "hyperllava"  # kv_cache.prompts[CACHE_KEY] = {layer: (K_down, K_up)}


@dataclasses.dataclass
class HyperLLaVAConfig:
    """language_layers: blocks counted from the top that get a language expert (0: none).
    guidance_layer: the 0-based block whose output (last token) is the language guidance; None: L//2 - 1.
    bottleneck h, activation (ACTIVATIONS), embed_dim (the guidance embedding e) and rank (of the dynamic
    part) configure every expert. vision_dim: the vision features' width; set, it adds a HyperProjector
    (with a visual expert when visual_expert). seed: the initialisation of the added weights."""

    language_layers: int = 16
    guidance_layer: Optional[int] = None
    bottleneck: int = 16
    activation: str = "swiglu"
    embed_dim: int = 64
    rank: int = 8
    vision_dim: Optional[int] = None
    visual_expert: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _checks.one_of("activation", self.activation, ACTIVATIONS)
        if not isinstance(self.language_layers, int) or isinstance(self.language_layers, bool) or self.language_layers < 0:
            raise ValueError(f"language_layers: expected a non-negative integer, got {self.language_layers!r}")
        for name in ("bottleneck", "embed_dim", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.guidance_layer is not None and (not isinstance(self.guidance_layer, int) or self.guidance_layer < 0):
            raise ValueError(f"guidance_layer: expected None or a non-negative integer, got {self.guidance_layer!r}")
        if self.vision_dim is not None and (not isinstance(self.vision_dim, int) or self.vision_dim < 1):
            raise ValueError(f"vision_dim: expected None or a positive integer, got {self.vision_dim!r}")
        if not isinstance(self.visual_expert, bool):
            raise ValueError(f"visual_expert: expected a bool, got {self.visual_expert!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "HyperLLaVAConfig":
        return _checks.config_from_dict(cls, raw, "adapter config")


class HyperProjector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu projector with a visual expert: features (B, N, vision_dim) -> visual tokens
    (B, N, hidden) = L2(GELU(L1(f) + E_V(f))), E_V's weights generated from mean_N(f). expert=False gives
    the plain projector."""

    def __init__(self, vision_dim: int, hidden: int, expert: bool = True, bottleneck: int = 16,
                 activation: str = "swiglu", embed_dim: int = 64, rank: int = 8, device=None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.vision_dim, self.hidden = vision_dim, hidden
        self.l1 = nn.Linear(vision_dim, hidden, device=device)
        self.l2 = nn.Linear(hidden, hidden, device=device)
        with torch.no_grad():  # nn.Linear's init, drawn from `generator` so that cfg.seed fixes it
            for layer in (self.l1, self.l2):
                bound = layer.in_features ** -0.5
                for p in (layer.weight, layer.bias):
                    p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)
        self.expert = (DynamicExpert(vision_dim, bottleneck, guidance_dim=vision_dim, activation=activation,
                                     embed_dim=embed_dim, rank=rank, d_out=hidden, device=device, generator=generator)
                       if expert else None)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _checks.tensor("features", features, ndim=3)
        if features.shape[-1] != self.vision_dim:
            raise ValueError(f"features: expected shape (B, N, {self.vision_dim}), got {tuple(features.shape)}")
        f = features.to(self.l1.weight.dtype)
        z = self.l1(f)
        if self.expert is not None:  # in z's dtype: bf16 under autocast, with float32 masters
            z = self.expert(f.to(z.dtype), guidance=f.mean(1), residual=z)
        return self.l2(F.gelu(z))


class _ForwardState:
    """What one Llama.forward shares between the guidance block and the expert MLPs."""

    def __init__(self) -> None:
        self.position: Optional[Union[int, torch.Tensor]] = None  # set by guidance_at
        self.reset()

    def reset(self) -> None:
        self.guidance: Optional[torch.Tensor] = None
        self.cache = None
        self.reuse = False

    @contextlib.contextmanager
    def restored(self, saved: Tuple[Any, ...]) -> Iterator[None]:
        now = (self.position, self.guidance, self.cache, self.reuse)
        self.position, self.guidance, self.cache, self.reuse = saved
        try:
            yield
        finally:
            self.position, self.guidance, self.cache, self.reuse = now


def _recompute_state(model: Llama):
    """Llama.recompute_contexts entry: an expert block recomputed in the backward (gradient checkpointing) finds
    the guidance of its forward, which the model's forward hook has dropped since."""
    state = model.hyperllava_state
    return state.restored((state.position, state.guidance, state.cache, state.reuse))


_BLOCK_SIGNATURE: Dict[type, inspect.Signature] = {}


def _kv_cache_of(block: nn.Module, args, kwargs):
    sig = _BLOCK_SIGNATURE.setdefault(type(block), inspect.signature(type(block).forward))
    return sig.bind(block, *args, **kwargs).arguments.get("kv_cache")


def _pick(hidden: torch.Tensor, position: Optional[Union[int, torch.Tensor]]) -> torch.Tensor:
    """hidden (B, T, d) -> (B, d) at the guidance position."""
    bsz, seq = hidden.shape[:2]
    if position is None:
        return hidden[:, -1]
    if isinstance(position, int):
        if not -seq <= position < seq:
            raise ValueError(f"guidance position: expected an index in [-{seq}, {seq}), got {position}")
        return hidden[:, position]
    if position.shape != (bsz,):
        raise ValueError(f"guidance position: expected shape ({bsz},), got {tuple(position.shape)}")
    return hidden[torch.arange(bsz, device=hidden.device), position.to(hidden.device).long()]


def _install(model: Llama, cfg: HyperLLaVAConfig, guidance_layer: int, expert_layers: Tuple[int, ...]) -> None:
    state = _ForwardState()
    model.hyperllava_state = state
    model.recompute_contexts.append(_recompute_state)

    def reset(*_):
        state.reset()

    def capture_guidance(block, args, kwargs, output):
        kv_cache = _kv_cache_of(block, args, kwargs)
        state.cache = kv_cache
        if kv_cache is not None and kv_cache.length > 0:
            if CACHE_KEY not in kv_cache.prompts:
                raise ValueError("kv_cache: it holds no HyperLLaVA expert weights; run the prefill "
                                 "(kv_cache.length == 0) through this model first")
            state.reuse = True
            return
        mlp_out, before = output
        state.guidance = _pick(mlp_out + before, state.position)
        if kv_cache is not None:
            kv_cache.prompts[CACHE_KEY] = {}

    def language_expert(layer: int):
        def hook(mlp, args, output):
            if state.reuse:
                weights = state.cache.prompts[CACHE_KEY].get(layer)
                if weights is None:
                    raise ValueError(f"kv_cache: no HyperLLaVA expert weights for layer {layer}")
            elif state.guidance is None:
                raise RuntimeError(f"layers.{layer}.mlp: the HyperLLaVA expert runs inside the model's forward, "
                                   f"after block {guidance_layer} captured the guidance")
            else:
                weights = mlp.expert.generate(state.guidance)
                if state.cache is not None:
                    state.cache.prompts[CACHE_KEY][layer] = weights
            return mlp.expert(args[0], residual=output, weights=weights)
        return hook

    model.register_forward_pre_hook(reset)
    model.register_forward_hook(reset)  # drops the guidance (and its graph) after each forward
    if expert_layers:
        model.layers[guidance_layer].register_forward_hook(capture_guidance, with_kwargs=True)
    for i in expert_layers:
        model.layers[i].mlp.register_forward_hook(language_expert(i))


def apply(model: Llama, cfg: HyperLLaVAConfig) -> Llama:
    """Install HyperLLaVA into `model` in place: freeze the base, add the language experts to the last
    `language_layers` MLPs and, with a vision_dim, the HyperProjector as model.visual_projector."""
    if not isinstance(model, Llama):
        raise TypeError(f"model: expected an mmkernels Llama, got {type(model).__name__}")
    if not isinstance(cfg, HyperLLaVAConfig):
        raise TypeError(f"cfg: expected a HyperLLaVAConfig, got {type(cfg).__name__}")
    if getattr(model, "hyperllava_config", None) is not None:
        raise ValueError("model: HyperLLaVA is already applied to this model")
    n = len(model.layers)
    if cfg.language_layers > n:
        raise ValueError(f"language_layers: the model has {n} layers, got language_layers={cfg.language_layers}")
    first = n - cfg.language_layers
    guidance = _guidance_layer(cfg, n)
    if cfg.language_layers and not guidance < first:
        raise ValueError(f"guidance_layer: expected a block before the first expert block {first} (the guidance "
                         f"must be computed before the experts run), got {guidance}")
    if guidance >= n:
        raise ValueError(f"guidance_layer: the model has {n} layers, got {guidance}")
    model.requires_grad_(False)
    device = model.embed_tokens.weight.device
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = tuple(range(first, n))
    for i in layers:
        model.layers[i].mlp.expert = DynamicExpert(hidden, cfg.bottleneck, guidance_dim=hidden,
                                                   activation=cfg.activation, embed_dim=cfg.embed_dim, rank=cfg.rank,
                                                   device=device, generator=gen)
    if cfg.vision_dim is not None:
        model.visual_projector = HyperProjector(cfg.vision_dim, hidden, cfg.visual_expert, cfg.bottleneck,
                                                cfg.activation, cfg.embed_dim, cfg.rank, device=device, generator=gen)
    _install(model, cfg, guidance, layers)
    model.hyperllava_config = cfg
    return model


def _guidance_layer(cfg: HyperLLaVAConfig, n: int) -> int:
    return max(n // 2 - 1, 0) if cfg.guidance_layer is None else cfg.guidance_layer


def _require(model: Llama) -> HyperLLaVAConfig:
    cfg = getattr(model, "hyperllava_config", None)
    if cfg is None:
        raise ValueError("model: HyperLLaVA is not applied (call methods.hyperllava.apply first)")
    return cfg


def expert_layers(model: Llama) -> Tuple[int, ...]:
    cfg = _require(model)
    n = len(model.layers)
    return tuple(range(n - cfg.language_layers, n))


def guidance_layer(model: Llama) -> int:
    return _guidance_layer(_require(model), len(model.layers))


@contextlib.contextmanager
def guidance_at(model: Llama, position: Union[int, torch.Tensor]) -> Iterator[None]:
    """Inside the block, the language guidance is the hidden state at `position` (an int, or a (B,) tensor of
    per-sample positions) instead of the last token."""
    _require(model)
    if not isinstance(position, (int, torch.Tensor)) or isinstance(position, bool):
        raise TypeError(f"position: expected an int or a (B,) tensor, got {type(position).__name__}")
    state = model.hyperllava_state
    previous, state.position = state.position, position
    try:
        yield
    finally:
        state.position = previous


def embed_multimodal(model: Llama, input_ids: torch.Tensor, visual_features: torch.Tensor) -> torch.Tensor:
    """inputs_embeds (B, N + T, hidden) for model(inputs_embeds=...): the projected visual tokens
    (visual_features (B, N, vision_dim), e.g. CLIP's) followed by the embedded text input_ids (B, T)."""
    cfg = _require(model)
    if cfg.vision_dim is None:
        raise ValueError("model: HyperLLaVA has no projector (its config has vision_dim=None)")
    if input_ids.dim() != 2 or input_ids.shape[0] != visual_features.shape[0]:
        raise ValueError(f"input_ids: expected shape ({visual_features.shape[0]}, T) (the batch of "
                         f"visual_features), got {tuple(input_ids.shape)}")
    text = model.embed_tokens(input_ids)
    visual = model.visual_projector(visual_features)
    return torch.cat([visual.to(text.dtype), text], dim=1)


def adapter_parameters(model: Llama) -> Dict[str, nn.Parameter]:
    _require(model)
    return {n: p for n, p in model.named_parameters() if ".mlp.expert." in n or n.startswith("visual_projector.")}


def count_parameters(model: Llama) -> Dict[str, int]:
    """Trainable parameter counts: language experts, projector (L1, L2), visual expert, total."""
    counts = {"language_experts": 0, "projector": 0, "visual_expert": 0}
    for name, p in adapter_parameters(model).items():
        if name.startswith("visual_projector.expert."):
            counts["visual_expert"] += p.numel()
        elif name.startswith("visual_projector."):
            counts["projector"] += p.numel()
        else:
            counts["language_experts"] += p.numel()
    counts["total"] = sum(counts.values())
    return counts


def merge(model: Llama) -> Llama:
    """Not possible: the expert weights are generated per sample, so no single weight can absorb them."""
    _require(model)
    raise NotImplementedError("HyperLLaVA cannot be merged: its expert weights differ per sample")


def save_adapter(model: Llama, path: str) -> None:
    """Write the experts and the projector alone (adapter_model.safetensors + adapter_config.json)."""
    cfg = _require(model)
    _adapter_io.save(model, path, "hyperllava", cfg.to_dict(), adapter_parameters(model))


def load_adapter(model: Llama, path: str) -> Llama:
    """Apply the saved config to a base model (or check it matches the one applied) and load the weights."""
    return _adapter_io.load(model, path, "hyperllava", HyperLLaVAConfig, "hyperllava_config", apply,
                            adapter_parameters)
