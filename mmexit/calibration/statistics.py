"""Exit statistics on the calibration split: the one input every calibration reads.

Each task collects them once (text: every exit's logits; captioning: per generated token under
teacher forcing, where vocabulary-sized logits are kept only when they fit in memory) and every
calibration component implements ``fit(rule, stats: ExitStatistics)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from mmexit.calibration.temperature import exit_statistics
from mmexit.errors import CalibrationError


@dataclass
class ExitStatistics:
    """labels [N] (the notion of "correct" the task chose); exit_layers: 1-based layer of each exit;
    num_classes: classes (or vocabulary size); logits [M, N, C] or None when too large to hold;
    confidence / prediction [M, N]: max softmax and argmax without temperature (always set when
    ``logits`` is None)."""

    labels: Tensor
    exit_layers: list[int]
    num_classes: int
    logits: Optional[Tensor] = None
    confidence: Optional[Tensor] = None
    prediction: Optional[Tensor] = None

    @classmethod
    def from_logits(cls, logits: Tensor, labels: Tensor, exit_layers: Sequence[int]) -> "ExitStatistics":
        """Statistics of a split whose every exit's logits [M, N, C] are held, labels [N]."""
        return cls(labels, list(exit_layers), int(logits.shape[-1]), logits)

    @property
    def correct(self) -> Tensor:
        """[M, N] bool: each exit's (untempered) prediction equals the label."""
        return self.per_exit()[2]

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])

    def per_exit(self, temperatures: Optional[Sequence[float]] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Confidence [M, N] float, prediction [M, N] long, correct [M, N] bool (with temperatures)."""
        if self.logits is not None:
            return exit_statistics(self.logits, self.labels, temperatures)
        if temperatures is not None and any(abs(t - 1.0) > 1e-9 for t in temperatures):
            raise CalibrationError("calibration: temperatures need the exits' logits, which were too large to keep")
        return self.confidence, self.prediction, self.prediction == self.labels[None]

    def require_logits(self, who: str) -> Tensor:
        """All exits' logits, or one line saying why a calibration cannot have them."""
        if self.logits is None:
            raise CalibrationError(f"calibration {who}: needs all exits' logits, too large to hold for this "
                                   "vocabulary; calibrate on fewer samples (calibration.max_images)")
        return self.logits

    def require_classes(self, who: str) -> None:
        """Refuse regression heads and empty splits for calibrations that read class probabilities."""
        if self.num_classes < 2:
            raise CalibrationError(f"calibration {who}: needs class (or token) logits; regression heads are not supported")
        if self.num_samples == 0:
            raise CalibrationError(f"calibration {who}: the calibration split is empty")
