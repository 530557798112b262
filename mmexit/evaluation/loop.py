"""The one evaluation loop: sweep each rule on the calibration split, choose its operating point
there, measure (and time) the chosen points on the evaluation split.

Every task and the Multi-Model cascade evaluate through ``evaluate_rules``; what differs is an
``Evaluator`` (the task hooks): how the full model is scored, how a rule's operating points are
swept (simulated from precomputed exit outputs for classification, real decoding for captions),
and how the chosen points are measured and timed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from mmexit.evaluation.operating_point import Candidate, Choice, choose_operating_point
from mmexit.exits.base import ExitRule


@dataclass
class Evaluation:
    """What an evaluation returns: result rows (dicts), the chosen operating point of each rule
    (spec index -> threshold), and per-sample prediction lines for ``predictions_<split>.jsonl``."""

    rows: list[dict]
    chosen: dict[int, float]
    predictions: list[dict]


@dataclass
class Sweep:
    """One rule's sweep: rows for the record, and one candidate per operating point measured on the
    calibration split (the chooser's input)."""

    rows: list[dict]
    candidates: list[Candidate]


class Evaluator(Protocol):
    """The task hooks of ``evaluate_rules``."""

    def reference(self) -> tuple[list[dict], float]:
        """The full model: its rows (evaluation split, and any calibration-split rows), and its
        primary metric on the calibration split (what the chooser's tolerance is relative to)."""

    def sweep(self, rule: ExitRule, thresholds: Sequence[float]) -> Sweep:
        """Rows and calibration candidates of ``rule`` at each threshold."""

    def measure(self, points: list[tuple[ExitRule, Choice]]) -> list[dict]:
        """Rows of the chosen points (maybe none), run through the real early-exit path on the
        evaluation split and timed against the full model."""

    def predictions(self) -> list[dict]:
        """Per-sample prediction lines (filled by ``reference`` and ``measure``)."""


def sweep_thresholds(spec: dict, rule: ExitRule) -> list[float]:
    """The recipe's ``sweep`` for a rule, or the rule's default grid."""
    return list(spec.get("sweep") or rule.default_sweep())


def evaluate_rules(evaluator: Evaluator, rules: list[tuple[dict, ExitRule]], tolerance: float) -> Evaluation:
    """Full model, then per rule: sweep, choose on the calibration split (fastest point within
    ``tolerance`` % of the full model), and measure every chosen point on the evaluation split."""
    rows, calib_full = evaluator.reference()
    chosen: dict[int, float] = {}
    points: list[tuple[ExitRule, Choice]] = []
    for index, (spec, rule) in enumerate(rules):
        swept = evaluator.sweep(rule, sweep_thresholds(spec, rule))
        rows += swept.rows
        choice = choose_operating_point(swept.candidates, calib_full, tolerance)
        chosen[index] = choice.point
        points.append((rule.with_threshold(choice.point), choice))
    rows += evaluator.measure(points)
    return Evaluation(rows, chosen, evaluator.predictions())
