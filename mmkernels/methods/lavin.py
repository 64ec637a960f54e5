"""LaVIN: mixture-of-modality adaptation (arXiv 2305.15023); the math is in METHODS.md section 3.

    apply(model, LaVINConfig(), vision=clip)      # adapters in every LLM layer (and in the CLIP), routers,
                                                  # the visual projection and the modality embedding
    logits = forward(model, input_ids, pixel_values=images)     # image samples (modality 1)
    logits = forward(model, input_ids)                          # text-only samples (modality 0)
    tokens = generate(model, prompts, pixel_values=images, max_new_tokens=32)  # token lists, any lengths
    save_adapter(model, "out/"); load_adapter(base_model, "out/", vision=clip)
    merge(model, modality=1)       # fold the LLM adapters into q/k/v for one modality

LLM: one MoMAdapter between each layer's attention norm and its q/k/v projections (block.self_attn is wrapped
in MoMAttention). Its router reads the normalised state of a modality token at that layer.

The modality token. LaVIN prepends a learned embedding m (row 0: text-only, row 1: with image) at position 0
and masks it from every other token. Under the causal mask, position 0 attends only to itself, and no other
position attends to it: so (1) its hidden state at every layer is exactly what the one-token sequence [m]
gives at that layer (nothing else enters it), and (2) the other tokens' states are exactly those of the
sequence without m, except through the router weights m's states produce (m contributes no key/value they
see). Rotary embeddings depend only on position differences, so dropping m also shifts the other tokens'
positions by one without changing any attention score. Hence the implementation: a routing pass runs the
two-row batch [m_0], [m_1] (1 token each, position 0) through the same blocks, each adapter routing that
token from its own input and recording its layer's weights; then the main pass runs the visual and text
tokens alone, each layer's adapter using the recorded weights of each sample's modality. Gradients reach the
router, the adapters and the embedding through both passes, as in the literal formulation (the tests check
both logits and gradients against it, written with an explicit attention mask). At inference the weights
are computed at the prefill and stored in kv_cache.prompts[ROUTER_CACHE_KEY] for the decode steps.

The trainer runs the same model in one pass instead (`append_modality_token` + `routed_by_token`): each row
gets its modality token as its last position, in a packed segment of its own (so it attends only to itself
and no token attends to it, as at position 0), and each adapter routes its row by that position. Every
block then runs once per step, inside its own forward, which FSDP2 needs to shard each block on its own
(the routing pass would run each block a second time and reach its router in the backward after the block
was resharded). The tests check it against lavin.forward (logits, loss and gradients).

Vision: a MoMAdapter after each CLIP encoder layer's layer_norm1 (and layer_norm2 with
vision_adapter_before_mlp), routed by the [CLS] token of its own normalised input, per sample (LaVIN's CLIP
code indexes x[:, 0] of a sequence-first tensor, i.e. routes every token by the first sample's token at the
same position; this module uses the per-sample [CLS], its evident intent). Visual tokens: the [CLS] state of
every `visual_layer_stride`-th CLIP layer (6 for CLIP-L/14's 24 layers), through the MLP vision_dim ->
visual_hidden (SiLU) -> d, prepended to the text embeddings (LaVIN inserts them after the first token, the
BOS, and a fixed text prefix; prepending keeps the API to "visual tokens first").

Dropout on the adapters' u (LaVIN: 0.1) runs through the plain-PyTorch path (see nn.MoMAdapter); the default
here is 0, which keeps the fused kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.methods import _adapter_io
from mmkernels.models.kv_cache import KVCache
from mmkernels.models.llama import Attention, Llama
from mmkernels.nn.mom_adapter import MoMAdapter

ROUTER_CACHE_KEY = "lavin_router"  # kv_cache.prompts entry: {layer: (B, 2) routing weights}
TEXT, IMAGE = 0, 1                 # rows of the modality embedding


@dataclasses.dataclass
class LaVINConfig:
    """hidden, groups, scale: the adapters (h = 8, G = 2, s = 1); tau: the router temperature (10 for 7B, 5 for
    13B); dropout on u in training (0 keeps the fused kernel; LaVIN used 0.1); vision_adapters: adapters in
    the CLIP encoder (after layer_norm1; also after layer_norm2 with vision_adapter_before_mlp);
    visual_layer_stride: the [CLS] of every stride-th CLIP layer is a visual token; visual_hidden: the width
    of the visual projection MLP."""

    hidden: int = 8
    groups: int = 2
    scale: float = 1.0
    tau: float = 10.0
    dropout: float = 0.0
    vision_adapters: bool = True
    vision_adapter_before_mlp: bool = False
    visual_layer_stride: int = 4
    visual_hidden: int = 128

    def __post_init__(self) -> None:
        for name in ("hidden", "groups", "visual_layer_stride", "visual_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive integer, got {value!r}")
        if self.hidden % self.groups:
            raise ValueError(f"hidden: expected a multiple of groups ({self.groups}), got {self.hidden}")
        _checks.number("scale", self.scale)
        _checks.positive_float("tau", self.tau)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {self.dropout!r}")
        for name in ("vision_adapters", "vision_adapter_before_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "LaVINConfig":
        return _checks.config_from_dict(cls, raw, "adapter config")

    def adapter(self, d: int, device) -> MoMAdapter:
        return MoMAdapter(d, self.hidden, self.groups, self.scale, self.tau, self.dropout, device=device)


# ----------------------------------------------------------------------------------------------------
# Routing state: which weights each layer's adapter uses during one forward
# ----------------------------------------------------------------------------------------------------


class _Routing:
    """record=True (the routing pass, or one pass with the modality token appended): each adapter computes its
    weights from its own input's last position (the modality token) and stores them; record=False (the main
    pass): each adapter uses weights[layer]."""

    def __init__(self, record: bool, weights: Optional[Dict[int, torch.Tensor]] = None) -> None:
        self.record = record
        self.weights: Dict[int, torch.Tensor] = {} if weights is None else weights


class MoMAttention(nn.Module):
    """self_attn of a LaVIN block: attn(adapter(x), ...), with the signature of models.llama.Attention."""

    def __init__(self, attn: Attention, adapter: MoMAdapter) -> None:
        super().__init__()
        self.attn = attn
        self.adapter = adapter
        self.routing: Optional[_Routing] = None  # set by _routing() for the duration of one forward

    def _weights(self, x: torch.Tensor, layer: int, kv_cache: Optional[KVCache]) -> torch.Tensor:
        r = self.routing
        if r is not None and r.record:
            w = self.adapter.routing_weights(x[:, -1])
            r.weights[layer] = w
            return w
        if r is not None:
            return r.weights[layer]
        if kv_cache is not None and ROUTER_CACHE_KEY in kv_cache.prompts:
            return kv_cache.prompts[ROUTER_CACHE_KEY][layer]
        raise ValueError("LaVIN: no routing weights for this forward; call methods.lavin.forward(model, ...) (it "
                         "runs the modality routing pass), or pass a kv_cache that a lavin.forward prefill filled")

    def forward(self, x, cos, sin, layer: int, kv_cache: Optional[KVCache], kv_start: Optional[torch.Tensor],
                visual_prompts: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None):
        w = self._weights(x, layer, kv_cache)
        if w.shape[0] != x.shape[0]:
            raise ValueError(f"LaVIN routing weights: expected {x.shape[0]} rows (the batch), got {w.shape[0]}")
        return self.attn(self.adapter(x, router_w=w), cos, sin, layer, kv_cache, kv_start, visual_prompts,
                         segment_ids)


def _wrappers(model: Llama) -> List[MoMAttention]:
    return [b.self_attn for b in model.layers if isinstance(b.self_attn, MoMAttention)]


@contextlib.contextmanager
def _routing(model: Llama, routing: Optional[_Routing]) -> Iterator[Optional[_Routing]]:
    wrappers = _wrappers(model)
    before = [w.routing for w in wrappers]
    for w in wrappers:
        w.routing = routing
    try:
        yield routing
    finally:
        for w, r in zip(wrappers, before):
            w.routing = r


def _recompute_routing(model: Llama):
    """Llama.recompute_contexts entry: a block recomputed in the backward (gradient checkpointing) routes with
    the weights its forward used, after lavin.forward / routed have returned."""
    wrappers = _wrappers(model)
    return _routing(model, wrappers[0].routing) if wrappers else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# Vision side
# ----------------------------------------------------------------------------------------------------


class NormThenAdapter(nn.Module):
    """A CLIP LayerNorm followed by a MoMAdapter routed by the [CLS] (first) token of the normalised input."""

    def __init__(self, norm: nn.Module, adapter: MoMAdapter) -> None:
        super().__init__()
        self.norm = norm
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.adapter(h, router_input=h[:, 0])


class VisualProjectionMLP(nn.Module):
    """(B, n, vision_dim) -> (B, n, d): Linear -> SiLU -> Linear; xavier weights and zero biases (LaVIN)."""

    def __init__(self, vision_dim: int, hidden: int, d: int, device=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, hidden, device=device)
        self.fc2 = nn.Linear(hidden, d, device=device)
        if self.fc1.weight.device.type != "meta":
            for lin in (self.fc1, self.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.silu(self.fc1(x)))


def _clip_parts(clip: nn.Module):
    inner = getattr(clip, "vision_model", clip)  # transformers 4.x nests the vision transformer; 5.x does not
    for name in ("embeddings", "pre_layrnorm", "encoder"):
        if not hasattr(inner, name):
            raise TypeError(f"vision: expected a transformers CLIPVisionModel, got {type(clip).__name__} "
                            f"without {name!r}")
    return inner


class LaVINVisionEncoder(nn.Module):
    """A frozen CLIP vision transformer with MoM adapters: pixel_values (B, 3, H, W) -> the [CLS] states of
    every stride-th encoder layer (B, layers // stride, vision_dim). Runs with gradients (the adapters
    train); only the layers up to the last one read are run."""

    def __init__(self, clip: nn.Module, cfg: LaVINConfig, device) -> None:
        super().__init__()
        inner = _clip_parts(clip)
        self.clip = clip.requires_grad_(False)
        self.stride = cfg.visual_layer_stride
        layers = inner.encoder.layers
        self.num_tokens = len(layers) // self.stride
        if self.num_tokens == 0:
            raise ValueError(f"visual_layer_stride: the CLIP has {len(layers)} layers, fewer than the stride "
                             f"{self.stride}: no visual token")
        width = clip.config.hidden_size
        if cfg.vision_adapters:
            for layer in layers:
                layer.layer_norm1 = NormThenAdapter(layer.layer_norm1, cfg.adapter(width, device))
                if cfg.vision_adapter_before_mlp:
                    layer.layer_norm2 = NormThenAdapter(layer.layer_norm2, cfg.adapter(width, device))
        self._layer_args = "causal_attention_mask" in inspect.signature(layers[0].forward).parameters

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
        inner = _clip_parts(self.clip)
        dtype = inner.pre_layrnorm.weight.dtype
        h = inner.pre_layrnorm(inner.embeddings(pixel_values.to(dtype)))
        out = []
        for i, layer in enumerate(inner.encoder.layers[: self.num_tokens * self.stride]):
            h = layer(h, None, None) if self._layer_args else layer(h, None)
            if isinstance(h, tuple):
                h = h[0]
            if (i + 1) % self.stride == 0:
                out.append(h[:, 0])
        return torch.stack(out, 1)


# ----------------------------------------------------------------------------------------------------
# apply / forward / generate
# ----------------------------------------------------------------------------------------------------


def apply(model: Llama, cfg: LaVINConfig, vision: Optional[nn.Module] = None) -> Llama:
    """Install LaVIN in place: freeze `model` (and `vision`), wrap every layer's self_attn in MoMAttention,
    add the modality embedding (2, d); with `vision` (a transformers CLIPVisionModel, or a
    models.vision.VisionTower wrapping one) add the adapted vision encoder (model.lavin_vision) and the
    visual projection (model.visual_projection). New parameters are float32 on the model's device."""
    if not isinstance(model, Llama):
        raise TypeError(f"model: expected an mmkernels Llama, got {type(model).__name__}")
    if not isinstance(cfg, LaVINConfig):
        raise TypeError(f"cfg: expected a LaVINConfig, got {type(cfg).__name__}")
    if getattr(model, "lavin_config", None) is not None:
        raise ValueError("model: LaVIN is already applied to this model")
    d = model.config.hidden_size
    if d % cfg.groups:
        raise ValueError(f"groups: the model's hidden size {d} is not divisible by groups={cfg.groups}")
    device = model.embed_tokens.weight.device
    clip = getattr(vision, "clip", vision)
    if clip is not None:
        _clip_parts(clip)
    model.requires_grad_(False)
    for block in model.layers:
        if not isinstance(block.self_attn, Attention):
            raise TypeError(f"model: expected plain Attention modules, got {type(block.self_attn).__name__}")
        block.self_attn = MoMAttention(block.self_attn, cfg.adapter(d, device))
    model.modality_embedding = nn.Embedding(2, d, device=device)
    model.recompute_contexts.append(_recompute_routing)
    if clip is not None:
        clip_device = next(clip.parameters()).device
        model.lavin_vision = LaVINVisionEncoder(clip, cfg, clip_device)
        model.visual_projection = VisualProjectionMLP(clip.config.hidden_size, cfg.visual_hidden, d, device)
    model.lavin_config = cfg
    return model


