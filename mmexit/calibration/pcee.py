"""PCEE calibration: per-exit reliability tables (confidence bins -> calibration accuracy).

``fit`` computes each exit's confidence c_i (with the rule's temperatures when set) and whether
its prediction is right on the calibration split, then the rule bins them (see
``mmexit.exits.pcee`` for the bin count, equal-mass vs equal-width and the sparse-bin guard).
The table does not depend on delta, so after ``fit`` every ``rule.with_threshold(delta)`` works.
"""

from __future__ import annotations

from torch import Tensor

from mmexit.calibration.temperature import exit_statistics
from mmexit.errors import CalibrationError


class PCEECalibration:
    """Calibration component for ``PCEERule`` (recipe: ``calibration: {name: pcee}``)."""

    def fit(self, rule, logits: Tensor, labels: Tensor, exit_layers: list[int]) -> None:
        """logits [M, N, C] of the calibration split, labels [N], exit layer numbers (1-based)."""
        if logits.shape[-1] < 2:
            raise CalibrationError("calibration pcee: PCEE needs class (or token) logits; regression heads are not supported")
        if logits.shape[1] == 0:
            raise CalibrationError("calibration pcee: the calibration split is empty")
        confidence, _, correct = exit_statistics(logits, labels, getattr(rule, "temperatures", None))
        self.fit_statistics(rule, confidence, correct, logits.shape[-1])

    def fit_statistics(self, rule, confidence: Tensor, correct: Tensor, num_classes: int) -> None:
        """The same from precomputed confidence/correct [M, N], for callers that never hold all logits."""
        if not hasattr(rule, "set_statistics") or not hasattr(rule, "edges"):
            raise CalibrationError(f"calibration pcee: rule '{getattr(rule, 'name', rule)}' is not a PCEE rule")
        rule.set_statistics(confidence.float().cpu(), correct.bool().cpu(), int(num_classes))
