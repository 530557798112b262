"""Learn-then-Test (Angelopoulos et al.; used by CALM): a threshold with a distribution-free guarantee.

The user asks: "at most ``epsilon`` of the answers may differ from the full model's, with
probability at least ``1 - delta`` over the calibration draw". For a grid of operating points
ordered from the most conservative (closest to the full model) to the most aggressive, LTT tests
H_j: risk(lambda_j) > epsilon with a valid p-value from the *per-sample* losses on the
calibration split (loss = 1 when the row's exit prediction differs from the last exit's), and
walks the grid in that fixed order (fixed-sequence testing: no multiplicity correction needed)
while the p-value stays <= delta. The last point rejected is the most aggressive one whose risk
is certified <= epsilon. If even the first point cannot be certified, nothing can: the rule falls
back to never exiting early, and ``rule.warning`` says so.

p-values (per-sample losses in {0, 1}, n samples, k disagreements):
- ``binomial``: P(Binomial(n, epsilon) <= k), exact for 0/1 losses;
- ``hoeffding_bentkus``: min(exp(-n h(k/n, epsilon)), e * P(Binomial(n, epsilon) <= ceil(k))),
  valid for any loss bounded in [0, 1] (h is the KL divergence of Bernoulli distributions).

The order of the grid must not depend on the calibration data; it comes from the rule's known
direction (``ExitRule.conservative_direction``: for max-prob a *higher* threshold is more
conservative, for entropy a *lower* one) or from ``order`` given by the user.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mmexit.errors import CalibrationError, RecipeError
from mmexit.inference.exit_loop import simulate_exits


def _kl_bernoulli(q: float, p: float) -> float:
    q = min(max(q, 1e-12), 1 - 1e-12)
    p = min(max(p, 1e-12), 1 - 1e-12)
    return q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))


def binomial_p_value(losses: Tensor, epsilon: float) -> float:
    """P(Binomial(n, epsilon) <= sum(losses)) for 0/1 losses: small when the risk is < epsilon."""
    from scipy.stats import binom

    n = losses.numel()
    return float(binom.cdf(int(round(float(losses.sum()))), n, epsilon))


def hoeffding_bentkus_p_value(losses: Tensor, epsilon: float) -> float:
    """The Hoeffding-Bentkus p-value of H: mean loss > epsilon, for losses in [0, 1]."""
    from scipy.stats import binom

    n = losses.numel()
    mean = float(losses.float().mean())
    hoeffding = 1.0 if mean >= epsilon else math.exp(-n * _kl_bernoulli(mean, epsilon))
    bentkus = math.e * float(binom.cdf(math.ceil(n * mean), n, epsilon))
    return min(hoeffding, bentkus, 1.0)


P_VALUES = {"binomial": binomial_p_value, "hoeffding_bentkus": hoeffding_bentkus_p_value}


def disagreement_losses(rule, logits: Tensor) -> Tensor:
    """Per-sample loss [N]: 1 where the row's exit prediction differs from the last exit's."""
    exit_index = simulate_exits(rule, logits)
    chosen = logits[exit_index, torch.arange(logits.shape[1])]
    if logits.shape[-1] == 1:
        raise CalibrationError("calibration ltt: regression heads have no prediction to disagree on")
    return (chosen.argmax(-1) != logits[-1].argmax(-1)).float()


def learn_then_test(rule, logits: Tensor, grid: list[float], epsilon: float, delta: float,
                    p_value: str = "binomial") -> tuple[Optional[float], list[dict]]:
    """Fixed-sequence test along ``grid`` (conservative first); the last certified point or None."""
    test = P_VALUES[p_value]
    certified: Optional[float] = None
    trace = []
    for threshold in grid:
        losses = disagreement_losses(rule.with_threshold(threshold), logits)
        p = test(losses, epsilon)
        trace.append({"threshold": threshold, "risk": float(losses.mean()), "p_value": p})
        if p > delta:
            break
        certified = threshold
    return certified, trace


class LTTCalibration:
    """Calibration component: set ``rule.threshold`` to the most aggressive certified point.

    epsilon: the largest share of answers allowed to differ from the full model.
    delta: 1 - confidence of the guarantee. grid: operating points (default: the rule's sweep).
    order: "auto" (the rule's known direction), "ascending" or "descending" (conservative first).
    """

    def __init__(self, epsilon: float = 0.02, delta: float = 0.05, p_value: str = "binomial",
                 grid: list[float] | None = None, order: str = "auto") -> None:
        if p_value not in P_VALUES:
            raise RecipeError(f"calibration ltt: p_value {p_value!r} is not allowed; allowed: {', '.join(P_VALUES)}")
        self.epsilon, self.delta, self.p_value = float(epsilon), float(delta), p_value
        self.grid, self.order = grid, order

    def ordered_grid(self, rule) -> list[float]:
        grid = list(self.grid or rule.default_sweep())
        order = rule.conservative_direction if self.order == "auto" else self.order
        if order not in ("ascending", "descending"):
            raise CalibrationError(
                f"calibration ltt: the conservative direction of rule '{rule.name}' is unknown; set order: ascending|descending")
        return sorted(grid, reverse=order == "descending")

    def fit(self, rule, stats) -> None:
        """stats: ``ExitStatistics`` of the calibration split (all exits' logits needed)."""
        logits = stats.require_logits("ltt")
        certified, trace = learn_then_test(rule, logits, self.ordered_grid(rule), self.epsilon, self.delta, self.p_value)
        rule.ltt_trace = trace
        if certified is None:
            rule.ltt_threshold = None
            message = (f"LTT: no operating point certified (risk <= {self.epsilon:g} with confidence "
                       f"{1 - self.delta:g}); falls back to the full model")
            rule.ltt_warning = message
            if not isinstance(getattr(type(rule), "warning", None), property):
                rule.warning = message
            # a threshold past the conservative end never fires for every rule with a known direction
            descending = self.ordered_grid(rule)[0] >= self.ordered_grid(rule)[-1]
            rule.threshold = math.inf if descending else -math.inf
            return
        rule.ltt_threshold = certified
        rule.threshold = certified
