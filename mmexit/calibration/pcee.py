"""PCEE calibration: per-exit reliability tables (confidence bins -> calibration accuracy).

``fit`` reads the split's ``ExitStatistics``: each exit's confidence c_i (with the rule's temperatures when set) and whether
its prediction is right on the calibration split, then the rule bins them (see
``mmexit.exits.pcee`` for the bin count, equal-mass vs equal-width and the sparse-bin guard).
The table does not depend on delta, so after ``fit`` every ``rule.with_threshold(delta)`` works.
"""

from __future__ import annotations

from mmexit.calibration.statistics import ExitStatistics
from mmexit.errors import CalibrationError


class PCEECalibration:
    """Calibration component for ``PCEERule`` (recipe: ``calibration: {name: pcee}``)."""

    def fit(self, rule, stats: ExitStatistics) -> None:
        """Reliability tables from the calibration split's exit statistics (with the rule's temperatures)."""
        if not hasattr(rule, "set_statistics") or not hasattr(rule, "edges"):
            raise CalibrationError(f"calibration pcee: rule '{getattr(rule, 'name', rule)}' is not a PCEE rule")
        if stats.num_classes < 2:
            raise CalibrationError("calibration pcee: PCEE needs class (or token) logits; regression heads are not supported")
        if stats.num_samples == 0:
            raise CalibrationError("calibration pcee: the calibration split is empty")
        confidence, _, correct = stats.per_exit(getattr(rule, "temperatures", None))
        rule.set_statistics(confidence.float().cpu(), correct.bool().cpu(), int(stats.num_classes))
