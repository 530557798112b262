"""COSEE (Consistency-Oriented Signal-based Early Exiting): train exits where they will be used.

Per step (defaults from the official scripts: K=5, eps=0.3, alpha=0.1, beta_0=10):
1. sample K thresholds uniformly in [min, max] of the internal exits' signals seen during the
   previous epoch (first epoch: [0, 1]);
2. for each threshold tau, simulate every sample's exit m*_n: the first internal exit whose
   signal S < tau, else the last exit;
3. weight each exit's loss per sample with w_n^(m) = softmax_m(-beta_t |m - m*_n|),
   beta_t = beta_0 * progress (progress = step / total steps; uniform weights at the start);
4. L_CE = mean over thresholds of (1/N) sum_n sum_m w_n^(m) CE_n^(m);
5. online signal calibration: for each internal exit, L_OSC^(m) = max(0, mean(S | correct) -
   mean(S | wrong) + eps) (correct samples should have a lower energy than wrong ones), averaged
   over the internal exits that have both a correct and a wrong sample in the batch (others are
   skipped, as in the official code);
6. L = L_CE + alpha L_OSC.

The signal is the normalised energy E_norm = sigmoid(-logsumexp(z)) of ``mmexit.exits.energy``
(lower = more confident); thresholds and exits m*_n use it detached, the OSC term keeps its
gradient. Use ``rule: energy`` at inference. Regression heads (one output) have no energy signal
or notion of a correct prediction: the loss refuses them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmexit.errors import RecipeError
from mmexit.exits.energy import normalized_energy
from mmexit.training.base import ExitLoss, model_inputs, per_sample_task_loss


def simulated_exit(signals: Tensor, thresholds: Tensor) -> Tensor:
    """m*_n per threshold: first internal exit with signal < tau, else the last exit.

    signals: [M, N] (detached); thresholds: [K]. Returns [K, N] long (0-based exit indices).
    """
    internal = signals[:-1]  # [M-1, N]
    fires = internal.unsqueeze(0) < thresholds.view(-1, 1, 1)  # [K, M-1, N]
    fires = torch.cat([fires, torch.ones_like(fires[:, :1])], dim=1)  # the last exit always fires
    return fires.float().argmax(1)  # first True along exits; [K, N]
    # (argmax of a 0/1 tensor returns the first maximal index)


def sample_weights(exit_star: Tensor, num_exits: int, beta: float) -> Tensor:
    """w_n^(m) = softmax_m(-beta |m - m*_n|): exit_star [K, N] -> [K, N, M]."""
    positions = torch.arange(num_exits, device=exit_star.device, dtype=torch.float32)
    distance = (positions.view(1, 1, -1) - exit_star.unsqueeze(-1).float()).abs()
    return torch.softmax(-beta * distance, dim=-1)


def signal_calibration_loss(signals: Tensor, correct: Tensor, eps: float) -> tuple[Tensor, int]:
    """Mean over internal exits of max(0, mean(S correct) - mean(S wrong) + eps).

    signals: [M, N] (with gradient); correct: [M, N] bool. Exits lacking a correct or a wrong
    sample are skipped. Returns the loss and how many exits contributed.
    """
    terms = []
    for index in range(signals.shape[0] - 1):
        right, wrong = correct[index], ~correct[index]
        if not bool(right.any()) or not bool(wrong.any()):
            continue
        gap = signals[index][right].mean() - signals[index][wrong].mean() + eps
        terms.append(torch.clamp(gap, min=0.0))
    if not terms:
        return signals.sum() * 0.0, 0
    return torch.stack(terms).mean(), len(terms)


class COSEELoss(ExitLoss):
    """COSEE's sample-weighted CE plus online signal calibration (see module doc)."""

    def __init__(self, num_thresholds: int = 5, eps: float = 0.3, alpha: float = 0.1, beta0: float = 10.0) -> None:
        if num_thresholds < 1:
            raise RecipeError(f"train.loss.num_thresholds: must be >= 1, got {num_thresholds}")
        self.num_thresholds = int(num_thresholds)
        self.eps = float(eps)
        self.alpha = float(alpha)
        self.beta0 = float(beta0)
        self.signal_range = (0.0, 1.0)  # where thresholds are sampled this epoch
        self._seen: list[float] | None = None  # [min, max] of the internal signals this epoch
        self.generator: torch.Generator | None = None

    def start_epoch(self, epoch: int) -> None:
        """Thresholds of this epoch come from the signals seen in the previous one."""
        if self._seen is not None and self._seen[1] > self._seen[0]:
            self.signal_range = (self._seen[0], self._seen[1])
        elif epoch == 0:
            self.signal_range = (0.0, 1.0)
        self._seen = None

    def sample_thresholds(self, device: torch.device) -> Tensor:
        low, high = self.signal_range
        draws = torch.rand(self.num_thresholds, generator=self.generator)
        return (low + (high - low) * draws).to(device)

    def __call__(self, model, batch: dict[str, Tensor], progress: float) -> tuple[Tensor, dict[str, float]]:
        logits = model(**model_inputs(batch))  # [M, N, C]
        if logits.shape[-1] < 2:
            raise RecipeError("train.loss cosee: needs class logits; regression tasks (one output) have no energy signal")
        labels = batch["labels"]
        num_exits = logits.shape[0]
        signals = normalized_energy(logits)  # [M, N], with gradient
        detached = signals.detach()
        if num_exits > 1:
            internal = detached[:-1]
            low, high = float(internal.min()), float(internal.max())
            self._seen = [low, high] if self._seen is None else [min(self._seen[0], low), max(self._seen[1], high)]

        task = per_sample_task_loss(logits, labels)  # [M, N]
        thresholds = self.sample_thresholds(logits.device)  # [K]
        exit_star = simulated_exit(detached, thresholds)  # [K, N]
        beta = self.beta0 * float(progress)
        weights = sample_weights(exit_star, num_exits, beta)  # [K, N, M]
        loss_ce = (weights * task.t().unsqueeze(0)).sum(-1).mean(-1).mean()

        correct = logits.detach().argmax(-1) == labels.unsqueeze(0)  # [M, N]
        loss_osc, used = signal_calibration_loss(signals, correct, self.eps)
        loss = loss_ce + self.alpha * loss_osc
        logs = {
            "loss_ce": float(loss_ce.detach()),
            "loss_osc": float(loss_osc.detach()),
            "osc_exits": float(used),
            "beta": beta,
            "mean_simulated_exit": float(exit_star.float().mean()) + 1,
        }
        return loss, logs
