"""What every serving engine shares: a bounded queue of requests, futures, one model thread, drain.

A request is a list of rows (texts, images); ``submit`` returns a ``concurrent.futures.Future``
that resolves to one output per row, in order. At most ``max_queue`` rows are accepted and not yet
answered (waiting or in flight), and with ``max_queue_wait`` no more than that many seconds of
work (queued rows / the engine's measured capacity, rows per busy second, decaying over ~10 s):
past either bound ``submit`` raises ``EngineFull`` at once (load shedding: a request the server
cannot answer in time is refused in a millisecond instead of timing out after holding a
connection). One background thread owns the model and runs ``_step`` (under
``torch.inference_mode``) while there is work.
Cancelling a future (a client timeout) drops the request's rows that have not run yet.
``stop(drain=True)`` refuses new requests (``EngineStopped``) and answers every accepted one first.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence

import torch

LOG = logging.getLogger("mmexit.serve")

#: hook(layer, rows): a layer call ran ``rows`` rows (layer 1-based; 0 = the embedding)
CallHook = Callable[[int, int], None]
#: hook(layer, rows): ``rows`` rows left at the exit after ``layer`` (1-based)
ExitHook = Callable[[int, int], None]


class EngineFull(Exception):
    """The bounded queue is full: retry after ``retry_after`` seconds (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = int(retry_after)


class EngineStopped(Exception):
    """The engine is draining or stopped and accepts no new request."""


class Request:
    """One submitted request: its rows, its future, and the outputs gathered so far."""

    __slots__ = ("items", "future", "outputs", "remaining", "taken", "submitted", "dead")

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)
        self.future: Future = Future()
        self.outputs: list[Any] = [None] * len(self.items)
        self.remaining = len(self.items)
        self.taken = 0  # rows handed to the model so far (a request may be split across calls)
        self.submitted = time.monotonic()
        self.dead = False  # cancelled or failed: its rows are dropped


