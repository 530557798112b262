"""Continuous batching at layer granularity: schedule -> run one layer -> update, for any model.

``ContinuousCore`` owns a ``SlotPool``, the rows waiting for a slot (FIFO) and a ``Scheduler``;
the model-specific work is a *runner* (``LayerRunner``): the encoder-layer runner
(``encoder_layer_runner``, text classification) and the decoder-layer runner
(``decoder_layer_runner``, captions with a K/V cache). One step:
  1. ``scheduler.schedule`` picks a layer and its rows; before a layer-0 call it admits waiting rows
     into free slots (``runner.admit``: embeddings, cache constants, the rule's start state);
  2. rows whose owner ``keep`` refuses (a cancelled request) are dropped unrun;
  3. ``runner.run(layer, rows)`` runs the layer on those rows and says which go on, which re-enter
     layer 0 and which finished (``Outcome``);
  4. ``scheduler.update`` requeues them; finished rows free their slots and their results wait in
     ``results`` ({row id: result}) for the caller.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any, Callable, Optional, Protocol, Sequence

from mmexit.inference.scheduler import Chooser, Outcome, Scheduler, SchedulerSettings
from mmexit.inference.slot_pool import SlotPool

#: upcoming(n) -> the items of the first n rows still waiting for a slot (read only)
Upcoming = Callable[[int], list[Any]]


class LayerRunner(Protocol):
    """The model-specific part of continuous batching (per-slot buffers, one layer call, the exits)."""

    num_layers: int

    def accept(self, items: Sequence[Any]) -> list[Any]:
        """Check submitted items (raise ValueError for ones the model cannot run); the items to queue."""

    def admit(self, slots: list[int], items: list[Any], upcoming: Upcoming) -> None:
        """Rows ``items`` take ``slots``; ``upcoming`` shows the rows waiting behind them."""

    def run(self, layer: int, rows: list[int]) -> Outcome:
        """Layer ``layer`` (0-based) on the rows of ``rows`` (slots), then its exit if it has one."""

    def release(self, slot: int) -> None:
        """Forget the row of ``slot`` (dropped before it finished)."""


class ContinuousCore:
    """Rows of any origin share one pool of ``slots`` slots and layer calls (module doc).

    runner: the ``LayerRunner``; settings: the scheduler's (``SchedulerSettings``); choose: the rows of a
    call when a queue holds more than ``max_call`` (default: the oldest); keep(row id): False drops the
    row before its next call (its request was cancelled).
    """

    def __init__(self, runner: LayerRunner, slots: int, settings: SchedulerSettings = SchedulerSettings(),
                 choose: Optional[Chooser] = None, keep: Optional[Callable[[int], bool]] = None) -> None:
        self.runner = runner
        self.pool = SlotPool(slots)
        self.scheduler = Scheduler(runner.num_layers, settings, choose)
        self.keep = keep
        self.waiting: deque[tuple[int, Any]] = deque()  # (row id, item) waiting for a slot
        self.results: dict[int, Any] = {}  # row id -> result, once finished
        self.next_id = 0
        self.row_layers = 0  # row x layer computations so far (the rows of every call)

    # ------------------------------------------------------------------ state
    @property
    def calls(self) -> int:
        """Layer calls so far."""
        return self.scheduler.calls

    @property
    def in_flight(self) -> int:
        """Slots taken."""
        return self.pool.in_flight

    @property
    def room(self) -> int:
        """Free slots no waiting row will take: how many more rows could start now."""
        return self.pool.free_count - len(self.waiting)

    @property
    def busy(self) -> bool:
        """True while a row waits for a slot or is in flight."""
        return bool(self.waiting) or self.scheduler.busy

    def owners(self) -> list[int]:
        """Row ids waiting or in flight."""
        return [row for row, _ in self.waiting] + [self.pool.owner[slot] for slot in self.pool.taken()]

    # ------------------------------------------------------------------ the loop
    def submit(self, items: Sequence[Any]) -> list[int]:
        """Queue rows (``runner.accept`` checks them); their row ids."""
        accepted = self.runner.accept(items)
        ids = list(range(self.next_id, self.next_id + len(accepted)))
        self.next_id += len(ids)
        self.waiting.extend(zip(ids, accepted))
        return ids

    def step(self) -> bool:
        """One scheduling decision and one layer call; False when there was nothing to do."""
        admissible = min(self.pool.free_count, len(self.waiting))
        batch = self.scheduler.schedule(admissible, self._admit)
        if batch is None:
            return False
        rows = batch.rows
        if self.keep is not None:
            rows = [slot for slot in rows if self._kept(slot)]
        outcome = self.runner.run(batch.layer, rows) if rows else Outcome(batch.layer)
        self.scheduler.update(outcome)
        self.row_layers += outcome.ran
        for slot, result in outcome.finished:
            self.results[self.pool.release(slot)] = result
        return True

    def run(self) -> dict[int, Any]:
        """Step until every submitted row finished; ``results``."""
        while self.step():
            pass
        return self.results

    def _admit(self, count: int) -> list[int]:
        """The first ``count`` waiting rows take free slots (``runner.admit``); their slots."""
        taken = [self.waiting.popleft() for _ in range(count)]
        slots = self.pool.take([row for row, _ in taken])
        self.runner.admit(slots, [item for _, item in taken], self._upcoming)
        return slots

    def _upcoming(self, count: int) -> list[Any]:
        return [item for _, item in islice(self.waiting, count)]

    def _kept(self, slot: int) -> bool:
        if self.keep(self.pool.owner[slot]):
            return True
        self.runner.release(slot)
        self.pool.release(slot)
        return False
