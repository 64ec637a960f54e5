"""The tiny multimodal model the serving and mixed-batch tests share."""

import torch

from mmkernels.train import method_specs, trainer


def random_adapter_model(method):
    """The tiny LLaMA + tiny CLIP with `method` applied and every adapter parameter random (zero-init ones
    included), so that every part of the method shows in the tokens, logits and gradients.
    Returns (model in train mode, vision tower, MethodSpec)."""
    cpu = torch.device("cpu")
    model, _ = trainer.build_model(None, None, 0, cpu, torch.float32)
    vision = trainer.build_vision("tiny", 0, cpu, torch.float32)
    spec = method_specs.get(method)
    spec.apply(model, {}, vision)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in spec.trainable(model).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, vision, spec
