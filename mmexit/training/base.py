"""The interface of a training loss over a multi-exit model.

A loss is called once per optimisation step with the model and a batch, and returns the scalar
loss and a dict of floats to log. It runs the model itself, always through ``model(...)`` (never
``model.forward_exits``: under DDP the model is wrapped and only ``forward`` syncs gradients), so
a loss may choose how the forward pass is done (SWEET detaches between exits, COSEE simulates exits). ``progress`` is
step / total_steps in [0, 1] (COSEE's beta schedule uses it); ``start_epoch`` lets a loss keep
statistics from one epoch to the next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class ExitLoss:
    """Base class of exit losses. Subclasses implement ``__call__``."""

    #: exits whose heads this loss trains: "all", "internal" (two-stage, stage 2) or "final"
    trains: str = "all"

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch (0-based)."""

    def __call__(self, model, batch: dict[str, Tensor], progress: float) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's keyword arguments in a batch: everything but the labels (text: input_ids,
    attention_mask, token_type_ids; captioning: images, input_ids)."""
    return {key: value for key, value in batch.items() if key != "labels"}


def flatten_tokens(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Token-level targets as samples: logits [M, B, T, V] and labels [B, T] (-100 = padding)
    become [M, N, V] and [N] over the N real tokens; sample-level inputs pass unchanged."""
    if labels.ndim < 2:
        return logits, labels
    mask = labels != -100
    return logits[:, mask], labels[mask]


def restrict_classes(logits: Tensor, labels: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [..., N, V] and labels [N] (real tokens, no -100) over ``classes`` only (sorted ids [C],
    e.g. a captioner's ``head_ids``): logits [..., N, C] and each label's position in ``classes``.
    Label smoothing then spreads over the tokens the heads can emit, not over a floor of -1e9."""
    classes = classes.to(labels.device)
    index = torch.searchsorted(classes, labels).clamp_max(classes.numel() - 1)
    if not bool((classes[index] == labels).all()):
        missing = sorted(set(labels[classes[index] != labels].tolist()))[:5]
        raise ValueError(f"target tokens {missing} are not among the heads' tokens (model.head_vocabulary)")
    return logits.index_select(-1, classes.to(logits.device)), index


def per_sample_task_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy (classification; optionally label-smoothed) or squared error (regression, one
    output), per sample.

    logits: [..., batch, labels]; labels: [batch]. Returns [..., batch].
    """
    if logits.shape[-1] == 1:
        return (logits[..., 0].float() - labels.float()) ** 2
    flat = logits.reshape(-1, logits.shape[-1]).float()
    repeated = labels.expand(*logits.shape[:-1]).reshape(-1)
    return F.cross_entropy(flat, repeated, reduction="none",
                           label_smoothing=label_smoothing).reshape(logits.shape[:-1])


def depth_weights(num_exits: int, device: torch.device, scheme: str = "depth") -> Tensor:
    """PABEE's weights i / sum(i) over exits 1..M ("depth"), or uniform ("uniform"). [num_exits]."""
    if scheme == "uniform":
        weights = torch.ones(num_exits, device=device)
    else:
        weights = torch.arange(1, num_exits + 1, device=device, dtype=torch.float)
    return weights / weights.sum()
