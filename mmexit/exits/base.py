"""The interface every exit rule implements, shared by the text and the captioning paths.

A rule is asked, exit after exit, which rows of the batch stop here. It may keep per-row state
across the exits of one forward pass (patience counters, BEEM scores, previous predictions): the
state is a dict of tensors whose first dimension is the batch, so the inference loop can drop the
rows that exited with ``subset_state`` and keep the rest aligned.

For captioning the "batch" is the set of sequences (or beams) still decoding at one token step;
``start`` is called once per step, so state never leaks from one token to the next.

The last exit always stops every row; the inference loop enforces that, rules need not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

RuleState = dict[str, Tensor]


@dataclass
class ExitView:
    """What a rule may read at one exit, for the rows still active.

    logits: [rows, classes] (or [rows, vocab] for captioning), raw, before any temperature;
        None only for rules with ``needs_logits = False``.
    hidden: [rows, hidden] the representation the exit head read (CLS/pooled or current token),
        or None when the caller does not provide it.
    exit_index: 0-based position of this exit in the model's exit list.
    num_exits: how many exits the model has (the last one is ``num_exits - 1``).
    """

    logits: Optional[Tensor]
    exit_index: int
    num_exits: int
    hidden: Optional[Tensor] = None

    @property
    def num_rows(self) -> int:
        return (self.logits if self.logits is not None else self.hidden).shape[0]

    @property
    def device(self) -> torch.device:
        return (self.logits if self.logits is not None else self.hidden).device


class ExitRule:
    """Base class. Subclasses override ``decide`` and, when stateful, ``start``.

    ``threshold`` is the rule's operating point (what a sweep varies). Rules with per-exit
    parameters set by a calibration expose them as attributes and document them.
    """

    name: str = "rule"
    #: True for rules whose decisions need a calibration stage before they mean anything.
    needs_calibration: bool = False
    #: True for rules that read ``ExitView.hidden``.
    needs_hidden: bool = False
    #: False for rules that never read ``ExitView.logits``: the caption decoder then computes an
    #: exit's logits (norm + LM head over the vocabulary) only for the rows that stop there.
    needs_logits: bool = True
    #: True for rules that read class probabilities (softmax over the logits): they cannot serve a
    #: regression head (one output).
    needs_probabilities: bool = True
    #: which way the operating point moves towards the full model: "descending" when a *higher*
    #: threshold is more conservative (max-prob), "ascending" when a *lower* one is (entropy), None
    #: when unknown. Learn-then-Test walks a grid from the conservative end.
    conservative_direction: Optional[str] = None
    #: why this operating point cannot do what was asked (for the results row), or None; rules and
    #: calibrations set it, rows copy it.
    warning: Optional[str] = None

    def __init__(self, threshold: float = 0.0) -> None:
        self.threshold = float(threshold)

    def start(self, batch_size: int, device: torch.device) -> RuleState:
        """Fresh per-row state for a batch of ``batch_size`` rows (empty for stateless rules).

        Every tensor of the state has ``batch_size`` rows; ``check_state`` enforces it."""
        return {}

    def decide(self, view: ExitView, state: RuleState) -> Tensor:
        """Return a bool mask [rows] of rows that stop at this exit; may update ``state`` in place."""
        raise NotImplementedError

    def with_threshold(self, threshold: float) -> "ExitRule":
        """A copy of this rule at another operating point (calibrated parameters are kept)."""
        import copy

        clone = copy.copy(self)
        clone.threshold = float(threshold)
        return clone

    def default_sweep(self) -> list[float]:
        """Operating points a sweep tries when the recipe gives none."""
        return [self.threshold]

    def describe(self) -> str:
        """A short label of the rule and its operating point for tables and plots."""
        return f"{self.name}@{self.threshold:g}"

    def calibration_state(self) -> dict:
        """JSON-serialisable parameters set by a calibration (saved into the output folder)."""
        return {}

    def load_calibration_state(self, state: dict) -> None:
        """Restore what ``calibration_state`` returned."""


def check_state(rule: ExitRule, state: RuleState, rows: int) -> None:
    """Fail loudly when a rule's state is not aligned with the ``rows`` active rows."""
    for key, value in state.items():
        if value.shape[0] != rows:
            raise RuntimeError(
                f"rule {rule.name}: state '{key}' has {value.shape[0]} rows, the batch has {rows} "
                "(state must be created in start() with one row per batch row)"
            )


def subset_state(state: RuleState, keep: Tensor) -> RuleState:
    """Keep the rows ``keep`` (bool mask [rows] or long index tensor [k]) of every state tensor."""
    if keep.dtype == torch.long:  # index_select: cheaper than advanced indexing for a few rows
        return {key: value.index_select(0, keep) for key, value in state.items()}
    return {key: value[keep] for key, value in state.items()}
