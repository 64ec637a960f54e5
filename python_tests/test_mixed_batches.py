"""Mixed batches for the multimodal methods: a text-only sample batched with image samples trains exactly as it
does alone (its placeholder visual positions are hidden from every query and pass no gradient), and an
image sample as it does alone."""

import pytest
import torch

import mmkernels
from _multimodal import random_adapter_model
from mmkernels.train import trainer
from mmkernels.train.data import Batch


def _batch(ids, images, has_image):
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt of 3 tokens
    return Batch(ids, labels, torch.ones_like(ids, dtype=torch.bool), images, has_image)


def _loss_and_grads(loss_module, params, batch):
    for p in params.values():
        p.grad = None
    loss = loss_module(batch)
    loss.backward()
    logits = loss_module(batch, last=torch.full((batch.input_ids.shape[0],), 5))
    return loss.detach(), logits.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("method", ["lavin", "hyperllava"])
def test_text_only_sample_in_a_mixed_batch_trains_as_alone(method, backend):
    with mmkernels.use_backend(backend):
        _check_mixed_batch(method)


def _check_mixed_batch(method):
    model, vision, spec = random_adapter_model(method)
    loss_module = trainer.LossModule(model, spec, vision, fused=False, chunk=None)
    params = spec.trainable(model)
    size = vision.clip.config.image_size
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 256, (2, 9), generator=gen)
    image = torch.randn(1, 3, size, size, generator=gen)
    # Sample 0 has an image; sample 1 is text-only (the collator gives it a zero image).
    mixed = _batch(ids, torch.cat([image, torch.zeros_like(image)]), torch.tensor([True, False]))
    with_image = _batch(ids[:1], image, torch.tensor([True]))
    text_only = _batch(ids[1:], None, torch.tensor([False]))

    loss, logits, grads = _loss_and_grads(loss_module, params, mixed)
    loss_img, logits_img, grads_img = _loss_and_grads(loss_module, params, with_image)
    loss_txt, logits_txt, grads_txt = _loss_and_grads(loss_module, params, text_only)

    torch.testing.assert_close(logits[:1], logits_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1:], logits_txt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_img + loss_txt, rtol=1e-5, atol=1e-5)
    assert set(grads) == set(grads_img)
    for name, grad in grads.items():
        want = grads_img[name] + grads_txt.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()) + 1e-8, msg=name)
    # The text-only sample's gradients are not all zero: the sum above is a real check.
    assert any(float(g.abs().max()) > 0 for g in grads_txt.values())