def _require(model: Llama) -> LaVINConfig:
    cfg = getattr(model, "lavin_config", None)
    if cfg is None:
        raise ValueError("model: LaVIN is not applied (call methods.lavin.apply first)")
    return cfg


def encode_images(model: Llama, pixel_values: torch.Tensor) -> torch.Tensor:
    """pixel_values (B, 3, H, W) -> visual tokens (B, layers // stride, d) in float32."""
    _require(model)
    if getattr(model, "lavin_vision", None) is None:
        raise ValueError("model: LaVIN was applied without a vision model (apply(model, cfg, vision=clip))")
    feats = model.lavin_vision(pixel_values)
    return model.visual_projection(feats.to(model.visual_projection.fc1.weight.dtype))


def _modality(modality, batch: int, default: int, device) -> torch.Tensor:
    if modality is None:
        modality = default
    if isinstance(modality, int) and not isinstance(modality, bool):
        modality = torch.full((batch,), modality, dtype=torch.long, device=device)
    _checks.tensor("modality", modality, ndim=1, dtypes=(torch.int64, torch.int32))
    _checks.shape("modality", modality, (batch,))
    if _checks.has_values(modality) and bool(((modality < 0) | (modality > 1)).any()):
        raise ValueError(f"modality: expected 0 (text-only) or 1 (with image), got {modality.tolist()}")
    return modality.to(device=device, dtype=torch.long)


