"""CALM's hidden-state saturation: exit when consecutive exits' hidden states barely change.

At exit i (i >= 1) the rule compares the hidden state the exit read with the one the previous
exit read, ``cos(h_i, h_{i-1})``, and stops the row when it is >= ``threshold``. The first exit
has nothing to compare with and never stops (so with exits after every layer the earliest
possible stop is layer 2). No calibration; no logits are read (``needs_logits = False``), so the
caption decoder computes an exit's logits only for the rows that stop there: with a 50k-token
vocabulary an exit head costs several decoder layers.

Reads ``ExitView.hidden`` ([rows, hidden]); it raises when the caller provides none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmexit.exits.base import ExitRule, ExitView, RuleState


class SaturationRule(ExitRule):
    """Stop when cosine(h_i, h_{i-1}) >= threshold (CALM's "state propagation" confidence)."""

    name = "saturation"
    needs_hidden = True
    needs_logits = False
    needs_probabilities = False
    conservative_direction = "descending"

    def __init__(self, threshold: float = 0.95) -> None:
        super().__init__(threshold)

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        # the previous exit's hidden state per row; width 0 until the first exit fills it
        return {"previous": torch.zeros(batch_size, 0, device=device)}

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        if view.hidden is None:
            raise ValueError("rule saturation reads hidden states: the caller must pass ExitView.hidden")
        hidden = view.hidden.float()  # [rows, hidden]
        previous = state["previous"]
        if previous.shape[0] != hidden.shape[0]:
            raise RuntimeError(f"rule saturation: state has {previous.shape[0]} rows, the exit {hidden.shape[0]}")
        state["previous"] = hidden
        if previous.shape[1] == 0:  # the first exit has nothing to compare with
            return torch.zeros(hidden.shape[0], dtype=torch.bool, device=hidden.device)
        return F.cosine_similarity(hidden, previous, dim=-1) >= self.threshold

    def default_sweep(self) -> list[float]:
        return [0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
