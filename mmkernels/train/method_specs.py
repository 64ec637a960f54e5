"""How the trainer drives each method of mmkernels.methods: one MethodSpec per method name.

A spec applies the method from a plain options dict (a config file's [method_options] table), names the
trainable parameters, turns a data batch into the model's forward inputs (images through the vision tower
for the multimodal methods), and saves/loads/merges the adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from mmkernels.models import Llama


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    apply: Callable[[Llama, Dict[str, Any], Optional[nn.Module]], None]
    trainable: Callable[[Llama], Dict[str, nn.Parameter]]
    save: Callable[[Llama, str], None]
    load: Callable[[Llama, str], Llama]
    merge: Optional[Callable[[Llama], Llama]]
    inputs: Callable[[Llama, Optional[nn.Module], Any], Dict[str, Any]]
    multimodal: bool = False
    attach: Optional[Callable[[torch.optim.Optimizer, Llama], Any]] = None  # e.g. PaCA's column sync


def _text_inputs(name: str):
    def inputs(model: Llama, vision, batch) -> Dict[str, Any]:
        if getattr(batch, "images", None) is not None:
            raise ValueError(f"method {name!r} is text-only, but the batch has images; use a multimodal method "
                             "(llama_adapter with a vision tower, lavin, hyperllava) or text data")
        return {"input_ids": batch.input_ids}

    return inputs


def _llama_adapter() -> MethodSpec:
    from mmkernels.methods import llama_adapter as m

    def apply(model, options, vision):
        options = dict(options)
        if vision is not None:
            options.setdefault("version", 2)
            options.setdefault("vision_dim", vision.hidden_size)
        m.apply(model, m.LlamaAdapterConfig.from_dict(options))

    def inputs(model, vision, batch):
        out: Dict[str, Any] = {"input_ids": batch.input_ids}
        images = getattr(batch, "images", None)
        if images is None:
            return out
        if vision is None or getattr(model, "visual_projection", None) is None:
            raise ValueError("the batch has images but the model has no vision path: set `vision` (a CLIP directory "
                             "or 'tiny') so LLaMA-Adapter V2 gets a visual projection")
        prompts = m.encode_images(model, vision, images)
        # Text-only samples of a mixed batch get no visual prompt (their adaption prompts stay static).
        out["visual_prompts"] = prompts * batch.has_image.to(prompts.dtype)[:, None, None]
        return out

    return MethodSpec("llama_adapter", apply, m.adapter_parameters, m.save_adapter, m.load_adapter, m.merge, inputs,
                      multimodal=True)


def _lora() -> MethodSpec:
    from mmkernels.methods import lora as m

    return MethodSpec("lora", lambda model, o, v: m.apply(model, m.LoRAConfig.from_dict(o)), m.adapter_parameters,
                      m.save_adapter, m.load_adapter, m.merge, _text_inputs("lora"))


def _paca() -> MethodSpec:
    from mmkernels.methods import paca as m

    return MethodSpec("paca", lambda model, o, v: m.apply(model, m.PaCAConfig.from_dict(o)), m.adapter_parameters,
                      m.save_adapter, m.load_adapter, m.merge, _text_inputs("paca"), attach=m.sync_after_step)


_BUILDERS: Dict[str, Callable[[], MethodSpec]] = {
    "llama_adapter": _llama_adapter,
    "lora": _lora,
    "paca": _paca,
}


def get(name: str) -> MethodSpec:
    if name not in _BUILDERS:
        raise ValueError(f"method: expected one of {sorted(_BUILDERS)} (the methods the trainer drives), got {name!r}")
    return _BUILDERS[name]()
