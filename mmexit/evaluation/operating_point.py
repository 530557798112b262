"""The one operating-point chooser: per rule, the fastest point that keeps the metric on the
calibration split within ``tolerance`` (a relative drop, in %) of the full model's there.

Points are never chosen on the evaluation split. When no point is within tolerance, the most
accurate one is used and the choice says so (``note``, copied into the row's warning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class Candidate:
    """One operating point measured on the calibration split (simulated or decoded)."""

    point: float
    metric: float
    layer_speedup: float


@dataclass
class Choice:
    point: float
    calib_metric: float
    calib_full_metric: float
    calib_layer_speedup: float
    note: Optional[str]

    def as_extra(self, split: str) -> dict:
        """The row keys that record the choice."""
        return {"selected_on": split, "calib_metric": self.calib_metric, "calib_full_metric": self.calib_full_metric,
                "calib_layer_speedup": self.calib_layer_speedup, "note": self.note}


def within_tolerance(metric: float, full_metric: float, tolerance_percent: float) -> bool:
    """metric >= (1 - tolerance/100) * full_metric (for metrics where higher is better)."""
    return metric >= full_metric * (1 - tolerance_percent / 100) - 1e-9


def choose_operating_point(candidates: list[Candidate], full_metric: float, tolerance_percent: float) -> Choice:
    """The fastest candidate within tolerance; ties broken by the metric; else the most accurate."""
    if not candidates:
        raise ValueError("choose_operating_point: no candidates")
    within = [c for c in candidates if within_tolerance(c.metric, full_metric, tolerance_percent)]
    note = None
    if within:
        best = max(within, key=lambda c: (c.layer_speedup, c.metric))
    else:
        best = max(candidates, key=lambda c: (c.metric, c.layer_speedup))
        note = (f"no operating point within {tolerance_percent:g}% of the full model's calibration metric "
                f"({full_metric:.4g}); the most accurate one is used")
    return Choice(best.point, best.metric, full_metric, best.layer_speedup, note)
