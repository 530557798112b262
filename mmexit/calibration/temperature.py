"""Per-exit temperature scaling (fitted by NLL on the calibration split), and exit statistics.

``fit_temperatures`` fits one temperature T_i per exit so that ``softmax(z_i / T_i)`` minimises
the negative log-likelihood of the calibration labels. It must only ever see the calibration
split (SWEET's official code fits it on the evaluation set; mmexit does not).

``exit_statistics`` turns all-exit logits into the per-exit confidence, prediction and
correctness that the BEEM and PCEE calibrations read. It works exit by exit and in chunks of
rows, so vocabulary-sized logits (captioning: C ~ 10^4, N ~ 10^5 tokens) never need a softmax
over the whole tensor at once. Callers that never hold all logits (a caption decoder producing
them token by token) hand the same three tensors over in ``ExitStatistics``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mmexit.errors import CalibrationError

#: rows per chunk when scanning [N, C] logits (bounds the temporary softmax memory)
CHUNK_ROWS = 8192


def _nll(logits: Tensor, labels: Tensor, temperature: float) -> float:
    """Mean NLL of ``labels`` under softmax(logits / T); logits [N, C], chunked over rows."""
    total = 0.0
    for start in range(0, logits.shape[0], CHUNK_ROWS):
        chunk = logits[start:start + CHUNK_ROWS].float() / temperature
        total += float(F.cross_entropy(chunk, labels[start:start + CHUNK_ROWS], reduction="sum"))
    return total / max(logits.shape[0], 1)


def fit_temperature(logits: Tensor, labels: Tensor, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """One temperature for logits [N, C] by bounded 1-D minimisation of the NLL over log T.

    Regression heads (C == 1) and empty inputs get 1.0.
    """
    if logits.shape[-1] < 2 or logits.shape[0] == 0:
        return 1.0
    from scipy.optimize import minimize_scalar

    labels = labels.long()
    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(bounds[0]), math.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-4},
    )
    temperature = math.exp(float(result.x))
    # never return something worse than no scaling at all
    if _nll(logits, labels, temperature) > _nll(logits, labels, 1.0):
        return 1.0
    return temperature


def fit_temperatures(logits: Tensor, labels: Tensor) -> list[float]:
    """Per-exit temperatures T_i, each fitted by NLL; logits [M, N, C], labels [N] (calibration split)."""
    return [fit_temperature(logits[index], labels) for index in range(logits.shape[0])]


class TemperatureCalibration:
    """Calibration component: set ``rule.temperatures`` from the calibration split (per exit, NLL).

    For rules with a ``temperatures`` attribute (max-prob, entropy, energy, BEEM, PCEE). The
    recipe key ``calibration.temperature: true`` does the same for every rule of a run; this
    component does it for one rule only.
    """

    def fit(self, rule, stats) -> None:
        """stats: ``mmexit.calibration.statistics.ExitStatistics`` of the calibration split."""
        if not hasattr(rule, "temperatures"):
            raise CalibrationError(f"calibration 'temperature': rule '{rule.name}' has no per-exit temperatures")
        rule.temperatures = fit_temperatures(stats.require_logits("temperature"), stats.labels)


def scale(logits: Tensor, exit_index: int, temperatures: Optional[Sequence[float]]) -> Tensor:
    """logits / T_exit as float32 (unchanged when ``temperatures`` is None)."""
    logits = logits.float()
    if temperatures is not None:
        logits = logits / float(temperatures[exit_index])
    return logits


@torch.no_grad()
def exit_statistics(
    logits: Tensor, labels: Tensor, temperatures: Optional[Sequence[float]] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-exit confidence c_i, prediction yhat_i and correctness for every calibration row.

    logits: [M, N, C] (classification, C >= 2); labels: [N].
    Returns confidence [M, N] float32, prediction [M, N] long, correct [M, N] bool.
    """
    num_exits, rows = logits.shape[0], logits.shape[1]
    confidence = torch.empty(num_exits, rows, dtype=torch.float32)
    prediction = torch.empty(num_exits, rows, dtype=torch.long)
    for index in range(num_exits):
        for start in range(0, rows, CHUNK_ROWS):
            chunk = scale(logits[index, start:start + CHUNK_ROWS], index, temperatures)
            prob, pred = chunk.softmax(-1).max(-1)
            confidence[index, start:start + CHUNK_ROWS] = prob.cpu()
            prediction[index, start:start + CHUNK_ROWS] = pred.cpu()
    correct = prediction == labels.cpu().long().unsqueeze(0)
    return confidence, prediction, correct
