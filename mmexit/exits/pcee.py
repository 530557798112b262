"""PCEE (Performance Control Early Exiting): exit when the calibrated accuracy of one's bin >= delta.

Calibration (``PCEECalibration``, on a held-out split): for each exit i, the calibration samples are
binned by confidence c_i = max softmax(z_i / T_i) (a reliability diagram) and the accuracy of exit
i in each bin, acc_i(b), is recorded. At inference, exit i looks up acc_i(bin(c_i)) and the row
stops when it is >= delta, the accuracy the user asks for (``threshold`` = delta, one value for all
exits). The last exit always stops.

What the paper leaves open, and mmexit's choices:
- bins: ``num_bins`` = 10 by default, **equal-mass** (``binning="equal_mass"``: bin edges at the
  quantiles of each exit's calibration confidences, so every bin holds about N/10 samples and the
  resolution follows the data; jointly trained exits put most samples near c = 1, where
  equal-width bins would lump them together). ``binning="equal_width"`` splits [1/C, 1] evenly.
  Repeated quantiles (ties) merge bins, so an exit may have fewer bins.
- sparse bins: a bin holding fewer than ``min_bin_count`` (default 10) calibration samples never
  says "exit", whatever its accuracy; an empty bin has accuracy 0.
- ``smoothing="isotonic"`` (mmexit's interpretation of the paper's smoothed variant, "PCEE-WS"):
  the bin accuracies of each exit are replaced by a monotone non-decreasing fit against the bins'
  confidence order (weighted isotonic regression over the non-sparse bins, scikit-learn); sparse
  bins still never exit. ``smoothing="none"`` uses the raw bin accuracies.
- a delta that no bin of any internal exit reaches makes every row run the full model; the rule
  says so in ``warning`` (a string for the results row, None when all is well), which also notes a
  delta above the final exit's own calibration accuracy (the target then cannot be met at all).

Control with a guarantee (mmexit's own, beyond the paper; ``calibration: {name: pcee, guarantee:
..., alpha: 0.1}``, see ``mmexit.calibration.pcee`` and ``mmexit.statistics.accuracy_control``).
The paper's rule puts each bin's *point estimate* straight into the decision: a bin of ~40
calibration samples has a standard error of ~7 points, the bins that happen to look good are the
ones chosen, and on new data the accuracy lands below delta. Two guaranteed variants:

- ``guarantee="ltt"`` (recommended) controls **the overall accuracy** (every sample, whichever
  exit answers it; what a user who "dials in" delta measures on a test set):
  ``P(accuracy >= delta) >= 1 - alpha`` over the draw of the calibration split, where accuracy is
  the expected accuracy on new samples from the calibration split's distribution. The rule
  becomes "exit at exit i when score_i >= lambda(delta)", with lambda certified by Learn-then-Test:
  candidate levels are walked from the full model (never exit) to the most aggressive level, each
  policy's accuracy tested on calibration samples with an exact binomial p-value, while p <=
  alpha (fixed-sequence testing). ``score="confidence"`` (default) uses c_i itself (after the
  rule's per-exit temperatures) with a fixed, data-independent level grid, so the whole split
  tests it (temperatures count as part of the model: for a strict guarantee fit them on another
  split); ``score="bin_accuracy"`` is PCEE's own signal, the bin accuracy acc_i(bin(c_i)), with
  the tables fitted on a random ``fit_fraction`` of the split and the levels tested on the rest
  (the family must not depend on the data it is tested on). On synthetic tasks (3 and 6 exits,
  400 calibration samples) the confidence score gave the higher speed-up at the same guarantee:
  halving the test sample costs more than the per-exit tables gain.
  Unlike the paper, lambda may end up below or above delta: the rule spends the final exit's
  margin over delta on early exits and holds back where the calibration evidence is thin. When
  delta cannot be certified even for the full model (delta above what the full model reaches on
  calibration, or too close to it for the sample size), every sample runs the full model and
  ``warning`` says the target is unreachable; when only the full model is certified, every sample
  runs it too (the target is met, no speed-up). The binomial test assumes independent samples:
  for captioning, where the samples are the tokens of a few hundred captions and "correct" means
  "equal to the full model's token", the certificate is approximate.
- ``guarantee="bins"`` replaces acc_i(b) by a one-sided lower confidence bound at level alpha
  (``bound``: Clopper-Pearson, exact, or Wilson), walked per exit from the most confident bin down
  while the bound is >= delta (fixed-sequence testing, so no union-bound correction is needed).
  It controls, **per internal exit**, the accuracy of each bin that lets rows exit: with
  probability >= 1 - alpha every such bin's accuracy (over all samples whose exit-i confidence
  falls in it, as the paper's tables measure it) is >= delta. It does not bound the overall
  accuracy: the rows that reach exit i are those earlier exits passed on, and the rows left for
  the final exit are the hard ones, so the overall accuracy is >= delta only when the final
  exit's accuracy on them is too (it usually holds in practice because the bounds are
  conservative). With equal-mass bins the edges come from the same data, so the bound is
  approximate; equal-width bins make it exact. The target is declared unreachable, and every row
  runs the full model, when the final exit's own lower bound is below delta.

Labels in tables (``describe``): ``pcee@delta=D`` (the paper), ``pcee-ltt(alpha=A)@delta=D``
(``score="confidence"``), ``pcee-ltt-table(alpha=A)@delta=D`` (``score="bin_accuracy"``),
``pcee-cp(alpha=A)@delta=D`` / ``pcee-wilson(alpha=A)@delta=D`` (``guarantee="bins"``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mmexit.errors import CalibrationError, RecipeError
from mmexit.exits.base import ExitRule, ExitView, RuleState
from mmexit.exits.confidence import PerExitTemperature
from mmexit.statistics.accuracy_control import BOUNDS, fixed_sequence_level, lower_bound, max_certifiable_delta

BINNINGS = ("equal_mass", "equal_width")
SMOOTHINGS = ("none", "isotonic")
GUARANTEES = ("none", "ltt", "bins")
LTT_SCORES = ("bin_accuracy", "confidence")


def bin_edges(confidence: Tensor, num_bins: int, binning: str, num_classes: int) -> Tensor:
    """Interior bin edges [<= num_bins - 1] (sorted, unique) of one exit's calibration confidences [N]."""
    if binning == "equal_width":
        low = 1.0 / max(num_classes, 1)
        return torch.linspace(low, 1.0, num_bins + 1)[1:-1]
    if confidence.numel() == 0:
        return torch.empty(0)
    quantiles = torch.linspace(0, 1, num_bins + 1)[1:-1]
    edges = torch.quantile(confidence.double(), quantiles.double()).float()
    return torch.unique(edges)


