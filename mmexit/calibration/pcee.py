"""PCEE calibration: per-exit reliability tables (confidence bins -> calibration accuracy).

``fit`` reads the split's ``ExitStatistics``: each exit's confidence c_i (with the rule's temperatures when set) and whether
its prediction is right on the calibration split, then the rule bins them (see
``mmexit.exits.pcee`` for the bin count, equal-mass vs equal-width and the sparse-bin guard).
The table does not depend on delta, so after ``fit`` every ``rule.with_threshold(delta)`` works.

``guarantee`` (mmexit's own, beyond the paper; the rule's module doc says which risk each controls):

- ``"none"``: the paper, bin accuracies as point estimates.
- ``"ltt"``: the overall accuracy is >= delta with probability >= 1 - ``alpha`` over the
  calibration draw (Learn-then-Test, fixed-sequence testing with exact binomial p-values; see
  ``mmexit.statistics.accuracy_control``). ``score="confidence"`` (default) tests a fixed grid of
  confidence levels on the whole split. With ``score="bin_accuracy"`` the split is divided at
  random (``fit_fraction``, ``seed``): the bin tables are fitted on one part, the levels tested on
  the other.
  What is stored is delta-independent (errors per level), so every ``with_threshold(delta)``
  certifies its own level.
- ``"bins"``: each bin's accuracy replaced by a one-sided (1 - alpha) lower bound (``bound``:
  ``clopper_pearson`` or ``wilson``), fixed sequence from the most confident bin down, per exit.

Recipe: ``{name: pcee, calibration: {name: pcee, guarantee: ltt, alpha: 0.1}}``.
"""

from __future__ import annotations

from mmexit.calibration.statistics import ExitStatistics
from mmexit.errors import CalibrationError, RecipeError
from mmexit.exits.pcee import GUARANTEES, LTT_SCORES
from mmexit.statistics.accuracy_control import BOUNDS, CONFIDENCE_LEVELS, policy_counts, split_indices


class PCEECalibration:
    """Calibration component for ``PCEERule`` (recipe: ``calibration: {name: pcee}``).

    guarantee: "none" (the paper), "ltt" (overall accuracy >= delta with probability >= 1 - alpha)
    or "bins" (per-bin lower confidence bounds). alpha: the risk level of the guarantee.
    bound: "clopper_pearson" | "wilson" (guarantee "bins"). score: "confidence" | "bin_accuracy"
    (guarantee "ltt"). fit_fraction / seed: the share of the calibration split that fits the bin
    tables, and the seed of that random division (guarantee "ltt", score "bin_accuracy").
    """

    def __init__(self, guarantee: str = "none", alpha: float = 0.1, bound: str = "clopper_pearson",
                 score: str = "confidence", fit_fraction: float = 0.5, seed: int = 0) -> None:

        if guarantee not in GUARANTEES:
            raise RecipeError(f"calibration pcee: guarantee {guarantee!r} is not allowed; allowed: {', '.join(GUARANTEES)}")
        if bound not in BOUNDS:
            raise RecipeError(f"calibration pcee: bound {bound!r} is not allowed; allowed: {', '.join(BOUNDS)}")
        if score not in LTT_SCORES:
            raise RecipeError(f"calibration pcee: score {score!r} is not allowed; allowed: {', '.join(LTT_SCORES)}")
        if not 0.0 < float(alpha) < 1.0:
            raise RecipeError(f"calibration pcee: alpha must be in (0, 1), got {alpha}")
        if not 0.0 < float(fit_fraction) < 1.0:
            raise RecipeError(f"calibration pcee: fit_fraction must be in (0, 1), got {fit_fraction}")
        self.guarantee, self.alpha, self.bound = guarantee, float(alpha), bound
        self.score, self.fit_fraction, self.seed = score, float(fit_fraction), int(seed)

    def fit(self, rule, stats: ExitStatistics) -> None:
        """Reliability tables from the calibration split's exit statistics (with the rule's temperatures)."""
        if not hasattr(rule, "set_statistics") or not hasattr(rule, "edges"):
            raise CalibrationError(f"calibration pcee: rule '{getattr(rule, 'name', rule)}' is not a PCEE rule")
        if stats.num_classes < 2:
            raise CalibrationError("calibration pcee: PCEE needs class (or token) logits; regression heads are not supported")
        if stats.num_samples == 0:
            raise CalibrationError("calibration pcee: the calibration split is empty")
        confidence, _, correct = stats.per_exit(getattr(rule, "temperatures", None))
        self.fit_arrays(rule, confidence.float().cpu(), correct.bool().cpu(), int(stats.num_classes))

    def fit_arrays(self, rule, confidence, correct, num_classes: int) -> None:
        """``fit`` from each exit's confidence [M, N] and correctness [M, N] (bool) directly."""
        if self.guarantee != "ltt":
            rule.set_statistics(confidence, correct, num_classes)
            if self.guarantee == "bins":
                rule.set_guarantee("bins", self.alpha, self.bound)
            return
        rows = int(correct.shape[1])
        if self.score == "bin_accuracy":
            if rows < 2:
                raise CalibrationError("calibration pcee: guarantee 'ltt' needs at least 2 calibration samples")
            fit, test = split_indices(rows, self.fit_fraction, self.seed)
            rule.set_statistics(confidence[:, fit], correct[:, fit], num_classes)
            scores = rule.table_scores(confidence[:-1, test])
            levels = sorted({float(v) for index in range(len(rule.edges) - 1)
                             for v in rule.accuracy[index][rule.counts[index] >= rule.min_bin_count].tolist()},
                            reverse=True)
        else:
            test = slice(None)
            rule.set_statistics(confidence, correct, num_classes)
            scores, levels = confidence[:-1], list(CONFIDENCE_LEVELS)
        tested = correct[:, test]
        errors, early = policy_counts(scores, tested, levels)
        n = int(tested.shape[1])
        full_correct = int(correct[-1].sum())
        ltt = {"score": self.score, "levels": levels, "errors": errors, "early": early, "n": n,
               "full_errors": int((~tested[-1]).sum()), "fit_samples": rows - n, "seed": self.seed}
        rule.set_guarantee("ltt", self.alpha, self.bound, ltt)
        # the whole split's final-exit figures (informational; the certificate uses the test part)
        rule.final_accuracy = full_correct / rows if rows else None
        rule.final_counts = (full_correct, rows)
