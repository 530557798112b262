"""The engines in a process of their own (``mmexit serve --engine-process``).

Why: in one process the HTTP event loop and the model thread share one interpreter lock and, on a
small machine, one core's worth of time. Under overload the model thread wins, the event loop
accepts and refuses requests slowly, and requests pile up in the kernel's accept backlog, where
no queue bound sees them (docs/results/serving.md). With ``--engine-process`` the model runs in a
worker process (``spawn``): the HTTP process only parses, admits or refuses (503 at once, from
its own bounded queue) and forwards rows over a pipe.

- ``EngineProcess`` starts the worker, which loads the run again (``mmexit.serve.load``), builds
  the same engines (``build_service`` with the same arguments) and answers ``submit`` messages; a
  sender thread and a receiver thread in the HTTP process move pickled messages.
- ``ProcessEngine`` is one engine's stand-in in the HTTP process: the same ``BaseEngine`` interface
  and bounds (``max_queue`` rows, ``max_queue_wait`` seconds of work at the worker's measured
  capacity), futures resolved from the worker's answers, cancellation forwarded (a request that
  timed out is dropped in the worker too), the worker's layer-call and exit counts replayed into
  the metrics hooks.
- Drain: ``stop(drain=True)`` refuses new requests, waits for the accepted ones, then the worker
  drains and exits. If the worker dies, every request waiting on it fails with ``EngineStopped``
  (503) and ``alive`` turns False (``/health`` 503).
Outputs are the worker engines' outputs, unchanged (pickled), so answers equal the in-process engines'.
"""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
import queue
import threading
import time
from typing import Any, Optional, Sequence

from mmexit.errors import MMExitError
from mmexit.serve.engine_base import BaseEngine, EngineFull, EngineStopped, Request

#: seconds the HTTP process waits for the worker to load the run and report ready
START_TIMEOUT = 300.0
#: seconds between the worker's reports of layer calls and exits not yet sent with an answer
STATS_EVERY = 0.2


def _dumps(message: Any) -> bytes:
    # plain pickle: tensors travel as bytes, not as shared-memory handles (no file descriptor per tensor)
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


# ------------------------------------------------------------------------------------ the worker
def worker_main(connection, run_dir: str, rule: Optional[str], device: Optional[str], threads: Optional[int],
                build: dict) -> None:
    """The worker process: load the run, build its engines, answer messages until told to stop.

    Messages in: ("submit", id, engine, items), ("cancel", id), ("stop", drain, timeout).
    Messages out: ("ready", {engine: kind}) or ("start_failed", message); ("done", id, outputs, stats),
    ("failed", id, kind, message, retry_after, stats); ("stats", stats) every ``STATS_EVERY`` s while
    events wait; ("stopped", all_stopped).
    stats: {engine: (busy_rows, busy_seconds, calls [(layer, rows)], exits [(layer, rows)])}.
    """
    import torch

    from mmexit.serve.load import load
    from mmexit.serve.service import build_service

    try:
        if threads:
            torch.set_num_threads(int(threads))
        service = build_service(load(run_dir, rule=rule, device=device), **build)
    except Exception as error:  # a bad run folder was caught by the HTTP process already; this is the rest
        connection.send_bytes(_dumps(("start_failed", f"{error.__class__.__name__}: {error}")))
        return
    send_lock, events_lock = threading.Lock(), threading.Lock()
    events = {name: ([], []) for name in service.engines}
    for name, engine in service.engines.items():
        calls, exits = events[name]
        engine.on_call = lambda layer, rows, calls=calls: calls.append((layer, rows))
        engine.on_exit = lambda layer, rows, exits=exits: exits.append((layer, rows))

    def stats() -> dict:
        with events_lock:
            out = {}
            for name, engine in service.engines.items():
                calls, exits = events[name]
                out[name] = (engine.busy_rows, engine.busy_seconds, calls[:], exits[:])
                calls.clear()
                exits.clear()
            return out

    def send(message: tuple) -> None:
        data = _dumps(message)
        with send_lock:
            try:
                connection.send_bytes(data)
            except (BrokenPipeError, OSError):  # the HTTP process is gone: nothing to answer
                pass

    futures: dict[int, Any] = {}

    def answer(request_id: int, future) -> None:
        futures.pop(request_id, None)
        if future.cancelled():
            return
        error = future.exception()
        if error is None:
            send(("done", request_id, future.result(), stats()))
        else:
            send(("failed", request_id, error.__class__.__name__, str(error), getattr(error, "retry_after", 1), stats()))

    def flush_events() -> None:  # exits recorded after a request's answer went out reach the metrics too
        while True:
            time.sleep(STATS_EVERY)
            with events_lock:
                waiting = any(calls or exits for calls, exits in events.values())
            if waiting:
                send(("stats", stats()))

    service.start()
    threading.Thread(target=flush_events, name="mmexit-engine-stats", daemon=True).start()
    send(("ready", {name: engine.kind for name, engine in service.engines.items()}))
    while True:
        try:
            message = pickle.loads(connection.recv_bytes())
        except (EOFError, OSError):  # the HTTP process is gone: stop without draining
            service.stop(drain=False, timeout=5.0)
            return
        kind = message[0]
        if kind == "submit":
            _, request_id, name, items = message
            try:
                future = service.engines[name].submit(items)
            except Exception as error:
                send(("failed", request_id, error.__class__.__name__, str(error), getattr(error, "retry_after", 1),
                      stats()))
                continue
            futures[request_id] = future
            future.add_done_callback(lambda f, request_id=request_id: answer(request_id, f))
        elif kind == "cancel":
            future = futures.pop(message[1], None)
            if future is not None:
                future.cancel()
        elif kind == "stop":
            stopped = service.stop(drain=bool(message[1]), timeout=message[2])
            send(("stopped", stopped))
            return