def bin_index(confidence: Tensor, edges: Tensor) -> Tensor:
    """Bin of each confidence: b such that edges[b-1] <= c < edges[b] (0 .. len(edges)). [N] long."""
    return torch.searchsorted(edges.to(confidence.device, confidence.dtype).contiguous(), confidence.contiguous(), right=True)


def isotonic_accuracy(accuracy: Tensor, counts: Tensor, min_count: int) -> Tensor:
    """A non-decreasing fit of bin accuracies over the bins with >= min_count samples (weights = counts)."""
    from sklearn.isotonic import IsotonicRegression

    dense = counts >= max(min_count, 1)
    smoothed = accuracy.clone()
    if int(dense.sum()) >= 2:
        order = torch.nonzero(dense).flatten()
        fit = IsotonicRegression(increasing=True).fit(
            order.numpy().astype(float), accuracy[order].numpy(), sample_weight=counts[order].numpy().astype(float)
        )
        smoothed[order] = torch.tensor(fit.predict(order.numpy().astype(float)), dtype=accuracy.dtype)
    return smoothed


class PCEERule(PerExitTemperature, ExitRule):
    """Exit at exit i when the calibration accuracy of the row's confidence bin is >= delta.

    threshold: delta, the target accuracy. num_bins / binning / min_bin_count / smoothing: see the
    module doc. The guarantee (``"none"``: the paper's point estimates; ``"ltt"``: overall accuracy
    certified by Learn-then-Test; ``"bins"``: per-bin lower confidence bounds) and its ``alpha``
    are set by the calibration (``PCEECalibration(guarantee=..., alpha=...)``) and saved with the
    calibration state; the module doc says exactly which risk each one controls.
    """

    name = "pcee"
    needs_calibration = True
    conservative_direction = "descending"

    def __init__(
        self,
        threshold: float = 0.9,
        num_bins: int = 10,
        binning: str = "equal_mass",
        min_bin_count: int = 10,
        smoothing: str = "none",
    ) -> None:
        super().__init__(threshold)
        if binning not in BINNINGS:
            raise RecipeError(f"rule pcee: binning {binning!r} is not allowed; allowed: {', '.join(BINNINGS)}")
        if smoothing not in SMOOTHINGS:
            raise RecipeError(f"rule pcee: smoothing {smoothing!r} is not allowed; allowed: {', '.join(SMOOTHINGS)}")
        if num_bins < 1:
            raise RecipeError(f"rule pcee: num_bins must be >= 1, got {num_bins}")
        self.num_bins = int(num_bins)
        self.binning = binning
        self.min_bin_count = int(min_bin_count)
        self.smoothing = smoothing
        #: per exit: interior bin edges, bin accuracies (after smoothing), bin sample counts, correct
        #: answers per bin (raw, before smoothing)
        self.edges: Optional[list[Tensor]] = None
        self.accuracy: Optional[list[Tensor]] = None
        self.counts: Optional[list[Tensor]] = None
        self.hits: Optional[list[Tensor]] = None
        #: the final exit's accuracy on the calibration split, and its (correct, samples) counts
        self.final_accuracy: Optional[float] = None
        self.final_counts: Optional[tuple[int, int]] = None
        #: "none" (the paper), "ltt" or "bins"; set by the calibration
        self.guarantee = "none"
        self.alpha = 0.1
        self.bound = "clopper_pearson"
        #: guarantee "ltt": {"score", "levels" (conservative first), "errors" and "early" (per level:
        #: wrong answers, rows stopped before the last exit, among the "n" test samples),
        #: "full_errors", "fit_samples", "seed"}
        self.ltt: Optional[dict] = None
        self._decisions: dict = {}  # delta -> cached certified level / allowed bins (shared by copies)

    # ------------------------------------------------------------------------------ calibration
    def set_statistics(self, confidence: Tensor, correct: Tensor, num_classes: int) -> None:
        """Build every exit's reliability table from calibration confidence/correct [M, N]."""
        self.edges, self.accuracy, self.counts, self.hits = [], [], [], []
        for index in range(confidence.shape[0]):
            edges = bin_edges(confidence[index], self.num_bins, self.binning, num_classes)
            bins = bin_index(confidence[index], edges)
            size = edges.numel() + 1
            counts = torch.bincount(bins, minlength=size)
            hits = torch.bincount(bins, weights=correct[index].double(), minlength=size)
            accuracy = torch.where(counts > 0, hits / counts.clamp_min(1), torch.zeros_like(hits)).float()
            if self.smoothing == "isotonic":
                accuracy = isotonic_accuracy(accuracy, counts, self.min_bin_count)
            self.edges.append(edges.float())
            self.accuracy.append(accuracy)
            self.counts.append(counts.long())
            self.hits.append(hits.round().long())
        rows = int(correct.shape[1])
        self.final_accuracy = float(correct[-1].float().mean()) if rows else None
        self.final_counts = (int(correct[-1].sum()), rows)
        self.guarantee, self.ltt = "none", None
        self._decisions = {}

    def set_guarantee(self, guarantee: str, alpha: float = 0.1, bound: str = "clopper_pearson",
                      ltt: Optional[dict] = None) -> None:
        """Switch to a guaranteed variant (after ``set_statistics``); ``ltt`` is needed for "ltt"."""

        if guarantee not in GUARANTEES:
            raise RecipeError(f"rule pcee: guarantee {guarantee!r} is not allowed; allowed: {', '.join(GUARANTEES)}")
        if bound not in BOUNDS:
            raise RecipeError(f"rule pcee: bound {bound!r} is not allowed; allowed: {', '.join(BOUNDS)}")
        if not 0.0 < float(alpha) < 1.0:
            raise RecipeError(f"rule pcee: alpha must be in (0, 1), got {alpha}")
        if guarantee == "ltt" and (ltt is None or ltt.get("score") not in LTT_SCORES):
            raise CalibrationError("rule pcee: guarantee 'ltt' needs the Learn-then-Test counts of the calibration")
        self.guarantee, self.alpha, self.bound = guarantee, float(alpha), bound
        self.ltt = dict(ltt) if guarantee == "ltt" else None
        self._decisions = {}

    def _check(self) -> None:
        if self.edges is None:
            raise CalibrationError(
                "rule pcee is not calibrated: give it 'calibration: {name: pcee}' in the recipe (or call PCEECalibration().fit)"
            )

    def table_scores(self, confidence: Tensor) -> Tensor:
        """PCEE's score of rows [M', N] at the first M' exits: the bin accuracy, -inf for sparse bins."""
        self._check()
        out = torch.empty(confidence.shape, dtype=torch.float32)
        for index in range(confidence.shape[0]):
            bins = bin_index(confidence[index].float(), self.edges[index])
            dense = self.counts[index] >= self.min_bin_count
            table = torch.where(dense, self.accuracy[index].float(), torch.full_like(self.accuracy[index].float(), -math.inf))
            out[index] = table[bins]
        return out

    # --------------------------------------------------------------------------- guarantees
    def certified(self, delta: Optional[float] = None) -> tuple[bool, Optional[float]]:
        """Guarantee "ltt": (full model certified at delta, the most aggressive certified level or None).

        None also when the certified levels stop no calibration row early (nothing to gain from them).
        """

        delta = self.threshold if delta is None else float(delta)
        key = ("ltt", delta, self.alpha)
        if key not in self._decisions:
            ltt = self.ltt
            full_ok, level, _ = fixed_sequence_level(ltt["levels"], ltt["errors"], int(ltt["n"]),
                                                     int(ltt["full_errors"]), delta, self.alpha)
            early = ltt.get("early")
            if level is not None and early is not None and early[ltt["levels"].index(level)] == 0:
                level = None
            self._decisions[key] = (full_ok, level)
        return self._decisions[key]

    def _bins_allowed(self, exit_index: int, delta: float) -> Tensor:
        """Guarantee "bins": the bins of one exit whose lower bound stays >= delta, walked from the top bin down."""

        key = ("bins", delta, self.alpha, self.bound, exit_index)
        if key not in self._decisions:
            counts, hits = self.counts[exit_index], self.hits[exit_index]
            allowed = torch.zeros(counts.numel(), dtype=torch.bool)
            for b in range(counts.numel() - 1, -1, -1):  # most confident bin first
                n = int(counts[b])
                if n < self.min_bin_count or lower_bound(int(hits[b]), n, self.alpha, self.bound) < delta:
                    break
                allowed[b] = True
            self._decisions[key] = allowed
        return self._decisions[key]

    def exit_allowed(self, exit_index: int) -> Tensor:
        """Bool per bin [bins] of exit ``exit_index``: may a row whose confidence falls there exit?

        The paper: bin accuracy >= delta and not sparse; "bins": the bin's lower bound >= delta (see
        the module doc); "ltt" with the bin-accuracy score: bin accuracy >= the certified level.
        """
        self._check()
        dense = self.counts[exit_index] >= self.min_bin_count
        if self.guarantee == "bins":
            if self.target_unreachable():  # the full model is the best this model can do
                return torch.zeros_like(dense)
            return self._bins_allowed(exit_index, self.threshold)
        if self.guarantee == "ltt":
            if self.ltt["score"] != "bin_accuracy":
                raise CalibrationError("rule pcee: the 'confidence' score of guarantee 'ltt' has no bins")
            _, level = self.certified()
            if level is None:
                return torch.zeros_like(dense)
            return (self.accuracy[exit_index].float() >= level) & dense
        return (self.accuracy[exit_index] >= self.threshold) & dense

    # ---------------------------------------------------------------------------- inference
    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        self._check()
        confidence = self.scaled(view).softmax(-1).amax(-1)  # [rows]
        if self.guarantee == "ltt" and self.ltt["score"] == "confidence":
            _, level = self.certified()
            if level is None:
                return torch.zeros_like(confidence, dtype=torch.bool)
            return confidence >= level
        edges, allowed = self._decision_table(view.exit_index, confidence)
        return allowed.index_select(0, bin_index(confidence, edges))

    def _decision_table(self, exit_index: int, confidence: Tensor) -> tuple[Tensor, Tensor]:
        """(edges [bins - 1], allowed [bins]) of one exit on the confidence's device and dtype, kept per
        operating point: ``decide`` runs once per exit and call, the table changes only with them."""
        key = ("table", self.guarantee, self.threshold, self.alpha, self.bound, self.min_bin_count, exit_index,
               confidence.device, confidence.dtype)
        table = self._decisions.get(key)
        if table is None:
            edges = self.edges[exit_index].to(confidence.device, confidence.dtype).contiguous()
            table = self._decisions[key] = (edges, self.exit_allowed(exit_index).to(confidence.device))
        return table

    def reachable(self, delta: Optional[float] = None) -> bool:
        """Whether some internal exit may stop rows at ``delta`` (else every row runs the full model)."""
        self._check()
        rule = self if delta is None else self.with_threshold(delta)
        if rule.guarantee == "ltt":
            return rule.certified()[1] is not None
        return any(bool(rule.exit_allowed(i).any()) for i in range(len(self.edges) - 1))

    def target_unreachable(self, delta: Optional[float] = None) -> bool:
        """Whether the calibration says the target itself cannot be met (even by the full model).

        The paper: delta above the final exit's calibration accuracy; "ltt": delta not certified for
        the full model; "bins": delta above the final exit's lower confidence bound.
        """
        self._check()
        delta = self.threshold if delta is None else float(delta)
        if self.guarantee == "ltt":
            return not self.with_threshold(delta).certified()[0]
        if self.final_accuracy is None:
            return True
        if self.guarantee == "bins" and self.final_counts is not None:
            key = ("final", self.alpha, self.bound)
            if key not in self._decisions:
                hits, n = self.final_counts
                self._decisions[key] = lower_bound(hits, n, self.alpha, self.bound)
            return self._decisions[key] < delta
        return self.final_accuracy < delta

    @property
    def warning(self) -> Optional[str]:
        """Why this operating point cannot do what was asked (for the results row), or None."""
        if self.edges is None:
            return None
        if self.guarantee == "ltt":
            return self._ltt_warning()
        notes = []
        label = "PCEE" if self.guarantee == "none" else f"PCEE ({self.bound} bins, alpha={self.alpha:g})"
        if not self.reachable():
            what = "reaches" if self.guarantee == "none" else "is certified at"
            notes.append(
                f"{label}: no internal exit {what} delta={self.threshold:g} on the calibration split; "
                "every sample runs the full model (falls back to the full model)"
            )
        if self.guarantee == "bins" and self.target_unreachable():
            hits, n = self.final_counts
            notes.append(
                f"{label}: delta={self.threshold:g} is above the final exit's accuracy lower bound "
                f"({lower_bound(hits, n, self.alpha, self.bound):.4f} from {n} calibration samples); "
                "the target is unreachable with this confidence; every sample runs the full model"
            )
        elif self.final_accuracy is not None and self.final_accuracy < self.threshold:
            notes.append(
                f"{label}: delta={self.threshold:g} is above the final exit's calibration accuracy "
                f"({self.final_accuracy:.4f}); the target accuracy cannot be met"
            )
        return "; ".join(notes) or None

    def _ltt_warning(self) -> Optional[str]:
        ltt = self.ltt
        full_ok, level = self.certified()
        n = int(ltt["n"])
        if not full_ok:
            best = max_certifiable_delta(int(ltt["full_errors"]), n, self.alpha)
            accuracy = 1 - int(ltt["full_errors"]) / n if n else float("nan")
            return (f"PCEE-LTT: target unreachable: delta={self.threshold:g} cannot be certified with confidence "
                    f"{1 - self.alpha:g} from {n} calibration samples (the full model's accuracy there is "
                    f"{accuracy:.4f}, which certifies delta <= {best:.4f}); every sample runs the full model "
                    "(falls back to the full model), which may miss the target")
        if level is None:
            return (f"PCEE-LTT: no early exit is certified at delta={self.threshold:g} (alpha={self.alpha:g}, "
                    f"{n} samples); every sample runs the full model (falls back to the full model)")
        return None

    def default_sweep(self) -> list[float]:
        return [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99]

    def describe(self) -> str:
        if self.guarantee == "ltt":
            tag = "pcee-ltt" if (self.ltt or {}).get("score") == "confidence" else "pcee-ltt-table"
            return f"{tag}(alpha={self.alpha:g})@delta={self.threshold:g}"
        if self.guarantee == "bins":
            tag = "pcee-cp" if self.bound == "clopper_pearson" else "pcee-wilson"
            return f"{tag}(alpha={self.alpha:g})@delta={self.threshold:g}"
        return f"pcee@delta={self.threshold:g}"

    # -------------------------------------------------------------------------------- saving
    def calibration_state(self) -> dict:
        if self.edges is None:
            return {"temperatures": self.temperatures}
        state = {
            "temperatures": self.temperatures,
            "edges": [e.tolist() for e in self.edges],
            "accuracy": [a.tolist() for a in self.accuracy],
            "counts": [c.tolist() for c in self.counts],
            "final_accuracy": self.final_accuracy,
            "num_bins": self.num_bins,
            "binning": self.binning,
            "min_bin_count": self.min_bin_count,
            "smoothing": self.smoothing,
            "guarantee": self.guarantee,
        }
        if self.hits is not None:
            state["hits"] = [h.tolist() for h in self.hits]
        if self.final_counts is not None:
            state["final_counts"] = list(self.final_counts)
        if self.guarantee != "none":
            state["alpha"], state["bound"] = self.alpha, self.bound
        if self.ltt is not None:
            state["ltt"] = {key: (list(value) if isinstance(value, (list, tuple)) else value)
                            for key, value in self.ltt.items()}
        return state

    def load_calibration_state(self, state: dict) -> None:
        self.temperatures = state.get("temperatures")
        if "edges" not in state:
            return
        self.edges = [torch.tensor(e, dtype=torch.float32) for e in state["edges"]]
        self.accuracy = [torch.tensor(a, dtype=torch.float32) for a in state["accuracy"]]
        self.counts = [torch.tensor(c, dtype=torch.long) for c in state["counts"]]
        self.hits = [torch.tensor(h, dtype=torch.long) for h in state["hits"]] if "hits" in state else None
        self.final_accuracy = state.get("final_accuracy")
        self.final_counts = tuple(state["final_counts"]) if state.get("final_counts") else None
        self.min_bin_count = int(state.get("min_bin_count", self.min_bin_count))
        self._decisions = {}
        guarantee = state.get("guarantee", "none")
        if guarantee == "none":
            self.guarantee, self.ltt = "none", None
        else:
            self.set_guarantee(guarantee, state.get("alpha", 0.1), state.get("bound", "clopper_pearson"), state.get("ltt"))
