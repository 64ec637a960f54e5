"""How the trainer drives each method of mmkernels.methods: one MethodSpec per method name.

A spec applies the method from a plain options dict (a config file's [method_options] table), names the
trainable parameters, turns a data batch into the model's forward inputs (images through the vision tower
for the multimodal methods), gives generation the same inputs for a batch of prompts (`serve`), and
saves/loads/merges the adapter.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Dict, Optional

import torch
from torch import nn

from mmkernels import _checks
from mmkernels.models import Llama


@dataclasses.dataclass
class ModelInputs:
    """What one forward of the model takes for a batch: keyword arguments of Llama.forward (a method that
    gives positions or segment_ids has taken the batch's own into account), the number of positions the
    method prepends before the text (visual tokens; their labels are ignored) and appends after it, and a
    context the forward runs in (e.g. where HyperLLaVA reads its guidance)."""

    kwargs: Dict[str, Any]
    prefix: int = 0
    context: Callable[[], ContextManager] = contextlib.nullcontext
    suffix: int = 0  # positions the method appends after the text (LaVIN's modality token; labels ignored)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    apply: Callable[[Llama, Dict[str, Any], Optional[nn.Module]], None]
    trainable: Callable[[Llama], Dict[str, nn.Parameter]]
    save: Callable[[Llama, str], None]
    load: Callable[[Llama, str, Optional[nn.Module]], Llama]  # (base model, adapter dir, vision tower)
    merge: Optional[Callable[[Llama], Llama]]
    inputs: Callable[[Llama, Optional[nn.Module], Any, torch.Tensor], ModelInputs]  # (.., batch, prompt_end)
    multimodal: bool = False
    attach: Optional[Callable[[torch.optim.Optimizer, Llama], Any]] = None  # e.g. PaCA's column sync
    # (model, AdamW's param groups, AdamW's keyword arguments) -> one optimizer that does AdamW's step and what
    # `attach` adds (PaCA: PaCAAdamW, the step and the column sync in one pass), or None where it does not
    # apply (the trainer then builds AdamW + attach).
    optimizer: Optional[Callable[..., Optional[torch.optim.Optimizer]]] = None
    # Called after the trainable parameters were overwritten in place (a resume): recompute what the forward
    # derives from them (PaCA's W_eff columns).
    after_load: Optional[Callable[[Llama], None]] = None
    # (model, vision, pixel_values (B, 3, H, W) or None, B) -> keyword arguments of models.generation.generate
    # that give each prompt what the training forward gave its sample (visual tokens, prompts, routing).
    serve: Optional[Callable[[Llama, Optional[nn.Module], Optional[torch.Tensor], int], Dict[str, Any]]] = None

    def serve_inputs(self, model: Llama, vision: Optional[nn.Module], pixel_values: Optional[torch.Tensor],
                     batch: int) -> Dict[str, Any]:
        if self.serve is not None:
            return self.serve(model, vision, pixel_values, batch)
        if pixel_values is not None:
            raise ValueError(f"images: method {self.name!r} is text-only")
        return {}


def _without_vision(load: Callable[[Llama, str], Llama]) -> Callable[[Llama, str, Optional[nn.Module]], Llama]:
    """A method whose adapter lives outside the vision tower: the tower is rebuilt frozen, as it was."""
    return lambda model, path, vision: load(model, path)


def _require_vision_path(model: Llama, vision: Optional[nn.Module], part: str, why: str) -> None:
    if vision is None or getattr(model, part, None) is None:
        raise ValueError(f"images: the model has no vision path; set `vision` (a CLIP directory or 'tiny') so {why}")


def _hide_visual_prefix(has_image: torch.Tensor, prefix: int, seq: int) -> Dict[str, Any]:
    """Forward arguments that make the text-only samples of a mixed batch run as they do alone: their `prefix`
    visual positions (placeholders, so the batch stays rectangular) are hidden from every query, as left
    padding is (kv_start), and their text gets the rotary positions 0, 1, ... it has without them. Nothing for
    a batch whose samples all have images, or whose values cannot be read (memory.estimate's trace on the meta
    device, which counts a batch whose samples all have images)."""
    if not _checks.has_values(has_image) or bool(has_image.all()):
        return {}
    kv_start = torch.where(has_image, 0, prefix).to(torch.int32)
    positions = (torch.arange(seq, device=has_image.device)[None, :] - kv_start[:, None].long()).clamp_min(0)
    return {"kv_start": kv_start, "positions": positions}


def _text_inputs(name: str):
    def inputs(model: Llama, vision, batch, prompt_end) -> ModelInputs:
        if batch.images is not None:
            raise ValueError(f"method {name!r} is text-only, but the batch has images; use a multimodal method "
                             "(llama_adapter or hyperllava with a vision tower) or text data")
        return ModelInputs({"input_ids": batch.input_ids})

    return inputs


def _llama_adapter() -> MethodSpec:
    from mmkernels.methods import llama_adapter as m

    def apply(model, options, vision):
        options = dict(options)
        if vision is not None:
            options.setdefault("version", 2)
            options.setdefault("vision_dim", vision.hidden_size)
        m.apply(model, m.LlamaAdapterConfig.from_dict(options))

    def inputs(model, vision, batch, prompt_end):
        out: Dict[str, Any] = {"input_ids": batch.input_ids}
        images = batch.images
        if images is None:
            return ModelInputs(out)
        _require_vision_path(model, vision, "visual_projection", "LLaMA-Adapter V2 gets a visual projection")
        prompts = m.encode_images(model, vision, images)
        # Text-only samples of a mixed batch get no visual prompt (their adaption prompts stay static).
        out["visual_prompts"] = prompts * batch.has_image.to(prompts.dtype)[:, None, None]
        return ModelInputs(out)

    def serve(model, vision, pixels, batch):
        if pixels is None:
            return {}
        _require_vision_path(model, vision, "visual_projection", "LLaMA-Adapter V2 gets a visual projection")
        return {"visual_prompts": m.encode_images(model, vision, pixels)}

    return MethodSpec("llama_adapter", apply, m.adapter_parameters, m.save_adapter, _without_vision(m.load_adapter),
                      m.merge, inputs, multimodal=True, serve=serve)


def _lora() -> MethodSpec:
    from mmkernels.methods import lora as m

    return MethodSpec("lora", lambda model, o, v: m.apply(model, m.LoRAConfig.from_dict(o)), m.adapter_parameters,
                      m.save_adapter, _without_vision(m.load_adapter), m.merge, _text_inputs("lora"))


def _paca() -> MethodSpec:
    from mmkernels.methods import paca as m

    return MethodSpec("paca", lambda model, o, v: m.apply(model, m.PaCAConfig.from_dict(o)), m.adapter_parameters,
                      m.save_adapter, _without_vision(m.load_adapter), m.merge, _text_inputs("paca"),
                      attach=m.sync_after_step, optimizer=m.fused_optimizer, after_load=m.sync)


def _compacter() -> MethodSpec:
    from mmkernels.methods import compacter as m

    return MethodSpec("compacter", lambda model, o, v: m.apply(model, m.CompacterConfig.from_dict(o)),
                      m.adapter_parameters, m.save_adapter, _without_vision(m.load_adapter), None,
                      _text_inputs("compacter"))


def _hyperllava() -> MethodSpec:
    from mmkernels.methods import hyperllava as m

    def apply(model, options, vision):
        options = dict(options)
        if vision is not None:
            options.setdefault("vision_dim", vision.hidden_size)
        options.setdefault("language_layers", max(1, len(model.layers) // 2))
        m.apply(model, m.HyperLLaVAConfig.from_dict(options))

    def inputs(model, vision, batch, prompt_end):
        prefix, kwargs = 0, {"input_ids": batch.input_ids}
        if batch.images is not None:
            _require_vision_path(model, vision, "visual_projector", "HyperLLaVA gets a projector")
            features = vision(batch.images)
            embeds = m.embed_multimodal(model, batch.input_ids, features)
            prefix = features.shape[1]
            # Text-only samples of a mixed batch carry placeholder visual tokens that no query sees.
            kwargs = {"inputs_embeds": embeds, **_hide_visual_prefix(batch.has_image, prefix, embeds.shape[1])}
        # The guidance is the last prompt token, so that no prediction sees the answer through the experts.
        position = prefix + prompt_end
        return ModelInputs(kwargs, prefix, lambda: m.guidance_at(model, position))

    def serve(model, vision, pixels, batch):
        # Left padding puts every prompt's last token at the prefill's last position: the default guidance.
        if pixels is None:
            return {}
        _require_vision_path(model, vision, "visual_projector", "HyperLLaVA gets a projector")
        return {"prefix_embeds": model.visual_projector(vision(pixels))}

    return MethodSpec("hyperllava", apply, m.adapter_parameters, m.save_adapter, _without_vision(m.load_adapter),
                      None, inputs, multimodal=True, serve=serve)


def _lavin() -> MethodSpec:
    from mmkernels.methods import lavin as m

    def apply(model, options, vision):
        options = dict(options)
        if vision is not None:  # LaVIN's [CLS] of every 4th layer; a tower with fewer layers uses each layer
            options.setdefault("visual_layer_stride", min(4, vision.clip.config.num_hidden_layers))
        m.apply(model, m.LaVINConfig.from_dict(options), vision=vision)

    def inputs(model, vision, batch, prompt_end):
        # One pass: each row's modality token is its last position (lavin.append_modality_token), so every block
        # runs once, in its own forward (FSDP2 shards the blocks one by one).
        modality = batch.has_image.long()
        embeds = model.embed_tokens(batch.input_ids)
        prefix, positions, hide = 0, batch.positions, {}
        if batch.images is not None:
            _require_vision_path(model, getattr(model, "lavin_vision", None), "visual_projection",
                                 "LaVIN gets a visual projection")
            visual = m.encode_images(model, batch.images)
            embeds = torch.cat([visual.to(embeds.dtype), embeds], dim=1)
            prefix = visual.shape[1]
            # Text-only samples of a mixed batch (text-only routing) carry placeholder visual tokens no query sees.
            hide = _hide_visual_prefix(batch.has_image, prefix, embeds.shape[1])  # kv_start and positions, or {}
            positions = hide.pop("positions", None)
        kwargs = m.append_modality_token(model, embeds, modality, positions=positions, segment_ids=batch.segment_ids)
        return ModelInputs({**kwargs, **hide}, prefix, lambda: m.routed_by_token(model), suffix=1)

    def serve(model, vision, pixels, batch):  # encode_images refuses images without LaVIN's vision tower
        return m.generation_inputs(model, batch, pixel_values=pixels)

    return MethodSpec("lavin", apply, m.adapter_parameters, m.save_adapter,
                      lambda model, path, vision: m.load_adapter(model, path, vision=vision), None, inputs,
                      multimodal=True, serve=serve)


_BUILDERS: Dict[str, Callable[[], MethodSpec]] = {
    "lavin": _lavin,
    "llama_adapter": _llama_adapter,
    "lora": _lora,
    "paca": _paca,
    "compacter": _compacter,
    "hyperllava": _hyperllava,
}


def get(name: str) -> MethodSpec:
    if name not in _BUILDERS:
        raise ValueError(f"method: expected one of {sorted(_BUILDERS)} (the methods the trainer drives), got {name!r}")
    return _BUILDERS[name]()
