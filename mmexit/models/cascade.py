"""SWEET's Multi-Model (MM) baseline: a batched cascade of independently fine-tuned truncated models.

Model k is a MultiExitEncoder truncated to its own depth d_k (d_1 < d_2 < ...), fine-tuned alone;
its last exit is its output. At inference model 1 runs on every row from the embeddings; a rule
decides on its output (as if it were exit 0 of a multi-exit model); the rows that do not stop run
model 2, again from the embeddings (the models share no computation), and so on; the last model
stops every row still running. A row that stops at model k is charged the cumulative depth
d_1 + ... + d_k layers, so the MM baseline can cost more than the deepest model alone (layer
speed-up < 1 when many rows go deep).

This file is the model (its members, their cost, every member's output); running it under a rule
is ``inference.cascade``, evaluating it is ``tasks.cascade_evaluation`` (``mmexit cascade``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from mmexit.models.encoder import MultiExitEncoder


def model_depths(models: Sequence[MultiExitEncoder]) -> list[int]:
    """Each model's depth (layers up to its last exit)."""
    return [model.exit_layers[-1] for model in models]


def cumulative_layers(models: Sequence[MultiExitEncoder]) -> list[int]:
    """Layers charged to a row that stops at model k: d_1 + ... + d_k."""
    total, out = 0, []
    for depth in model_depths(models):
        total += depth
        out.append(total)
    return out


def member_output(model: MultiExitEncoder, input_ids: Tensor, attention_mask: Tensor,
               token_type_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One model's output logits [rows, labels] and pooled state [rows, hidden] (its last exit)."""
    hidden, context = model.embed(input_ids, attention_mask, token_type_ids)
    for layer in range(model.exit_layers[-1]):
        hidden = model.run_layer(layer, hidden, context)
    last = model.num_exits - 1
    pooled = model.exit_pooled(last, hidden, context)
    return model.heads[last].classify(pooled), pooled


@torch.inference_mode()
def cascade_all_logits(
    models: Sequence[MultiExitEncoder],
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Optional[Tensor] = None,
) -> Tensor:
    """Every model's output on every row: [num_models, batch, labels] (for calibration and sweeps)."""
    return torch.stack([member_output(m, input_ids, attention_mask, token_type_ids)[0] for m in models])


class MultiModelCascade:
    """The MM baseline's models in order of depth, loaded from trained mmexit output folders."""

    def __init__(self, models: Sequence[MultiExitEncoder]) -> None:
        self.models = sorted(models, key=lambda model: model.exit_layers[-1])

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path]) -> "MultiModelCascade":
        return cls([MultiExitEncoder.from_pretrained(folder).eval() for folder in folders])

    @property
    def cumulative_layers(self) -> list[int]:
        return cumulative_layers(self.models)

    @property
    def depth(self) -> int:
        """The deepest model's depth: the L of the layer speed-up (L * N / sum of layers charged)."""
        return self.models[-1].exit_layers[-1]

    def all_logits(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        return cascade_all_logits(self.models, input_ids, attention_mask, token_type_ids)
