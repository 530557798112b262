"""Stateless confidence rules: max-prob (SWEET/PCEE's signal) and entropy (DeeBERT), plus never/always."""

from __future__ import annotations

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, ExitView, RuleState


class PerExitTemperature:
    """Mixin: optional per-exit temperatures T_i (set by temperature calibration, 1.0 when unset)."""

    temperatures: list[float] | None = None

    def scaled(self, view: ExitView) -> Tensor:
        """logits / T_i, as float32 [rows, classes]."""
        logits = view.logits.float()
        if self.temperatures is not None:
            logits = logits / self.temperatures[view.exit_index]
        return logits


class MaxProbRule(PerExitTemperature, ExitRule):
    """Exit when max softmax probability c_i >= threshold."""

    name = "maxprob"
    conservative_direction = "descending"

    def __init__(self, threshold: float = 0.9) -> None:
        super().__init__(threshold)

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        return self.scaled(view).softmax(-1).amax(-1) >= self.threshold

    def default_sweep(self) -> list[float]:
        return [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]

    def calibration_state(self) -> dict:
        return {"temperatures": self.temperatures}

    def load_calibration_state(self, state: dict) -> None:
        self.temperatures = state.get("temperatures")


class EntropyRule(PerExitTemperature, ExitRule):
    """DeeBERT: exit when the entropy of p_i (nats) < threshold."""

    name = "entropy"
    conservative_direction = "ascending"

    def __init__(self, threshold: float = 0.2) -> None:
        super().__init__(threshold)

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        log_p = self.scaled(view).log_softmax(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return entropy < self.threshold

    def default_sweep(self) -> list[float]:
        return [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]

    def calibration_state(self) -> dict:
        return {"temperatures": self.temperatures}

    def load_calibration_state(self, state: dict) -> None:
        self.temperatures = state.get("temperatures")


class NeverExitRule(ExitRule):
    """Never stops early: every row runs to the last exit (the full model through the exit path)."""

    name = "never"
    needs_probabilities = False

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        return torch.zeros(view.num_rows, dtype=torch.bool, device=view.device)

    def describe(self) -> str:
        return "never"


class FixedExitRule(ExitRule):
    """Every row stops at exit ``threshold`` (0-based): a static truncation through the exit path."""

    name = "fixed"
    needs_probabilities = False
    conservative_direction = "descending"

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        stop = view.exit_index >= int(self.threshold)
        return torch.full((view.num_rows,), stop, dtype=torch.bool, device=view.device)
