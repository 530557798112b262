"""COSEE's exit signal: normalised energy, E_norm = sigmoid(-logsumexp(z)); exit when E_norm < tau.

Low energy means a confident exit (the logits are large somewhere). The official COSEE code
evaluates ``1 / (1 + exp(logsumexp))`` through ``exp``/``pow`` and overflows for large logits;
mmexit computes ``sigmoid(-logsumexp(z))`` with ``torch.logsumexp`` and ``torch.sigmoid``, which
are stable for any finite logits (E_norm underflows gracefully to 0 instead of producing nan).
"""

from __future__ import annotations

from torch import Tensor

from mmexit.exits.base import ExitRule, ExitView, RuleState
from mmexit.exits.confidence import PerExitTemperature


def normalized_energy(logits: Tensor) -> Tensor:
    """E_norm = sigmoid(-logsumexp(z)) over the last dim: [..., C] -> [...] in (0, 1), float32."""
    return (-logits.float().logsumexp(-1)).sigmoid()


class EnergyRule(PerExitTemperature, ExitRule):
    """COSEE: exit when the normalised energy of exit i's logits (/ T_i when set) is < threshold."""

    name = "energy"
    conservative_direction = "ascending"

    def __init__(self, threshold: float = 0.05) -> None:
        super().__init__(threshold)

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        return normalized_energy(self.scaled(view)) < self.threshold

    def default_sweep(self) -> list[float]:
        return [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5]

    def calibration_state(self) -> dict:
        return {"temperatures": self.temperatures}

    def load_calibration_state(self, state: dict) -> None:
        self.temperatures = state.get("temperatures")
