"""BEEM calibration: expert weights (BEEM-A: per-exit calibration accuracy) and thresholds alpha_i.

``fit`` reads the calibration split's exit statistics (``ExitStatistics``), computes each exit's confidence,
prediction and correctness (with the rule's temperatures when set), and hands them to the rule,
which derives its weights and, for any operating point (error-rate slack), its per-exit alphas
with ``mmexit.exits.beem.select_thresholds``: exit by exit from the first, the error rate among
the samples stopping at exit t may not exceed the final exit's error rate (+ slack).
"""

from __future__ import annotations

from mmexit.calibration.statistics import ExitStatistics
from mmexit.errors import CalibrationError


class BEEMCalibration:
    """Calibration component for ``BEEMRule`` (recipe: ``calibration: {name: beem}``)."""

    def fit(self, rule, stats: ExitStatistics) -> None:
        """Weights and thresholds from the calibration split's per-exit statistics."""
        if not hasattr(rule, "set_statistics"):
            raise CalibrationError(f"calibration beem: rule '{getattr(rule, 'name', rule)}' is not a BEEM rule")
        stats.require_classes("beem")
        confidence, prediction, correct = stats.per_exit(getattr(rule, "temperatures", None))
        rule.set_statistics(confidence.float().cpu(), prediction.long().cpu(), correct.bool().cpu(), list(stats.exit_layers))
