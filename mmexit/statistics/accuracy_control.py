"""Accuracy control with a finite-sample guarantee: the statistics behind guaranteed PCEE.

mmexit's own (beyond the PCEE paper). Two routes, both read per-sample correctness on the
calibration split (METHODS.md, "PCEE ... control with a finite-sample guarantee"):

- **Learn-then-Test on the overall accuracy** (``guarantee: ltt``). A one-parameter family of
  exit policies, indexed by a level ``lambda`` and ordered from the most conservative (the full
  model) to the most aggressive, is fixed before the test data are looked at. For each policy
  the risk is ``1 - accuracy`` of the *whole population* (every sample, whichever exit answers
  it); H_j: "accuracy(lambda_j) < delta" is tested with the exact binomial p-value
  ``P(Binomial(n, 1 - delta) <= errors_j)`` (errors_j: wrong answers of policy j among the n test
  samples of the calibration split) and the levels are walked in order while ``p <= alpha``
  (fixed-sequence testing: the family-wise error is <= alpha without any correction). The last
  accepted level is used; if even the full model is not accepted, nothing is certified.
  Guarantee: ``P(accuracy of the chosen policy >= delta) >= 1 - alpha`` over the calibration draw,
  where accuracy is the expected accuracy on new samples from the calibration split's
  distribution.
- **Per-bin lower confidence bounds** (``guarantee: bins``): a bin's point estimate is replaced by a
  one-sided lower bound (Clopper-Pearson or Wilson, level alpha), walked from the most confident
  bin down (fixed sequence, per exit).

Everything here is a pure function of counts and tensors, so the rule can redo the last step
(which level does delta certify?) for any delta after a single calibration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

BOUNDS = ("clopper_pearson", "wilson")

#: levels tried for the ``confidence`` score (data-independent, so the whole split may test them):
#: every 0.01 from 0.01 to 0.99, then 0.1-decade steps towards 1 (trained exits crowd near c = 1)
CONFIDENCE_LEVELS: tuple[float, ...] = tuple(sorted(
    {round(k / 100, 2) for k in range(1, 100)} | {1.0 - 10 ** (-k / 10) for k in range(21, 61)} | {1.0},
    reverse=True))

#: levels (rows) per chunk when counting the errors of many policies at once
_CHUNK = 16


def accuracy_p_value(errors: int, n: int, delta: float) -> float:
    """p-value of H: "accuracy < delta" from ``errors`` wrong answers out of ``n`` (exact binomial).

    ``P(Binomial(n, 1 - delta) <= errors)``: small when far fewer errors than ``n (1 - delta)`` were seen.
    An empty sample (n = 0) certifies nothing (1.0); delta <= 0 is always met (0.0).
    """
    if n <= 0:
        return 1.0
    if delta <= 0.0:
        return 0.0
    if delta >= 1.0:
        return 1.0
    from scipy.stats import binom

    return float(binom.cdf(int(errors), int(n), 1.0 - float(delta)))


def lower_bound(hits: int, n: int, alpha: float, bound: str = "clopper_pearson") -> float:
    """One-sided (1 - alpha) lower confidence bound of a success probability from ``hits`` of ``n``.

    clopper_pearson: exact (the alpha quantile of Beta(hits, n - hits + 1)); wilson: the Wilson
    score bound (approximate, slightly less conservative). 0.0 for an empty sample.
    """
    if n <= 0 or hits <= 0:
        return 0.0
    if bound == "clopper_pearson":
        from scipy.stats import beta

        return float(beta.ppf(alpha, hits, n - hits + 1))
    if bound == "wilson":
        from scipy.stats import norm

        z = float(norm.ppf(1.0 - alpha))
        p = hits / n
        centre = p + z * z / (2 * n)
        spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return max(0.0, (centre - spread) / (1 + z * z / n))
    raise ValueError(f"unknown bound {bound!r}; allowed: {', '.join(BOUNDS)}")


def exits_at_levels(scores: Tensor, levels: Sequence[float]) -> Tensor:
    """Exit index [G, N] of each sample under each policy "stop at the first exit whose score >= level".

    scores: [M - 1, N] each internal exit's score (higher = more sure; -inf never stops);
    levels: G values. A sample no internal exit stops answers at the last exit, M - 1.
    """
    internal, rows = scores.shape
    out = torch.empty(len(levels), rows, dtype=torch.long)
    scores = scores.float()  # the rule compares float32 scores with the level at inference: same here
    level_tensor = torch.as_tensor(list(levels), dtype=torch.float32)
    for start in range(0, len(levels), _CHUNK):
        chunk = level_tensor[start:start + _CHUNK]
        stop = scores.unsqueeze(0) >= chunk.view(-1, 1, 1)  # [g, M-1, N]
        stop = torch.cat([stop, torch.ones(chunk.numel(), 1, rows, dtype=torch.bool)], 1)
        out[start:start + chunk.numel()] = stop.int().argmax(1)  # first True
    return out


def errors_at_levels(scores: Tensor, correct: Tensor, levels: Sequence[float]) -> list[int]:
    """Wrong answers of each policy "stop at the first exit whose score >= level" (see ``exits_at_levels``).

    correct: [M, N] bool, whether each exit's prediction is right for each sample.
    """
    return policy_counts(scores, correct, levels)[0]


def policy_counts(scores: Tensor, correct: Tensor, levels: Sequence[float]) -> tuple[list[int], list[int]]:
    """(wrong answers, samples stopped before the last exit) of each level's policy."""
    if not len(levels):
        return [], []
    exit_index = exits_at_levels(scores, levels)  # [G, N]
    chosen = correct.bool().gather(0, exit_index)
    early = (exit_index < correct.shape[0] - 1).sum(1)
    return [int(v) for v in (~chosen).sum(1).tolist()], [int(v) for v in early.tolist()]


