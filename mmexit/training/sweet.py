"""SWEET (Separating Weights in Early Exit Transformers): each exit trains only its own segment.

The backbone runs segment by segment between exits; after exit i's logits are computed, the
hidden state handed to the next segment is detached (``forward_exits(detach_between_exits=True)``).
So exit i's loss updates only the layers between exit i-1 and exit i (exit 1 also the
embeddings) and exit i's own head. The loss is the unweighted sum of the exits' task losses
(cross-entropy; squared error for a one-output regression head).

Every mmexit exit owns its pooler and classifier, so the separation is complete; the official
SWEET code shares BERT's pooler between exits, which lets every exit's loss reach that pooler.
"""

from __future__ import annotations

from torch import Tensor

from mmexit.training.base import ExitLoss, model_inputs, per_sample_task_loss


class SweetLoss(ExitLoss):
    """sum_i CE_i with gradients stopped between exits (see module doc)."""

    def __call__(self, model, batch: dict[str, Tensor], progress: float) -> tuple[Tensor, dict[str, float]]:
        logits = model(**model_inputs(batch), detach_between_exits=True)  # [exits, batch, labels]
        per_exit = per_sample_task_loss(logits, batch["labels"]).mean(-1)  # [exits]
        loss = per_exit.sum()
        detached = per_exit.detach()
        logs = {"loss_task": float(detached.sum()), "loss_first_exit": float(detached[0]), "loss_last_exit": float(detached[-1])}
        return loss, logs