def route(model: Llama, modality: torch.Tensor) -> Dict[int, torch.Tensor]:
    """The routing pass: {layer: (B, 2) weights} for each sample's modality (B,) (0 text-only, 1 image).

    Runs the two modality tokens as a batch of two 1-token sequences through the blocks (see the module
    docstring) and picks each sample's row; differentiable."""
    _require(model)
    dtype = model.embed_tokens.weight.dtype
    rows = torch.arange(2, device=model.modality_embedding.weight.device)
    tokens = model.modality_embedding(rows)[:, None, :].to(dtype)
    with _routing(model, _Routing(record=True)) as r:
        model(inputs_embeds=tokens)  # its logits are not needed; the blocks record the weights
    index = modality.to(rows.device)
    return {layer: w[index] for layer, w in r.weights.items()}


def append_modality_token(model: Llama, embeds: torch.Tensor, modality: torch.Tensor, *,
                          positions: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None
                          ) -> Dict[str, torch.Tensor]:
    """Llama.forward arguments that run LaVIN in one pass (inside `routed_by_token`): embeds (B, T, d) with each
    row's modality token (modality (B,): 0 text-only, 1 with image) appended at position T in a segment of its
    own. positions / segment_ids (B, T), when the rows have them (packing, hidden visual prefixes), are
    extended; a row's text keeps its rotary positions. The output at position T is not a prediction (give its
    label -100). No KV cache: packed segments need the whole sequence."""
    _require(model)
    bsz, seq = embeds.shape[:2]
    modality = _modality(modality, bsz, TEXT, embeds.device)
    token = model.modality_embedding(modality.to(model.modality_embedding.weight.device))[:, None]
    out = {"inputs_embeds": torch.cat([embeds, token.to(device=embeds.device, dtype=embeds.dtype)], 1)}
    if segment_ids is None:
        segment_ids = torch.zeros(bsz, seq, dtype=torch.long, device=embeds.device)
    _checks.shape("segment_ids", segment_ids, (bsz, seq))
    out["segment_ids"] = torch.cat([segment_ids, segment_ids.max(1, keepdim=True).values + 1], 1)
    if positions is not None:
        if positions.dim() == 1:
            positions = positions.expand(bsz, seq)
        _checks.shape("positions", positions, (bsz, seq))
        out["positions"] = torch.cat([positions, torch.zeros_like(positions[:, :1])], 1)
    return out