def accuracy_p_values(errors: Sequence[int], n: int, delta: float) -> list[float]:
    """``accuracy_p_value`` of many policies at once (one scipy call)."""
    if n <= 0 or delta >= 1.0:
        return [1.0] * len(errors)
    if delta <= 0.0:
        return [0.0] * len(errors)
    from scipy.stats import binom

    return [float(p) for p in binom.cdf(list(errors), int(n), 1.0 - float(delta))]


def first_failure(p_values: Sequence[float], alpha: float) -> int:
    """Index of the first p-value > alpha (len when none): fixed-sequence testing accepts everything before it."""
    for index, p in enumerate(p_values):
        if p > alpha:
            return index
    return len(p_values)


def fixed_sequence_level(levels: Sequence[float], errors: Sequence[int], n: int, full_errors: int, delta: float,
                         alpha: float) -> tuple[bool, Optional[float], list[dict]]:
    """Walk conservative -> aggressive while the accuracy p-value stays <= alpha.

    The full model (no early exit, ``full_errors`` wrong answers) is the first hypothesis, then
    ``levels`` in the given order (conservative first). Returns (full model certified, last
    certified level or None, trace of {"level", "accuracy", "p_value"} for every test made).
    """
    p_full = accuracy_p_value(full_errors, n, delta)
    trace = [{"level": None, "accuracy": 1.0 - full_errors / n if n else None, "p_value": p_full}]
    if p_full > alpha:
        return False, None, trace
    p_values = accuracy_p_values(errors, n, delta)
    stop = first_failure(p_values, alpha)
    tested = min(stop + 1, len(levels))
    trace += [{"level": float(levels[i]), "accuracy": 1.0 - errors[i] / n, "p_value": p_values[i]} for i in range(tested)]
    return True, (float(levels[stop - 1]) if stop > 0 else None), trace


def max_certifiable_delta(errors: int, n: int, alpha: float) -> float:
    """The largest delta that ``errors`` wrong answers out of ``n`` certify at level alpha (0.0 when none).

    The Clopper-Pearson lower bound of the accuracy: the p-value of ``accuracy_p_value`` is <= alpha
    exactly for delta <= this value.
    """
    return lower_bound(n - int(errors), n, alpha, "clopper_pearson")


def split_indices(n: int, fit_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random split of range(n) into (fit, test) index tensors, the fit part ~fit_fraction of n."""
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(n, generator=generator)
    fit = int(round(n * float(fit_fraction)))
    fit = min(max(fit, 1 if n > 1 else 0), n - 1 if n > 1 else n)
    return order[:fit].sort().values, order[fit:].sort().values
