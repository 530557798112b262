"""PABEE: exit when the prediction stayed the same for ``patience`` consecutive exits."""

from __future__ import annotations

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, ExitView, RuleState


class PatienceRule(ExitRule):
    """Stop at exit i when yhat_i == yhat_{i-1} == ... for ``threshold`` (= patience) agreements.

    For regression (one output) two predictions agree when |y_i - y_{i-1}| < ``regression_tol``,
    as in PABEE's regression variant.
    """

    name = "patience"
    needs_probabilities = False
    conservative_direction = "descending"

    def __init__(self, threshold: float = 2, regression_tol: float = 0.1) -> None:
        super().__init__(threshold)
        self.regression_tol = float(regression_tol)

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        return {
            "previous": torch.full((batch_size,), float("nan"), device=device),
            "count": torch.zeros(batch_size, dtype=torch.long, device=device),
        }

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        logits = view.logits.float()
        if logits.shape[-1] == 1:
            current = logits[:, 0]
            same = (current - state["previous"]).abs() < self.regression_tol
        else:
            current = logits.argmax(-1).float()
            same = current == state["previous"]
        state["count"] = torch.where(same, state["count"] + 1, torch.zeros_like(state["count"]))
        state["previous"] = current
        return state["count"] >= int(self.threshold)

    def default_sweep(self) -> list[float]:
        return [1, 2, 3, 4, 5, 6, 8, 10]

    def describe(self) -> str:
        return f"patience@{int(self.threshold)}"