def routed_by_token(model: Llama):
    """The context of a one-pass forward (append_modality_token): each adapter routes its rows by their last
    position."""
    _require(model)
    return _routing(model, _Routing(record=True))


@contextlib.contextmanager
def routed(model: Llama, modality: Union[int, torch.Tensor]) -> Iterator[Dict[int, torch.Tensor]]:
    """Inside the block, plain model(...) calls use the routing weights of `modality` (0/1 or (B,)), computed
    on entry by the routing pass (differentiable: a trainer's loss reaches the routers through them)."""
    device = model.modality_embedding.weight.device
    batch = modality.shape[0] if isinstance(modality, torch.Tensor) else 1
    weights = route(model, _modality(modality, batch, TEXT, device))
    with _routing(model, _Routing(record=False, weights=weights)):
        yield weights


def forward(model: Llama, input_ids: Optional[torch.Tensor] = None, *, inputs_embeds: Optional[torch.Tensor] = None,
            pixel_values: Optional[torch.Tensor] = None, visual_tokens: Optional[torch.Tensor] = None,
            modality: Union[None, int, torch.Tensor] = None, positions: Optional[torch.Tensor] = None,
            kv_cache: Optional[KVCache] = None, kv_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float32 logits (B, n_visual + T, vocab) of [visual tokens, text].

    Text: input_ids (B, T) or inputs_embeds (B, T, d). Images: pixel_values (B, 3, H, W) (encoded here) or
    visual_tokens (B, n, d) (from encode_images), prepended to the text; or neither. modality: 0/1 or (B,)
    (default: 1 with images, else 0). With a kv_cache, the routing weights are computed at the first call and
    stored in it (kv_cache.prompts[ROUTER_CACHE_KEY]); later calls, and plain model(...) decode steps with that
    cache, reuse them."""
    _require(model)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids, inputs_embeds: expected exactly one of them")
    if pixel_values is not None and visual_tokens is not None:
        raise ValueError("pixel_values, visual_tokens: expected at most one of them")
    x = model.embed_tokens(input_ids) if input_ids is not None else inputs_embeds
    if x.dim() != 3:
        raise ValueError(f"input_ids: expected shape (B, T), got {tuple(input_ids.shape)}" if input_ids is not None
                         else f"inputs_embeds: expected shape (B, T, d), got {tuple(x.shape)}")
    if pixel_values is not None:
        visual_tokens = encode_images(model, pixel_values)
    if visual_tokens is not None:
        _checks.tensor("visual_tokens", visual_tokens, ndim=3)
        if visual_tokens.shape[0] != x.shape[0] or visual_tokens.shape[2] != x.shape[2]:
            raise ValueError(f"visual_tokens: expected shape ({x.shape[0]}, n, {x.shape[2]}), "
                             f"got {tuple(visual_tokens.shape)}")
        x = torch.cat([visual_tokens.to(x.dtype), x], 1)
    wrapped = any(isinstance(b.self_attn, MoMAttention) for b in model.layers)
    if not wrapped:  # merged: the adapters are in q/k/v
        return model(inputs_embeds=x, positions=positions, kv_cache=kv_cache, kv_start=kv_start)
    if kv_cache is not None and ROUTER_CACHE_KEY in kv_cache.prompts:
        weights = kv_cache.prompts[ROUTER_CACHE_KEY]
    else:
        mod = _modality(modality, x.shape[0], IMAGE if visual_tokens is not None else TEXT, x.device)
        weights = route(model, mod)
        if kv_cache is not None:
            kv_cache.prompts[ROUTER_CACHE_KEY] = weights
    with _routing(model, _Routing(record=False, weights=weights)):
        return model(inputs_embeds=x, positions=positions, kv_cache=kv_cache, kv_start=kv_start)


@torch.no_grad()
def generate(model: Llama, prompts: Sequence[Sequence[int]], *, pixel_values: Optional[torch.Tensor] = None,
             visual_tokens: Optional[torch.Tensor] = None, modality: Union[None, int, torch.Tensor] = None,
             **kwargs: Any) -> List[List[int]]:
    """models.generation.generate for a LaVIN model: new tokens for each prompt (token lists of any lengths;
    left-padded there), each after its visual tokens (pixel_values (B, 3, H, W), encoded here, or
    visual_tokens (B, n, d)). The routing pass runs once, before the prefill, for each sample's modality
    (default: 1 with images, else 0); the prefill and every decode step use its weights. kwargs:
    max_new_tokens, temperature, top_p, eos_id, pad_id, seed, on_step (see generation.generate)."""
    from mmkernels.models.generation import generate as generate_tokens

    inputs = generation_inputs(model, len(prompts), pixel_values=pixel_values, visual_tokens=visual_tokens,
                               modality=modality)
    return generate_tokens(model, prompts, **inputs, **kwargs)


def generation_inputs(model: Llama, batch: int, *, pixel_values: Optional[torch.Tensor] = None,
                      visual_tokens: Optional[torch.Tensor] = None,
                      modality: Union[None, int, torch.Tensor] = None) -> Dict[str, Any]:
    """Keyword arguments of models.generation.generate for `batch` prompts: the visual tokens as the prompts'
    prefix (pixel_values encoded here, or visual_tokens) and the routing context of each sample's modality
    (default: 1 with images, else 0), entered once for the prefill and every decode step."""
    _require(model)
    if pixel_values is not None and visual_tokens is not None:
        raise ValueError("pixel_values, visual_tokens: expected at most one of them")
    if pixel_values is not None:
        visual_tokens = encode_images(model, pixel_values)
    device = model.modality_embedding.weight.device
    mod = _modality(modality, batch, IMAGE if visual_tokens is not None else TEXT, device)
    out: Dict[str, Any] = {"context": lambda: routed(model, mod)}
    if visual_tokens is not None:
        out["prefix_embeds"] = visual_tokens
    return out


# ----------------------------------------------------------------------------------------------------
# Parameters, merge, save / load
# ----------------------------------------------------------------------------------------------------


def _groups(model: Llama) -> Dict[str, Dict[str, nn.Parameter]]:
    _require(model)
    groups: Dict[str, Dict[str, nn.Parameter]] = {k: {} for k in ("llm_adapters", "vision_adapters",
                                                                  "visual_projection", "modality_embedding")}
    adapters = [name + "." for name, m in model.named_modules() if isinstance(m, MoMAdapter)]
    for name, p in model.named_parameters():
        if name.startswith("modality_embedding."):
            groups["modality_embedding"][name] = p
        elif name.startswith("visual_projection."):
            groups["visual_projection"][name] = p
        elif any(name.startswith(a) for a in adapters):
            groups["vision_adapters" if name.startswith("lavin_vision.") else "llm_adapters"][name] = p
    return groups


def adapter_parameters(model: Llama) -> Dict[str, nn.Parameter]:
    """Every LaVIN parameter by its model-relative name (adapters with routers, projection, embedding)."""
    out: Dict[str, nn.Parameter] = {}
    for group in _groups(model).values():
        out.update(group)
    return out


def count_parameters(model: Llama) -> Dict[str, int]:
    """LaVIN's parameter counts per part and in total (LLaMA-7B + CLIP-L/14: 3,781,296)."""
    counts = {name: sum(p.numel() for p in group.values()) for name, group in _groups(model).items()}
    counts["total"] = sum(counts.values())
    return counts


@torch.no_grad()
def merge(model: Llama, modality: int) -> Llama:
    """For inference on one modality (0 text-only, 1 with image): fold each LLM layer's adapter, with the
    routing weights of that modality (from the routing pass), into its q/k/v projections (which gain a bias),
    unwrap the attention, and freeze the model. Afterwards model(inputs_embeds=[visual tokens, text]) runs the
    base kernels and equals forward(model, ..., modality=modality). The CLIP adapters stay (their routing
    depends on each image); the visual projection and the modality embedding stay too."""
    _require(model)
    _checks.one_of("modality", modality, (TEXT, IMAGE))
    if "lavin" in getattr(model, "merged_adapters", ()):
        raise ValueError("model: LaVIN is already merged")
    device = model.modality_embedding.weight.device
    weights = route(model, torch.tensor([modality], device=device))
    for block in model.layers:
        wrapper = block.self_attn
        attn = wrapper.attn
        q, k, v = wrapper.adapter.merge_into([attn.q_proj, attn.k_proj, attn.v_proj], weights[block.layer][0])
        attn.q_proj, attn.k_proj, attn.v_proj = q, k, v
        block.self_attn = attn
    model.requires_grad_(False)
    model.merged_adapters = getattr(model, "merged_adapters", set()) | {"lavin"}
    model.lavin_merged_modality = modality
    return model


def save_adapter(model: Llama, path: str) -> None:
    """Write the LaVIN parameters alone (adapter_model.safetensors + adapter_config.json, atomically)."""
    cfg = _require(model)
    _adapter_io.save(model, path, "lavin", cfg.to_dict(), adapter_parameters(model))


def load_adapter(model: Llama, path: str, vision: Optional[nn.Module] = None) -> Llama:
    """Apply the saved config to a base model (with the same `vision` model as when saved) or check that the
    applied one matches, then load every LaVIN parameter strictly by name and shape."""
    return _adapter_io.load(model, path, "lavin", LaVINConfig, "lavin_config",
                            lambda m, c: apply(m, c, vision), adapter_parameters)
