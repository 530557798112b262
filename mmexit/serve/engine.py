"""The layer-level continuous-batching text engine: rows of many requests share one pool of slots.

``ContinuousEngine`` is the serving side of ``mmexit.inference.continuous_core.ContinuousCore`` over
the encoder-layer runner (``mmexit.inference.encoder_layer_runner``): the request queue, futures,
admission bounds and drain of ``BaseEngine``, and a model thread that hands queued rows to the core
as slots free up, runs one scheduling decision and one layer call per step, and answers the rows
that left at an exit. Each call runs one layer on up to ``max_batch`` rows of one layer's queue,
whichever requests they came from; a row that exits frees its slot at once.

Scheduler (``mmexit.inference.scheduler``, the one the continuous caption decoder uses too): an age
bound in layer calls (``max_wait_calls``, default twice the model's layers) so no row starves, else
the queue with the most waiting rows weighted toward deeper layers plus the rows they would join one
layer deeper. Each step hands at most ``max_batch`` queued rows to the core; they are embedded just
before a layer-0 call, up to 4 x ``max_batch`` waiting at layer 0 with ``group_lengths`` (the
default), and a call of a longer queue takes the oldest row and the rows nearest to it in length
(least padding). Each row's label, exit layer and probabilities equal
``early_exit_forward`` on the row alone up to float noise (tests/serve/test_engine.py).
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

from mmexit.exits.base import ExitRule
from mmexit.inference.continuous_core import ContinuousCore
from mmexit.inference.encoder_layer_runner import EncoderLayerRunner
from mmexit.inference.scheduler import SchedulerSettings
from mmexit.models.encoder import MultiExitEncoder
from mmexit.serve.engine_base import BaseEngine, EngineFull, EngineStopped, Request

__all__ = ["ContinuousEngine", "EngineFull", "EngineStopped"]


class ContinuousEngine(BaseEngine):
    """Continuous batching at layer granularity for a ``MultiExitEncoder`` and an exit rule.

    max_batch: rows per layer call; slots: rows in flight (default 8 x max_batch); max_length:
    tokens per row (the run's ``model.max_length``); max_wait_calls: the age bound of a queue in
    layer calls (None: twice the model's layers); group_lengths: let calls group rows of similar
    length (see the module doc); max_queue_wait: refuse requests past this many seconds of queued
    work (``BaseEngine``).
    """

    kind = "continuous"

    def __init__(self, model: MultiExitEncoder, rule: ExitRule, max_length: int, max_batch: int = 32,
                 max_queue: int = 1024, slots: Optional[int] = None, max_wait_calls: Optional[int] = None,
                 pad_id: int = 0, group_lengths: bool = True, max_queue_wait: Optional[float] = None) -> None:
        super().__init__(max_batch, max_queue, max_queue_wait)
        self.model, self.rule = model, rule
        self.max_length, self.pad_id = int(max_length), int(pad_id)
        self.slots = int(slots or 8 * max_batch)
        if self.slots < self.max_batch:
            raise ValueError(f"slots ({self.slots}) must be >= max_batch ({self.max_batch})")
        self.group_lengths = bool(group_lengths)
        # rows admitted ahead at layer 0: more candidates let a call group rows of similar length
        ahead = min(4 * self.max_batch, self.slots) if self.group_lengths else self.max_batch
        self.settings = SchedulerSettings(max_wait=max_wait_calls, max_call=self.max_batch, admit_ahead=ahead)
        self.owners: dict[int, tuple[Request, int]] = {}  # core row id -> (request, row)
        self.core = self._new_core()

    def _new_core(self) -> ContinuousCore:
        runner = EncoderLayerRunner(self.model, self.rule, self.max_length, self.slots, self.max_batch, self.pad_id,
                                    self._called, self._exited)
        return ContinuousCore(runner, self.slots, self.settings, runner.choose if self.group_lengths else None,
                              self._keep)

    def describe(self) -> dict:
        return super().describe() | {"slots": self.slots, "max_wait_calls": self.core.scheduler.max_wait,
                                     "group_lengths": self.group_lengths}

    @property
    def in_flight(self) -> int:
        return self.core.in_flight

    # ---------------------------------------------------------------- the model thread
    def _check_items(self, items: Sequence[Any]) -> None:
        self.core.runner.accept(items)

    def _busy(self) -> bool:
        return self.core.busy

    def _step(self) -> None:
        start, done = time.perf_counter(), self.rows_done
        core = self.core
        room = min(core.room, self.max_batch)  # a call's worth of rows per step: calls of one split do not
        if room > 0:                            # depend on how the same rows were split into requests
            with self.cond:
                taken = self._take(room)
            if taken:
                ids = core.submit([request.items[row] for request, row in taken])
                self.owners.update(zip(ids, taken))
        core.step()
        finished = list(core.results.items())
        core.results.clear()
        for row_id, output in finished:
            request, row = self.owners.pop(row_id)
            self._answer(request, row, output)
        self._account(time.perf_counter() - start, self.rows_done - done)

    def _keep(self, row_id: int) -> bool:
        """False (and the request forgotten) for a row of a cancelled or failed request."""
        request, _ = self.owners[row_id]
        if request.dead or request.future.cancelled():
            self._drop(request)
            del self.owners[row_id]
            return False
        return True

    def _called(self, layer: int, rows: int) -> None:
        if self.on_call:
            self.on_call(layer, rows)

    def _exited(self, layer: int, rows: int) -> None:
        if self.on_exit:
            self.on_exit(layer, rows)

    def _fail_in_flight(self, error: BaseException) -> None:
        """Fail every request with a row waiting for a slot or in flight, and start a fresh pool."""
        held = self.core.owners()
        if not held and not self.core.busy:  # nothing in flight (e.g. a drained stop)
            return
        for row_id in held:
            owner = self.owners.pop(row_id, None)
            if owner is not None:
                self._fail(owner[0], error)
        self.owners = {}
        self.core = self._new_core()  # its slots and queues may be half-updated
