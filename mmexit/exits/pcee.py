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
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmexit.errors import CalibrationError, RecipeError
from mmexit.exits.base import ExitRule, ExitView, RuleState
from mmexit.exits.confidence import PerExitTemperature

BINNINGS = ("equal_mass", "equal_width")
SMOOTHINGS = ("none", "isotonic")


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
    module doc.
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
        #: per exit: interior bin edges, bin accuracies (after smoothing), bin sample counts
        self.edges: Optional[list[Tensor]] = None
        self.accuracy: Optional[list[Tensor]] = None
        self.counts: Optional[list[Tensor]] = None
        #: the final exit's accuracy on the calibration split
        self.final_accuracy: Optional[float] = None

    # ------------------------------------------------------------------------------ calibration
    def set_statistics(self, confidence: Tensor, correct: Tensor, num_classes: int) -> None:
        """Build every exit's reliability table from calibration confidence/correct [M, N]."""
        self.edges, self.accuracy, self.counts = [], [], []
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
        self.final_accuracy = float(correct[-1].float().mean()) if correct.shape[1] else None

    def _check(self) -> None:
        if self.edges is None:
            raise CalibrationError(
                "rule pcee is not calibrated: give it 'calibration: {name: pcee}' in the recipe (or call PCEECalibration().fit)"
            )

    def exit_allowed(self, exit_index: int) -> Tensor:
        """Bool per bin [bins] of exit ``exit_index``: accuracy >= delta and not sparse."""
        self._check()
        return (self.accuracy[exit_index] >= self.threshold) & (self.counts[exit_index] >= self.min_bin_count)

    # ---------------------------------------------------------------------------- inference
    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        self._check()
        confidence = self.scaled(view).softmax(-1).amax(-1)  # [rows]
        bins = bin_index(confidence, self.edges[view.exit_index])
        allowed = self.exit_allowed(view.exit_index).to(confidence.device)
        return allowed[bins]

    def reachable(self, delta: Optional[float] = None) -> bool:
        """Whether some internal exit has a (non-sparse) bin whose accuracy reaches ``delta``."""
        self._check()
        delta = self.threshold if delta is None else delta
        return any(
            bool(((self.accuracy[i] >= delta) & (self.counts[i] >= self.min_bin_count)).any())
            for i in range(len(self.edges) - 1)
        )

    @property
    def warning(self) -> Optional[str]:
        """Why this operating point cannot do what was asked (for the results row), or None."""
        if self.edges is None:
            return None
        notes = []
        if not self.reachable():
            notes.append(
                f"PCEE: no internal exit reaches delta={self.threshold:g} on the calibration split; "
                "every sample runs the full model (falls back to the full model)"
            )
        if self.final_accuracy is not None and self.final_accuracy < self.threshold:
            notes.append(
                f"PCEE: delta={self.threshold:g} is above the final exit's calibration accuracy "
                f"({self.final_accuracy:.4f}); the target accuracy cannot be met"
            )
        return "; ".join(notes) or None

    def default_sweep(self) -> list[float]:
        return [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9, 0.92, 0.94, 0.96, 0.98, 0.99]

    def describe(self) -> str:
        return f"pcee@delta={self.threshold:g}"

    # -------------------------------------------------------------------------------- saving
    def calibration_state(self) -> dict:
        if self.edges is None:
            return {"temperatures": self.temperatures}
        return {
            "temperatures": self.temperatures,
            "edges": [e.tolist() for e in self.edges],
            "accuracy": [a.tolist() for a in self.accuracy],
            "counts": [c.tolist() for c in self.counts],
            "final_accuracy": self.final_accuracy,
            "num_bins": self.num_bins,
            "binning": self.binning,
            "min_bin_count": self.min_bin_count,
            "smoothing": self.smoothing,
        }

    def load_calibration_state(self, state: dict) -> None:
        self.temperatures = state.get("temperatures")
        if "edges" not in state:
            return
        self.edges = [torch.tensor(e, dtype=torch.float32) for e in state["edges"]]
        self.accuracy = [torch.tensor(a, dtype=torch.float32) for a in state["accuracy"]]
        self.counts = [torch.tensor(c, dtype=torch.long) for c in state["counts"]]
        self.final_accuracy = state.get("final_accuracy")
        self.min_bin_count = int(state.get("min_bin_count", self.min_bin_count))
