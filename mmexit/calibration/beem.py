"""BEEM calibration: expert weights (BEEM-A: per-exit calibration accuracy) and thresholds alpha_i.

``fit`` reads every exit's logits on the calibration split, computes each exit's confidence,
prediction and correctness (with the rule's temperatures when set), and hands them to the rule,
which derives its weights and, for any operating point (error-rate slack), its per-exit alphas
with ``mmexit.exits.beem.select_thresholds``: exit by exit from the first, the error rate among
the samples stopping at exit t may not exceed the final exit's error rate (+ slack).
"""

from __future__ import annotations

from torch import Tensor

from mmexit.calibration.temperature import exit_statistics
from mmexit.errors import CalibrationError


class BEEMCalibration:
    """Calibration component for ``BEEMRule`` (recipe: ``calibration: {name: beem}``)."""

    def fit(self, rule, logits: Tensor, labels: Tensor, exit_layers: list[int]) -> None:
        """logits [M, N, C] of the calibration split, labels [N], exit layer numbers (1-based)."""
        if logits.shape[-1] < 2:
            raise CalibrationError("calibration beem: BEEM needs class (or token) logits; regression heads are not supported")
        if logits.shape[1] == 0:
            raise CalibrationError("calibration beem: the calibration split is empty")
        confidence, prediction, correct = exit_statistics(logits, labels, getattr(rule, "temperatures", None))
        self.fit_statistics(rule, confidence, prediction, correct, exit_layers)

    def fit_statistics(self, rule, confidence: Tensor, prediction: Tensor, correct: Tensor, exit_layers: list[int]) -> None:
        """The same from precomputed statistics ([M, N] each), for callers that never hold all logits."""
        if not hasattr(rule, "set_statistics"):
            raise CalibrationError(f"calibration beem: rule '{getattr(rule, 'name', rule)}' is not a BEEM rule")
        rule.set_statistics(confidence.float().cpu(), prediction.long().cpu(), correct.bool().cpu(), list(exit_layers))
