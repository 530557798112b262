"""Teacher-forced loss of every exit on held-out captions: does each layer still help on photos it
never trained on? (A training loss that keeps falling while this one is flat is over-fitting.)"""

from __future__ import annotations

import torch
from torch import Tensor

from mmexit.data.caption_batches import CaptionCollator
from mmexit.training.base import flatten_tokens, model_inputs, per_sample_task_loss


@torch.inference_mode()
def exit_losses(model, features: Tensor, captions: list[list[list[int]]], tokenizer, max_length: int,
                batch_size: int = 256) -> Tensor:
    """Mean token cross-entropy (no label smoothing) of each exit, [exits].

    model: a ``Captioner``; features: its encoder's outputs [images, P, D] (``model.encode`` or the
    feature cache); captions: per image, its reference captions as token ids (no BOS/EOS);
    max_length: caption tokens incl. EOS, as in training (``train.max_length``)."""
    pairs = [(image, ids) for image, references in enumerate(captions) for ids in references]
    collate = CaptionCollator(features, tokenizer, max_length, key="encoded")
    total, tokens = torch.zeros(model.num_exits, dtype=torch.float64), 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate(pairs[start:start + batch_size])
            logits, labels = flatten_tokens(model(**model_inputs(batch)), batch["labels"])  # [exits, N, V], [N]
            total += per_sample_task_loss(logits, labels).double().sum(-1).cpu()
            tokens += labels.numel()
    finally:
        model.train(was_training)
    return (total / max(tokens, 1)).float()
