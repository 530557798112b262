"""The accuracy-control check: does a method deliver the accuracy a user dials in, on unseen data?

Input: a run folder's ``exit_outputs.safetensors`` (every exit's logits and the labels on the
calibration and test splits; tensors ``calib.logits`` [M, Nc, C], ``calib.labels`` [Nc],
``test.logits`` [M, Nt, C], ``test.labels`` [Nt]; metadata ``exit_layers`` (JSON list of 1-based
layers, the last = the model's depth), ``task``, ``primary_metric``).

The check pools the calibration and test samples and re-splits them at random ``splits`` times
(the calibration part has the size of the original calibration split). For each split and each
target accuracy ``delta``, every method is calibrated on the calibration part only and measured
on the other part: achieved accuracy, layer speed-up (``L * N / sum(layers used)``, simulated:
every exit's logits are known), and whether the method declared the target unreachable.
Per (delta, method) it reports the mean achieved accuracy, the violation rate (achieved < delta -
``TOLERANCE``), the mean |achieved - delta|, the mean layer speed-up and the share of splits where
the target was declared unreachable.

Methods (``METHODS``; raw logits, no temperature scaling, so nothing but the method sees the
calibration part):

- ``pcee``: the paper's rule (10 equal-mass bins, point estimates, ``mmexit.exits.pcee``);
- ``maxprob@delta``: exit when the max softmax probability >= delta (no calibration at all);
- ``ltt-agree``: the existing ``LTTCalibration`` (max-prob threshold, certified disagreement with
  the full model <= epsilon). Accuracy >= delta is implied by choosing epsilon = LB - delta, where
  LB is the one-sided Clopper-Pearson lower bound of the full model's calibration accuracy at
  level alpha/2, and running LTT at alpha/2: by a union bound, P(accuracy < delta) <= alpha
  (accuracy >= full accuracy - disagreement). Declared unreachable when LB <= delta.
- ``pcee-ltt`` (mmexit's guaranteed PCEE, confidence score), ``pcee-ltt-table`` (bin-accuracy
  score, tables on half of the calibration part) and ``pcee-cp`` (per-bin Clopper-Pearson lower
  bounds): see ``mmexit.exits.pcee``.

What a violation rate means: the guaranteed methods bound the probability (over the calibration
draw) that the *expected* accuracy on new samples falls below delta. The test part is a finite
sample, so a method whose expected accuracy sits exactly at delta is still measured below
delta - TOLERANCE in a sizeable share of splits; the Markdown output states that share. Re-splits
of one pool are not independent draws either (they share samples), so read the rates as a check,
not as an exact estimate: a guaranteed method should stay near or below alpha, the paper's point
estimates typically do not.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from mmexit.calibration.pcee import PCEECalibration
from mmexit.calibration.temperature import exit_statistics
from mmexit.errors import MMExitError
from mmexit.evaluation.exit_outputs import (EXIT_OUTPUTS_FILE, TENSORS, ExitOutputs,  # noqa: F401 (re-exported)
                                            load_exit_outputs, save_exit_outputs)
from mmexit.exits.confidence import MaxProbRule
from mmexit.exits.pcee import PCEERule
from mmexit.inference.exit_loop import simulate_exits
from mmexit.statistics.accuracy_control import CONFIDENCE_LEVELS, exits_at_levels, first_failure, lower_bound

#: achieved < delta - TOLERANCE counts as a violation
TOLERANCE = 0.005
#: the name of the reference row: the best max-prob threshold chosen on the test parts themselves
ORACLE = "oracle-maxprob"


class ControlCheckError(MMExitError):
    """An argument of the control check is out of range (splits, alpha, deltas, methods)."""


# --------------------------------------------------------------------------------------- methods
@dataclass
class Calibrated:
    """A method fitted on one calibration part: ``at(delta)`` -> (rule at delta, target declared unreachable)."""

    at: Callable[[float], tuple]


@dataclass
class Split:
    """One split's samples: logits [M, N, C], labels [N], and each exit's confidence / correctness [M, N]."""

    logits: Tensor
    labels: Tensor
    confidence: Tensor
    correct: Tensor

    @classmethod
    def of(cls, logits: Tensor, labels: Tensor) -> "Split":
        confidence, _, correct = exit_statistics(logits, labels)
        return cls(logits, labels, confidence, correct)


def _pcee(guarantee: str, **options) -> Callable:
    def fit(calib: Split, alpha: float) -> Calibrated:
        rule = PCEERule()
        PCEECalibration(guarantee=guarantee, alpha=alpha, **options).fit_arrays(
            rule, calib.confidence, calib.correct, int(calib.logits.shape[-1]))

        def at(delta: float):
            point = rule.with_threshold(delta)
            return point, point.target_unreachable()

        return Calibrated(at)

    return fit


def _maxprob(calib: Split, alpha: float) -> Calibrated:
    return Calibrated(lambda delta: (MaxProbRule(delta), False))


def _ltt_agree(calib: Split, alpha: float) -> Calibrated:
    """The existing LTT (``mmexit.calibration.ltt``) on max-prob, with epsilon implying accuracy >= delta.

    Its test, vectorised over the grid: per-sample loss = the chosen exit's prediction differs from
    the full model's; binomial p-value ``P(Binomial(n, epsilon) <= disagreements)``; fixed sequence
    from the most conservative threshold. The disagreement counts do not depend on delta, so they
    are counted once per split (``LTTCalibration.fit`` gives the same threshold; a test checks it).
    """
    from scipy.stats import binom

    n = int(calib.labels.numel())
    full_lb = lower_bound(int(calib.correct[-1].sum()), n, alpha / 2, "clopper_pearson")
    grid = ltt_agree_grid()
    prediction = calib.logits.argmax(-1)  # [M, N]
    exit_index = exits_at_levels(calib.confidence[:-1], grid)  # [G, N]
    chosen = prediction.gather(0, exit_index)
    disagreements = (chosen != prediction[-1].unsqueeze(0)).sum(1).tolist()

    def at(delta: float):
        epsilon = full_lb - delta
        if epsilon <= 0:
            return MaxProbRule(math.inf), True
        p_values = binom.cdf(disagreements, n, epsilon)
        stop = first_failure([float(p) for p in p_values], alpha / 2)
        return MaxProbRule(grid[stop - 1] if stop > 0 else math.inf), False

    return Calibrated(at)


def ltt_agree_grid() -> list[float]:
    """The max-prob thresholds LTT walks in the check (conservative first)."""

    return [level for level in CONFIDENCE_LEVELS if level < 1.0]


@dataclass
class Method:
    name: str
    guarantee: str
    doc: str
    fit: Callable[[Split, float], Calibrated]


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pcee", "none", "the paper: 10 equal-mass bins, exit when the bin's calibration accuracy >= delta",
           _pcee("none")),
    Method("maxprob@delta", "none", "exit when the max softmax probability >= delta (no calibration)", _maxprob),
    Method("ltt-agree", "P(acc >= delta) >= 1-alpha",
           "LTTCalibration on max-prob: disagreement with the full model <= LB(full acc, alpha/2) - delta, at alpha/2",
           _ltt_agree),
    Method("pcee-ltt", "P(acc >= delta) >= 1-alpha",
           "guaranteed PCEE: confidence level certified by Learn-then-Test on the overall accuracy",
           _pcee("ltt", score="confidence")),
    Method("pcee-ltt-table", "P(acc >= delta) >= 1-alpha",
           "guaranteed PCEE, bin-accuracy score: tables on half of the calibration part, LTT on the other half",
           _pcee("ltt", score="bin_accuracy")),
    Method("pcee-cp", "per exit, per bin",
           "PCEE with Clopper-Pearson lower bounds per bin (fixed sequence per exit); bounds exited bins, not overall",
           _pcee("bins", bound="clopper_pearson")),
)}
DEFAULT_METHODS = tuple(METHODS)


# ----------------------------------------------------------------------------------------- check
@dataclass
class ControlRow:
    delta: float
    method: str
    guarantee: str
    mean_accuracy: float
    std_accuracy: float
    violation_rate: float
    mean_abs_gap: float
    mean_speedup: float
    unreachable_rate: float
    splits: int


@dataclass
class ControlReport:
    """What ``run_control_check`` measured; ``markdown()`` and ``to_json()`` render it."""

    path: str
    task: str
    primary_metric: str
    exit_layers: list[int]
    pooled_samples: int
    calib_size: int
    test_size: int
    splits: int
    alpha: float
    seed: int
    deltas: list[float]
    first_exit_accuracy: float
    full_accuracy: float
    methods: dict[str, str]
    rows: list[ControlRow] = field(default_factory=list)
    oracle: list[ControlRow] = field(default_factory=list)

    def to_json(self) -> dict:
        payload = asdict(self)
        payload["tolerance"] = TOLERANCE
        payload["num_layers"] = int(self.exit_layers[-1])
        return payload

    def markdown(self) -> str:
        return control_markdown(self)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def default_deltas(outputs: ExitOutputs, count: int = 6) -> list[float]:
    """Targets from about the first exit's accuracy up to the full model's (pooled samples), on a 0.005 grid."""
    logits = torch.cat([outputs.calib_logits, outputs.test_logits], 1)
    labels = torch.cat([outputs.calib_labels, outputs.test_labels])
    first, full = _accuracy(logits[0], labels), _accuracy(logits[-1], labels)
    high = math.floor(full / 0.005 + 1e-9) * 0.005
    low = min(first, high - 0.02)
    low = max(low, 1.0 / outputs.num_classes + 0.005)
    if high <= low:
        return [round(high, 3)]
    values = torch.linspace(low, high, count).tolist()
    return sorted({round(round(v / 0.005) * 0.005, 3) for v in values})


def _check_arguments(splits: int, alpha: float, deltas: Sequence[float], methods: Sequence[str]) -> None:
    if splits < 1:
        raise ControlCheckError(f"--splits must be >= 1, got {splits}")
    if not 0.0 < alpha < 1.0:
        raise ControlCheckError(f"--alpha must be in (0, 1), got {alpha}")
    bad = [d for d in deltas if not 0.0 < d < 1.0]
    if bad or not deltas:
        raise ControlCheckError(f"--deltas must be target accuracies in (0, 1), got {list(deltas)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ControlCheckError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; allowed: {', '.join(METHODS)}")


def run_control_check(outputs: ExitOutputs, deltas: Optional[Sequence[float]] = None, splits: int = 50,
                      alpha: float = 0.1, seed: int = 0, methods: Optional[Sequence[str]] = None,
                      progress: bool = True, calib_size: Optional[int] = None) -> ControlReport:
    """Re-split calibration+test ``splits`` times; calibrate each method on one part, measure on the other.

    calib_size: samples in each calibration part (default: the run's calibration split size); the
    rest of the pool is the test part. The report's ``oracle`` rows: per delta, the fastest single
    max-prob threshold whose violation rate over these very test parts is <= alpha (a reference for
    what the max-prob family can reach at that risk, chosen by looking at the test parts: not a method).
    """
    from tqdm.auto import tqdm

    deltas = [float(d) for d in (deltas if deltas else default_deltas(outputs))]
    methods = list(methods or DEFAULT_METHODS)
    _check_arguments(splits, alpha, deltas, methods)
    logits = torch.cat([outputs.calib_logits, outputs.test_logits], 1)
    labels = torch.cat([outputs.calib_labels, outputs.test_labels])
    total = int(labels.numel())
    if calib_size is None:
        calib_size = int(outputs.calib_labels.numel())
    elif not 2 <= int(calib_size) < total:
        raise ControlCheckError(f"--calib-size must be in [2, {total - 1}] (the pool has {total} samples), got {calib_size}")
    calib_size = int(calib_size)
    if total - calib_size < 1:
        raise ControlCheckError("the test split is empty: nothing to measure on")
    grid = [math.inf] + ltt_agree_grid()  # the full model first, then max-prob levels, conservative first
    oracle_accuracy = torch.empty(splits, len(grid), dtype=torch.float64)  # [S, G] test accuracy per level
    oracle_speedup = torch.empty(splits, len(grid), dtype=torch.float64)
    layers_of = torch.tensor(outputs.exit_layers, dtype=torch.float64)
    num_layers = outputs.num_layers
    results: dict[tuple[float, str], list[tuple[float, float, bool]]] = {(d, m): [] for d in deltas for m in methods}
    generator = torch.Generator().manual_seed(int(seed))
    for split in tqdm(range(splits), desc="control check (splits)", disable=not progress, leave=False):
        order = torch.randperm(total, generator=generator)
        calib_rows, test_rows = order[:calib_size], order[calib_size:]
        calib = Split.of(logits[:, calib_rows], labels[calib_rows])
        test_logits, test_labels = logits[:, test_rows], labels[test_rows]
        oracle_accuracy[split], oracle_speedup[split] = _grid_outcomes(Split.of(test_logits, test_labels), grid,
                                                                       layers_of, num_layers)
        for name in methods:
            fitted = METHODS[name].fit(calib, alpha)
            for delta in deltas:
                rule, unreachable = fitted.at(delta)
                exit_index = simulate_exits(rule, test_logits)
                chosen = test_logits[exit_index, torch.arange(exit_index.numel())]
                accuracy = _accuracy(chosen, test_labels)
                speedup = num_layers * exit_index.numel() / float(layers_of[exit_index].sum())
                results[(delta, name)].append((accuracy, speedup, bool(unreachable)))
    rows = []
    for delta in deltas:
        for name in methods:
            values = results[(delta, name)]
            acc = torch.tensor([v[0] for v in values], dtype=torch.float64)
            rows.append(ControlRow(
                delta, name, METHODS[name].guarantee, float(acc.mean()), float(acc.std()) if len(values) > 1 else 0.0,
                float((acc < delta - TOLERANCE).double().mean()), float((acc - delta).abs().mean()),
                sum(v[1] for v in values) / len(values), sum(v[2] for v in values) / len(values), len(values)))
    oracle = [_oracle_row(delta, oracle_accuracy, oracle_speedup, alpha) for delta in deltas]
    return ControlReport(
        outputs.path, outputs.task, outputs.primary_metric, list(outputs.exit_layers), total, calib_size,
        total - calib_size, splits, float(alpha), int(seed), deltas, _accuracy(logits[0], labels),
        _accuracy(logits[-1], labels), {name: METHODS[name].doc for name in methods}, rows, oracle)


def _grid_outcomes(test: Split, grid: Sequence[float], layers_of: Tensor, num_layers: int) -> tuple[Tensor, Tensor]:
    """(accuracy [G], layer speed-up [G]) on one test part of "exit at max-prob >= level", per grid level."""

    exit_index = exits_at_levels(test.confidence[:-1], grid)  # [G, N]
    accuracy = test.correct.bool().gather(0, exit_index).double().mean(1)
    speedup = num_layers * exit_index.shape[1] / layers_of[exit_index].sum(1)
    return accuracy, speedup


def _oracle_row(delta: float, accuracy: Tensor, speedup: Tensor, alpha: float) -> ControlRow:
    """The fastest grid level whose violation rate over the splits is <= alpha (the full model when none).

    accuracy, speedup: [S, G] per split and level. The full model (no early exit) is always a candidate.
    """
    violation = (accuracy < delta - TOLERANCE).double().mean(0)  # [G]
    mean_speedup = speedup.mean(0)
    feasible = violation <= alpha + 1e-12
    if bool(feasible.any()):
        level = int(torch.where(feasible, mean_speedup, torch.full_like(mean_speedup, -1.0)).argmax())
        acc, speed, rate = accuracy[:, level], float(mean_speedup[level]), float(violation[level])
    else:  # fall back to the full model (level 0)
        acc, speed, rate = accuracy[:, 0], float(mean_speedup[0]), float(violation[0])
    splits = int(acc.numel())
    return ControlRow(delta, ORACLE, "reference (test parts seen)", float(acc.mean()),
                      float(acc.std()) if splits > 1 else 0.0, rate, float((acc - delta).abs().mean()), speed,
                      0.0, splits)


# ---------------------------------------------------------------------------------------- output
def _test_se(delta: float, size: int) -> float:
    return math.sqrt(delta * (1 - delta) / max(size, 1))


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def control_markdown(report: ControlReport) -> str:
    """The check as Markdown: a header with the setting, one table row per (delta, method), a legend."""
    metric_note = "" if report.primary_metric == "accuracy" else f" (the task's primary metric is {report.primary_metric}; this check measures accuracy)"
    lines = [
        f"### Accuracy control check: {report.task}",
        "",
        f"{report.splits} random re-splits of the {report.pooled_samples} pooled calibration+test samples "
        f"(calibration part {report.calib_size}, test part {report.test_size}); each method calibrated on the "
        f"calibration part, measured on the test part{metric_note}. alpha = {report.alpha:g} for the guaranteed "
        f"methods; violation: achieved < delta - {TOLERANCE:g}. Exits at layers {report.exit_layers}; layer speed-ups "
        f"are simulated. Pooled accuracy: first exit {report.first_exit_accuracy:.4f}, full model "
        f"{report.full_accuracy:.4f}.",
        "",
        "| delta | method | guarantee | mean acc | std | violation rate | mean abs gap | layer speed-up | unreachable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_delta = {row.delta: row for row in report.oracle}
    for index, row in enumerate(report.rows):
        lines.append(f"| {row.delta:g} | {row.method} | {row.guarantee} | {row.mean_accuracy:.4f} | "
                     f"{row.std_accuracy:.4f} | {_percent(row.violation_rate)} | {row.mean_abs_gap:.4f} | "
                     f"{row.mean_speedup:.2f}x | {_percent(row.unreachable_rate)} |")
        last_of_delta = index + 1 == len(report.rows) or report.rows[index + 1].delta != row.delta
        oracle = by_delta.get(row.delta)
        if last_of_delta and oracle is not None:
            lines.append(f"| {oracle.delta:g} | *{oracle.method}* | {oracle.guarantee} | {oracle.mean_accuracy:.4f} | "
                         f"{oracle.std_accuracy:.4f} | {_percent(oracle.violation_rate)} | {oracle.mean_abs_gap:.4f} | "
                         f"{oracle.mean_speedup:.2f}x | - |")
    noise = ", ".join(f"{d:g}: {100 * _test_se(d, report.test_size):.1f}" for d in report.deltas)
    middle = report.deltas[len(report.deltas) // 2]
    chance = 0.5 * math.erfc(TOLERANCE / max(_test_se(middle, report.test_size), 1e-12) / math.sqrt(2))
    lines += [
        "",
        f"Test-part sampling noise (standard error of an accuracy of delta on {report.test_size} samples, in points): "
        f"{noise}. The guarantees bound the probability that the *expected* accuracy falls below delta; a method "
        f"whose expected accuracy is exactly delta={middle:g} would still be counted as a violation in "
        f"{_percent(chance)} of splits by the test part's noise alone.",
        "",
        "Methods:",
    ]
    lines += [f"- `{name}`: {doc}" for name, doc in report.methods.items()]
    if report.oracle:
        lines.append(f"- *{ORACLE}* (a reference, not a method): the fastest single max-prob threshold whose violation "
                     f"rate over these test parts is <= alpha, chosen by looking at them; what the max-prob family "
                     f"can reach at this risk when nothing is spent on estimating it")
    return "\n".join(lines) + "\n"


def control_table_markdown(path: Union[str, Path], deltas: Optional[Sequence[float]] = None, splits: int = 50,
                           alpha: float = 0.1, seed: int = 0, methods: Optional[Sequence[str]] = None,
                           progress: bool = False, calib_size: Optional[int] = None) -> str:
    """The check of a run folder (or exit_outputs file) as Markdown, for a run's report."""
    return run_control_check(load_exit_outputs(path), deltas, splits, alpha, seed, methods, progress,
                             calib_size).markdown()
