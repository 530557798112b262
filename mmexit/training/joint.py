"""Joint weighted training of all exits (PABEE/BEEM), with optional distillation to the last exit."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmexit.errors import RecipeError
from mmexit.training.base import (ExitLoss, depth_weights, flatten_tokens, model_inputs, per_sample_task_loss,
                                  restrict_classes)


class JointLoss(ExitLoss):
    """sum_i w_i * CE_i with w_i = i / sum(i) ("depth", PABEE), uniform weights, or a list of M
    weights (normalised to sum 1). Token-level targets (captioning) count every real token.

    distill_weight > 0 adds  distill_weight * mean_i<M KL(p_final || p_i)  at ``temperature``
    (BEEM's optional KL-to-final term; the final exit's distribution is detached).
    label_smoothing > 0 smooths every exit's cross-entropy targets (captioning's usual 0.1).
    classes: sorted ids [C] of the only outputs the heads produce (a captioner's ``head_ids``; the
    other logits sit at a floor of -1e9): the loss and the KL term are computed over those alone, so
    smoothing spreads over the tokens a head can emit (over the floor it added ~1e8 to the loss and
    pulled every head toward a flat distribution).
    """

    def __init__(self, weights: str | list = "depth", distill_weight: float = 0.0, temperature: float = 1.0,
                 label_smoothing: float = 0.0, classes: Optional[Tensor] = None) -> None:
        if not isinstance(weights, (list, tuple)) and weights not in ("depth", "uniform"):
            raise RecipeError(f"train.loss.weights: {weights!r} is not allowed; allowed: depth, uniform or a list")
        self.weights = weights
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.label_smoothing = float(label_smoothing)
        self.classes = classes

    def __call__(self, model, batch: dict[str, Tensor], progress: float) -> tuple[Tensor, dict[str, float]]:
        logits, labels = flatten_tokens(model(**model_inputs(batch)), batch["labels"])  # [exits, N, C], [N]
        if self.classes is not None:
            logits, labels = restrict_classes(logits, labels, self.classes)
        per_exit = per_sample_task_loss(logits, labels, self.label_smoothing).mean(-1)  # [exits]
        weights = self._weights(logits.shape[0], logits.device)
        loss = (weights * per_exit).sum()
        logs = {"loss_task": float(loss.detach()), "loss_last_exit": float(per_exit[-1].detach())}
        if self.distill_weight > 0 and logits.shape[-1] > 1 and logits.shape[0] > 1:
            teacher = F.softmax(logits[-1].detach().float() / self.temperature, -1)
            students = F.log_softmax(logits[:-1].float() / self.temperature, -1)
            kl = (teacher * (teacher.clamp_min(1e-12).log() - students)).sum(-1).mean()
            loss = loss + self.distill_weight * kl * self.temperature**2
            logs["loss_distill"] = float(kl.detach())
        return loss, logs

    def _weights(self, num_exits: int, device: torch.device) -> torch.Tensor:
        if isinstance(self.weights, (list, tuple)):
            if len(self.weights) != num_exits:
                raise RecipeError(f"train.loss.weights: {len(self.weights)} weights for {num_exits} exits")
            weights = torch.tensor([float(w) for w in self.weights], device=device)
            return weights / weights.sum()
        return depth_weights(num_exits, device, self.weights)


class FinalOnlyLoss(ExitLoss):
    """The last exit's loss alone: a plain fine-tune (full model, static truncation, two-stage stage 1)."""

    trains = "final"

    def __call__(self, model, batch: dict[str, Tensor], progress: float) -> tuple[Tensor, dict[str, float]]:
        logits, labels = flatten_tokens(model(**model_inputs(batch), final_only=True), batch["labels"])
        loss = per_sample_task_loss(logits[0], labels).mean()
        return loss, {"loss_task": float(loss.detach())}


class InternalExitsLoss(ExitLoss):
    """Two-stage (DeeBERT), stage 2: uniform CE over the internal exits; backbone and last head frozen."""

    trains = "internal"

    def __call__(self, model, batch: dict[str, Tensor], progress: float) -> tuple[Tensor, dict[str, float]]:
        logits, labels = flatten_tokens(model(**model_inputs(batch)), batch["labels"])
        internal = logits[:-1] if logits.shape[0] > 1 else logits
        loss = per_sample_task_loss(internal, labels).mean()
        return loss, {"loss_task": float(loss.detach())}