# ---------------------------------------------------------------------------- the HTTP process
class EngineProcess:
    """The worker process and the two threads that talk to it; ``engines`` are its stand-ins."""

    def __init__(self, run_dir: str, rule: Optional[str], device: Optional[str], threads: Optional[int],
                 build: dict) -> None:
        self.run_dir, self.rule, self.device, self.threads = str(run_dir), rule, device, threads
        self.build = dict(build)
        self.kinds: dict[str, str] = {}
        self.engines: dict[str, ProcessEngine] = {}
        self.requests: dict[int, tuple[ProcessEngine, Request]] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.outbox: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self.process = None
        self.connection = None
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.start_error: Optional[str] = None
        self.threads_started = False

    def start(self, engine_names: Sequence[str]) -> None:
        """Spawn the worker and wait until its engines are built (raises MMExitError when it fails)."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        self.connection = parent
        self.process = context.Process(target=worker_main, name="mmexit-engine", daemon=True,
                                       args=(child, self.run_dir, self.rule, self.device, self.threads, self.build))
        self.process.start()
        child.close()
        threading.Thread(target=self._receive, name="mmexit-engine-receive", daemon=True).start()
        threading.Thread(target=self._send_loop, name="mmexit-engine-send", daemon=True).start()
        answered = self.ready.wait(START_TIMEOUT)
        if not answered or self.start_error or not self.kinds:
            self.process.join(1.0)
            code = self.process.exitcode
            self.process.kill()
            reason = self.start_error or ("no answer in time" if not answered else f"it exited with code {code}")
            raise MMExitError(f"the engine process did not start: {reason}")
        for name in engine_names:
            if name not in self.kinds:
                raise MMExitError(f"the engine process has no engine {name!r} (it has {', '.join(self.kinds)})")

    # ------------------------------------------------------------------ messages
    def send(self, message: tuple) -> None:
        self.outbox.put(_dumps(message))

    def _send_loop(self) -> None:
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.connection.send_bytes(data)
            except (BrokenPipeError, OSError):
                return

    def _receive(self) -> None:
        while True:
            try:
                message = pickle.loads(self.connection.recv_bytes())
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "ready":
                self.kinds = message[1]
                self.ready.set()
            elif kind == "start_failed":
                self.start_error = message[1]
                self.ready.set()
                break
            elif kind == "stats":
                self._replay(message[1])
            elif kind == "done":
                _, request_id, outputs, stats = message
                self._replay(stats)
                self._settle(request_id, outputs, None)
            elif kind == "failed":
                _, request_id, name, text, retry_after, stats = message
                self._replay(stats)
                error = {"EngineFull": lambda: EngineFull(text, retry_after),
                         "EngineStopped": lambda: EngineStopped(text)}.get(name, lambda: RuntimeError(f"{name}: {text}"))()
                self._settle(request_id, None, error)
            elif kind == "stopped":
                break
        self.stopped.set()
        self.ready.set()
        self.outbox.put(None)
        with self.lock:
            waiting, self.requests = list(self.requests.values()), {}
        gone = EngineStopped("the engine process stopped before answering")
        for engine, request in waiting:
            engine._fail(request, gone)

    def _replay(self, stats: dict) -> None:
        for name, (busy_rows, busy_seconds, calls, exits) in stats.items():
            engine = self.engines.get(name)
            if engine is None:
                continue
            engine.busy_rows, engine.busy_seconds = busy_rows, busy_seconds
            if engine.on_call is not None:
                for layer, rows in calls:
                    engine.on_call(layer, rows)
            if engine.on_exit is not None:
                for layer, rows in exits:
                    engine.on_exit(layer, rows)

    def _settle(self, request_id: int, outputs: Optional[list], error: Optional[BaseException]) -> None:
        with self.lock:
            entry = self.requests.pop(request_id, None)
        if entry is None:  # cancelled meanwhile
            return
        engine, request = entry
        if error is not None:
            engine._fail(request, error)
            return
        request.outputs = list(outputs)
        request.remaining = 0
        engine._complete(request)

    # ------------------------------------------------------------------ requests
    def submit(self, engine: "ProcessEngine", request: Request) -> None:
        request_id = next(self.ids)
        with self.lock:
            if self.stopped.is_set():
                raise EngineStopped("the engine process is not running")
            self.requests[request_id] = (engine, request)
        request.future.add_done_callback(lambda f: self._cancelled(request_id) if f.cancelled() else None)
        self.send(("submit", request_id, engine.name, request.items))

    def _cancelled(self, request_id: int) -> None:
        with self.lock:
            entry = self.requests.pop(request_id, None)
        if entry is not None:
            entry[0]._drop(entry[1])
            self.send(("cancel", request_id))

    def release(self, engine: "ProcessEngine", drain: bool, timeout: Optional[float]) -> bool:
        """One stand-in stopped; when all have, stop the worker (draining it). True when it exited."""
        engine.released = True
        if not all(e.released for e in self.engines.values()):
            return True
        if self.process is None:
            return True
        if not self.stopped.is_set():
            self.send(("stop", drain, timeout))
            self.stopped.wait(None if timeout is None else timeout + 5.0)
        self.process.join(5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5.0)
        return not self.process.is_alive()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive() and not self.stopped.is_set()


class ProcessEngine(BaseEngine):
    """One engine of the worker process, seen from the HTTP process (same interface as ``BaseEngine``).

    The bounded queue is kept here: ``submit`` refuses past ``max_queue`` rows or ``max_queue_wait``
    seconds of work (the capacity the worker measures) without a round trip to the worker."""

    def __init__(self, host: EngineProcess, name: str, kind: str, max_batch: int, max_queue: int,
                 max_queue_wait: Optional[float]) -> None:
        super().__init__(max_batch, max_queue, max_queue_wait)
        self.host, self.name, self.kind = host, name, kind
        self.released = False

    def start(self) -> "ProcessEngine":
        return self  # the worker starts its engines itself

    def submit(self, items: Sequence[Any]):
        request = self._accept(items)
        try:
            self.host.submit(self, request)
        except EngineStopped:
            self._drop(request)
            raise
        return request.future

    def _complete(self, request: Request) -> None:
        """Every row answered (outputs set): resolve the future, release the rows' queue room."""
        if request.dead:
            return
        request.dead = True
        self.rows_done += len(request.items)
        with self.cond:
            self.depth -= len(request.items)
            self.cond.notify_all()
        if not request.future.cancelled():
            try:
                request.future.set_result(request.outputs)
            except Exception:  # cancelled between the test and the call
                pass

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> bool:
        with self.cond:
            self.accepting = False
            if drain:
                end = None if timeout is None else time.monotonic() + timeout
                while self.depth > 0 and self.host.alive:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self.cond.wait(0.05 if left is None else min(left, 0.05))
            self.stopping = True
        return self.host.release(self, drain, timeout)

    @property
    def alive(self) -> bool:
        return self.host.alive and not self.stopping

    def describe(self) -> dict:
        return super().describe() | {"engine_process": True}


def process_engines(run_dir: str, rule: Optional[str], device: Optional[str], threads: Optional[int],
                    build: dict, kinds: dict[str, str], max_batch: int, max_queue: int,
                    max_queue_wait: Optional[float]) -> dict[str, ProcessEngine]:
    """Start a worker process with ``build_service(load(run_dir, rule, device), **build)``; its engines'
    stand-ins by name, in the order of ``kinds`` ({name: kind} of the in-process service)."""
    host = EngineProcess(run_dir, rule, device, threads, build)
    host.engines = {name: ProcessEngine(host, name, kind, max_batch, max_queue, max_queue_wait)
                    for name, kind in kinds.items()}
    host.start(list(kinds))
    return host.engines
