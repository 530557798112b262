"""THE active-rows exit loop: ask the rule, record the rows that stop, keep the rest aligned.

Every early-exit path uses it: the encoder forward (text), the Multi-Model cascade, the decoding
stepper (captioning, per generated token) and the simulated exits of sweeps and calibrations.
The caller runs its layers; at each exit it hands the exit's outputs for the rows still active to
``ActiveRows.ask``, which asks the rule, scatters the stopped rows' outputs back to their original
positions, subsets the rule state, and returns the mask of rows to keep (the caller drops the
others from its own tensors: hidden states, layer context, cache rows). ``finish`` at the last
exit stops every row still running.

With ``keep_all`` (the oracle decoding mode and simulated exits) no row leaves: the first exit
where the rule fired is recorded and the rows keep running.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, ExitView, check_state, subset_state


def decide_at_exit(rule: ExitRule, exit_index: int, num_exits: int, logits: Optional[Tensor],
                   hidden: Optional[Tensor], state: dict) -> Tensor:
    """The rule's stop mask [rows] at internal exit ``exit_index``; ``state`` (the rows' rule state)
    is updated in place and checked. logits [rows, classes] or None (rules that read none: then the
    view carries ``hidden`` [rows, width]); hidden is passed only to rules that read it."""
    needs_hidden = rule.needs_hidden or logits is None  # a view needs one of the two for its rows
    stop = rule.decide(ExitView(logits, exit_index, num_exits, hidden if needs_hidden else None), state)
    check_state(rule, state, stop.shape[0])
    return stop


class ActiveRows:
    """Book-keeping of one batch going through the exits of a model.

    rows: [active] original position of each active row; exit_index: [batch] exit each row stopped
    at (the last exit until it stops earlier); outputs: [batch, width] the outputs (logits) of each
    row's exit, allocated at the first exit that records any.
    """

    def __init__(self, rule: Optional[ExitRule], batch: int, num_exits: int, device: torch.device,
                 keep_all: bool = False) -> None:
        self.rule = rule
        self.num_exits = num_exits
        self.state = rule.start(batch, device) if rule is not None else {}
        if rule is not None:
            check_state(rule, self.state, batch)
        self.rows = torch.arange(batch, device=device)
        self.exit_index = torch.full((batch,), num_exits - 1, dtype=torch.long, device=device)
        self.outputs: Optional[Tensor] = None
        self.keep_all = keep_all
        self.undecided = torch.ones(batch, dtype=torch.bool, device=device) if keep_all else None
        self.batch = batch
        self.done = False
        #: original positions of the rows that stopped at the last ``ask`` (empty when none)
        self.stopped = self.rows[:0]

    @property
    def num_active(self) -> int:
        return int(self.rows.shape[0])

    def _record(self, rows: Tensor, outputs: Tensor, exit_index: int) -> None:
        if self.outputs is None:
            self.outputs = outputs.new_empty(self.batch, *outputs.shape[1:])
        self.outputs[rows] = outputs
        self.exit_index[rows] = exit_index

    def ask(self, exit_index: int, logits: Optional[Tensor], hidden: Optional[Tensor] = None,
            logits_of: Optional[Callable[[Tensor], Tensor]] = None) -> Optional[Tensor]:
        """Ask the rule at internal exit ``exit_index`` about the active rows.

        logits: [active, classes] (None for rules with ``needs_logits = False``: then
        ``logits_of(mask)`` computes them for the stopped rows only); hidden: [active, width] or None.
        Returns the bool mask [active] of rows to keep when some rows stopped, else None (nothing
        to drop). Sets ``done`` when no row is left.
        """
        stop = decide_at_exit(self.rule, exit_index, self.num_exits, logits, hidden, self.state)  # [active] bool
        if self.keep_all:
            newly = stop & self.undecided
            if bool(newly.any()):
                self._record(self.rows[newly], logits[newly] if logits is not None else logits_of(newly), exit_index)
                self.undecided &= ~stop
            self.stopped = self.rows[newly]
            return None
        if not bool(stop.any()):
            self.stopped = self.rows[:0]
            return None
        self.stopped = self.rows[stop]
        self._record(self.stopped, logits[stop] if logits is not None else logits_of(stop), exit_index)
        keep = ~stop
        self.rows = self.rows[keep]
        self.state = subset_state(self.state, keep)
        self.done = self.rows.numel() == 0
        return keep

    def finish(self, logits: Tensor) -> None:
        """The last exit: every row still running (every undecided row under ``keep_all``) stops here.

        logits: [active, classes] of the last exit for the active rows (all rows under ``keep_all``).
        """
        last = self.num_exits - 1
        if self.keep_all:
            self._record(self.rows[self.undecided], logits[self.undecided], last)
        elif self.rows.numel():
            self._record(self.rows, logits, last)
        self.done = True


def simulate_exits(rule: ExitRule, all_logits: Tensor, all_hidden: Optional[Tensor] = None) -> Tensor:
    """Exit index per row when every exit's logits are already known (a *simulated* exit).

    all_logits: [num_exits, rows, classes]; all_hidden: [num_exits, rows, hidden] or None.
    Returns: [rows] long, the first exit whose rule fired (the last exit when none did).
    Used for threshold sweeps and calibration; speed figures from it must be labelled simulated.
    """
    num_exits, rows = all_logits.shape[0], all_logits.shape[1]
    active = ActiveRows(rule, rows, num_exits, all_logits.device, keep_all=True)
    for index in range(num_exits - 1):
        hidden = None if all_hidden is None else all_hidden[index]
        active.ask(index, all_logits[index], hidden)
    return active.exit_index