class BaseEngine:
    """Queue, futures, thread and drain; subclasses implement ``_step`` (and ``_busy`` when they
    hold rows outside the pending queue)."""

    kind = "base"

    def __init__(self, max_batch: int = 32, max_queue: int = 1024, max_queue_wait: Optional[float] = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        self.max_queue_wait = max_queue_wait
        self.busy_rows, self.busy_seconds = 0.0, 0.0  # decaying totals behind ``capacity``
        self.pending: deque[Request] = deque()
        self.depth = 0  # rows accepted and not answered
        self.cond = threading.Condition()
        self.accepting = True  # requests may queue before start()
        self.stopping = False
        self.thread: Optional[threading.Thread] = None
        self.on_call: Optional[CallHook] = None
        self.on_exit: Optional[ExitHook] = None
        self.rows_done = 0
        self.error: Optional[BaseException] = None

    # ------------------------------------------------------------------ public
    def start(self) -> "BaseEngine":
        """Start the model thread (idempotent)."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name=f"mmexit-{self.kind}", daemon=True)
            self.thread.start()
        return self

    def submit(self, items: Sequence[Any]) -> Future:
        """Queue one request of ``items`` rows; a Future of the list of row outputs.

        Raises EngineFull when the rows would pass ``max_queue``, EngineStopped when draining."""
        request = self._accept(items)
        with self.cond:
            self.pending.append(request)
            self.cond.notify_all()
        return request.future

    def _accept(self, items: Sequence[Any]) -> Request:
        """Check ``items`` and the queue's bounds, count the rows in ``depth``: the admitted request.

        Raises ValueError (bad rows), EngineStopped (draining) or EngineFull (past a bound)."""
        if not items:
            raise ValueError("a request needs at least one row")
        self._check_items(items)
        request = Request(items)
        with self.cond:
            if not self.accepting:
                raise EngineStopped("the server is shutting down")
            capacity = self.capacity
            retry = max(1, min(30, math.ceil(self.depth / capacity))) if capacity else 1
            if self.depth + len(items) > self.max_queue:
                raise EngineFull(f"queue full ({self.depth} rows waiting, limit {self.max_queue})", retry)
            if self.max_queue_wait is not None and capacity:
                wait = (self.depth + len(items)) / capacity
                if wait > self.max_queue_wait:
                    raise EngineFull(f"about {wait:.1f} s of work queued ({self.depth} rows at {capacity:.0f} "
                                     f"rows/s; limit {self.max_queue_wait:g} s)", retry)
            self.depth += len(items)
        return request

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> bool:
        """Refuse new requests; with ``drain`` answer the accepted ones first. True when the thread ended."""
        with self.cond:
            self.accepting = False
            if drain:
                end = None if timeout is None else time.monotonic() + timeout
                while self.depth > 0 and self.thread is not None and self.thread.is_alive():
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self.cond.wait(0.05 if left is None else min(left, 0.05))
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout)
            alive = self.thread.is_alive()
        else:
            alive = False
        if not alive:
            stopped = EngineStopped("the server stopped before answering")
            with self.cond:
                for request in list(self.pending):
                    self._fail(request, stopped)
                self.pending.clear()
            self._fail_in_flight(stopped)
        return not alive

    @property
    def capacity(self) -> Optional[float]:
        """Rows answered per busy second lately (None until about half a second of work was seen)."""
        return self.busy_rows / self.busy_seconds if self.busy_seconds > 0.5 else None

    def _account(self, seconds: float, rows: int) -> None:
        """Record ``seconds`` of model work that answered ``rows`` rows (the model thread calls this)."""
        keep = math.exp(-seconds / 10.0)
        self.busy_rows = self.busy_rows * keep + rows
        self.busy_seconds = self.busy_seconds * keep + seconds

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def phase(self) -> str:
        """ready, starting (no model thread yet), draining (answering accepted requests, refusing new
        ones) or stopped; an engine in a worker process may also be restarting or failed."""
        if self.thread is None and not self.stopping:
            return "starting"
        if not self.alive or self.stopping:
            return "stopped"
        return "ready" if self.accepting else "draining"

    def describe(self) -> dict:
        return {"engine": self.kind, "max_batch": self.max_batch, "max_queue": self.max_queue,
                "max_queue_wait_s": self.max_queue_wait,
                "capacity_rows_per_s": None if self.capacity is None else round(self.capacity, 1)}

    # ------------------------------------------------------------ for subclasses
    def _check_items(self, items: Sequence[Any]) -> None:
        """Raise ValueError for rows the engine cannot run (called in the submitting thread)."""

    def _setup(self) -> None:
        """Runs first in the model thread (allocate pools there)."""

    def _busy(self) -> bool:
        """Rows held outside ``pending`` (in flight). Called under the lock."""
        return False

    def _step(self) -> None:
        raise NotImplementedError

    def _take(self, limit: int) -> list[tuple[Request, int]]:
        """Up to ``limit`` (request, row) pairs from the head of the queue, in order. Call under the lock."""
        taken: list[tuple[Request, int]] = []
        while self.pending and len(taken) < limit:
            request = self.pending[0]
            if request.dead or request.future.cancelled():
                self.pending.popleft()
                self._drop(request)
                continue
            count = min(limit - len(taken), len(request.items) - request.taken)
            taken += [(request, request.taken + i) for i in range(count)]
            request.taken += count
            if request.taken == len(request.items):
                self.pending.popleft()
        return taken

    def _pending_rows(self) -> int:
        return sum(len(r.items) - r.taken for r in self.pending)

    def _answer(self, request: Request, row: int, output: Any) -> None:
        """Record one row's output; resolve the future when the request is complete."""
        if request.dead:
            return
        request.outputs[row] = output
        request.remaining -= 1
        self.rows_done += 1
        if request.remaining == 0:
            with self.cond:
                self.depth -= len(request.items)
                self.cond.notify_all()
            request.dead = True
            if not request.future.cancelled():
                try:
                    request.future.set_result(request.outputs)
                except Exception:  # cancelled between the test and the call
                    pass

    def _drop(self, request: Request) -> None:
        """Forget a cancelled request (its unanswered rows no longer count in the queue)."""
        if request.dead:
            return
        request.dead = True
        with self.cond:
            self.depth -= len(request.items)
            self.cond.notify_all()

    def _fail(self, request: Request, error: BaseException) -> None:
        if request.dead:
            return
        self._drop(request)
        if not request.future.cancelled():
            try:
                request.future.set_exception(error)
            except Exception:
                pass

    def _fail_in_flight(self, error: BaseException) -> None:
        """A step raised: subclasses fail the requests whose rows they hold."""

    # -------------------------------------------------------------------- thread
    def _loop(self) -> None:
        with torch.inference_mode():
            self._setup()
            while True:
                with self.cond:
                    while not self.stopping and not self.pending and not self._busy():
                        self.cond.wait(0.5)
                    if self.stopping:  # stop() drained first when asked to
                        return
                try:
                    self._step()
                except Exception as error:  # never let one bad batch kill the server
                    LOG.exception("engine step failed")
                    self.error = error
                    self._fail_in_flight(error)
