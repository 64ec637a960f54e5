"""Held-out multiple-choice accuracy: the option letter with the largest logit after the prompt."""

from __future__ import annotations

from typing import Dict, Sequence

import torch


@torch.no_grad()
def choice_accuracy(run, items: Sequence, batch_size: int = 32) -> Dict[str, float]:
    """{"all", "image", "text" (each present only when the set has such items), "chance"} accuracies of the
    items (train/data.py MultipleChoice) for a trainer Run. Prompts are right-padded: causal attention keeps
    the padding out of every real position, so the logits after each prompt are those of the prompt alone."""
    from mmkernels.train.data import Sample, choice_predictions, collate
    from mmkernels.train.trainer import batch_to, pad_id

    model = run.model
    was_training = model.training
    model.eval()
    correct = {"image": [], "text": []}
    try:
        for start in range(0, len(items), batch_size):
            chunk = list(items[start:start + batch_size])
            samples = [Sample(list(it.prompt_ids), list(it.prompt_ids), it.image, it.source) for it in chunk]
            batch = collate(samples, pad_id(run.tokenizer, model))
            batch = batch_to(batch, run.device)
            last = torch.tensor([len(it.prompt_ids) - 1 for it in chunk], device=run.device)
            logits = run.module(batch, last=last)
            pred = choice_predictions(logits.float().cpu(), chunk)
            for it, p in zip(chunk, pred.tolist()):
                correct["image" if it.image is not None else "text"].append(p == it.answer)
    finally:
        model.train(was_training)
    everything = correct["image"] + correct["text"]
    out: Dict[str, float] = {"all": sum(everything) / len(everything)}
    for kind in ("image", "text"):
        if correct[kind]:
            out[kind] = sum(correct[kind]) / len(correct[kind])
    out["chance"] = sum(1 / len(it.choice_ids) for it in items) / len(items)
    return out
