"""Llama.forward's training inputs: inputs_embeds, hidden_only and gradient checkpointing."""

import pytest
import torch

from mmkernels.models import Llama, LlamaConfig


def _model(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.tiny()).float()


def test_inputs_embeds_equals_input_ids():
    model = _model()
    ids = torch.randint(0, 256, (2, 9))
    ref = model(ids)
    out = model(inputs_embeds=model.embed_tokens(ids))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_hidden_only_is_the_input_of_lm_head():
    model = _model()
    ids = torch.randint(0, 256, (2, 7))
    hidden = model(ids, hidden_only=True)
    assert hidden.shape == (2, 7, model.config.hidden_size)
    torch.testing.assert_close(model.lm_head(hidden).float(), model(ids), rtol=0, atol=0)


def test_exactly_one_of_input_ids_and_inputs_embeds():
    model = _model()
    ids = torch.randint(0, 256, (1, 3))
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match=r"inputs_embeds: expected shape \(B, T, 128\)"):
        model(inputs_embeds=torch.zeros(1, 3, 64))


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 256, (2, 11))
    grads = []
    for recompute in (False, True):
        model = _model()
        model.gradient_checkpointing = recompute
        model(ids).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_gradient_checkpointing_saves_fewer_activations():
    """With recomputation only each block's inputs stay saved for the backward."""
    ids = torch.randint(0, 256, (2, 11))
    saved = []
    for recompute in (False, True):
        model = _model()
        model.gradient_checkpointing = recompute
        count = [0]

        def pack(t):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids).logsumexp(-1).sum()
        loss.backward()
        saved.append(count[0])
    assert saved[1] < 0.7 * saved[0], saved
