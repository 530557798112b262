"""The engines in a process of their own (``mmexit serve --engine-process``), supervised.

Why: in one process the HTTP event loop and the model thread share one interpreter lock and, on a
small machine, one core's worth of time. Under overload the model thread wins, the event loop
accepts and refuses requests slowly, and requests pile up in the kernel's accept backlog, where
no queue bound sees them (docs/results/serving.md). With ``--engine-process`` the model runs in a
worker process (``spawn``, ``mmexit.serve.engine_worker``): the HTTP process only parses, admits or
refuses (503 at once, from its own bounded queue) and forwards rows over a pipe.

- ``EngineProcess`` starts the worker, which loads the run again and builds the same engines; a
  sender thread and a receiver thread per worker move pickled messages.
- ``ProcessEngine`` is one engine's stand-in in the HTTP process: the same ``BaseEngine`` interface
  and bounds (``max_queue`` rows, ``max_queue_wait`` seconds of work at the worker's measured
  capacity), futures resolved from the worker's answers, cancellation forwarded (a request that
  timed out is dropped in the worker too), the worker's layer-call and exit counts replayed into
  the metrics hooks.
- Supervision: when the worker dies (killed, out of memory, a crash), every request it held fails
  at once with ``EngineStopped`` (503), new requests are refused (503) while a new worker with the
  same run and arguments starts, after a backoff (``BACKOFF`` s doubling up to ``BACKOFF_MAX``);
  once it reports ready the stand-ins answer again. More than ``max_restarts`` deaths within
  ``WINDOW`` s (a worker that fails to start counts too): give up, state ``failed``, and call
  ``on_give_up`` (``mmexit serve`` then exits non-zero so the supervisor above it takes over).
- Drain: ``stop(drain=True)`` refuses new requests, waits for the accepted ones, then the worker
  drains and exits.
Outputs are the worker engines' outputs, unchanged (pickled), so answers equal the in-process engines'.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import pickle
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Optional, Sequence

from mmexit.errors import MMExitError
from mmexit.serve.engine_base import BaseEngine, EngineFull, EngineStopped, Request
from mmexit.serve.engine_worker import dumps, worker_main

LOG = logging.getLogger("mmexit.serve")

#: seconds the HTTP process waits for a worker to load the run and report ready
START_TIMEOUT = 300.0
#: restart backoff: the first restart waits BACKOFF s, each further death within WINDOW doubles it
BACKOFF, BACKOFF_MAX, WINDOW = 0.25, 8.0, 60.0


class Worker:
    """One worker process, its end of the pipe, and the thread that sends to it."""

    def __init__(self, host: "EngineProcess") -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe(duplex=True)
        self.process = context.Process(target=worker_main, name="mmexit-engine", daemon=True,
                                       args=(child, host.run_dir, host.rule, host.device, host.threads, host.build))
        self.outbox: "queue.Queue[Optional[bytes]]" = queue.Queue()
        self.ready, self.ended = threading.Event(), threading.Event()
        self.kinds: dict[str, str] = {}
        self.start_error: Optional[str] = None
        self.process.start()
        child.close()
        threading.Thread(target=host._receive, args=(self,), name="mmexit-engine-receive", daemon=True).start()
        threading.Thread(target=self._send_loop, name="mmexit-engine-send", daemon=True).start()

    def send(self, message: tuple) -> None:
        self.outbox.put(dumps(message))

    def _send_loop(self) -> None:
        while True:
            data = self.outbox.get()
            if data is None:
                return
            try:
                self.connection.send_bytes(data)
            except (BrokenPipeError, OSError):
                return

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5.0)


class EngineProcess:
    """The supervised worker process; ``engines`` are its stand-ins.

    ``state``: starting, ready, restarting (a worker died, a new one is on its way), stopping, stopped,
    failed (gave up). ``restarts``: workers started after a death; ``ready_seconds``: the last start's
    time to ready (from the death, for a restart); ``on_ready(seconds, restart)`` is called at each."""

    def __init__(self, run_dir: str, rule: Optional[str], device: Optional[str], threads: Optional[int],
                 build: dict, max_restarts: int = 5, on_give_up: Optional[Callable[[], None]] = None) -> None:
        self.run_dir, self.rule, self.device, self.threads = str(run_dir), rule, device, threads
        self.build, self.max_restarts, self.on_give_up = dict(build), int(max_restarts), on_give_up
        self.on_ready: Optional[Callable[[float, bool], None]] = None
        self.kinds: dict[str, str] = {}
        self.engines: dict[str, ProcessEngine] = {}
        self.requests: dict[int, tuple[ProcessEngine, Request]] = {}
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.state = "starting"
        self.worker: Optional[Worker] = None  # the worker answering requests (state ready)
        self.launching: Optional[Worker] = None
        self.closing = threading.Event()
        self.deaths: deque[float] = deque()
        self.restarts, self.ready_seconds, self.gave_up = 0, None, False

    def start(self, engine_names: Sequence[str]) -> None:
        """Spawn the worker and wait until its engines are built (raises MMExitError when it fails)."""
        began = time.monotonic()
        reason = self._launch()
        if reason is not None:
            self.state = "failed"
            raise MMExitError(f"the engine process did not start: {reason}")
        for name in engine_names:
            if name not in self.kinds:
                self.release_all()
                raise MMExitError(f"the engine process has no engine {name!r} (it has {', '.join(self.kinds)})")
        self.ready_seconds = time.monotonic() - began

    def _launch(self) -> Optional[str]:
        """Start a worker and wait for it: None when it is ready (it answers from now on), else why not."""
        worker = self.launching = Worker(self)
        deadline = time.monotonic() + START_TIMEOUT
        while not worker.ready.wait(0.1) and not self.closing.is_set() and time.monotonic() < deadline:
            pass
        self.launching = None
        if worker.kinds and not worker.start_error and not self.closing.is_set():
            with self.lock:
                if not worker.ended.is_set():
                    self.worker, self.kinds, self.state = worker, worker.kinds, "ready"
                    return None
        answered = worker.ready.is_set()
        worker.process.join(1.0)
        code = worker.process.exitcode
        worker.kill()
        if self.closing.is_set():
            return "the server is stopping"
        return worker.start_error or (f"it exited with code {code}" if answered else
                                      f"no answer within {START_TIMEOUT:g} s")

    # ------------------------------------------------------------------ supervision
    def _ended(self, worker: Worker) -> None:
        """A worker's pipe closed: fail what it held; restart it when it died while serving."""
        died = time.monotonic()
        with self.lock:
            if worker is not self.worker:  # a worker that never became ready (``_launch`` reports it)
                return
            self.worker = None
            waiting, self.requests = list(self.requests.values()), {}
            restart = self.state == "ready" and not self.closing.is_set()
            self.state = "restarting" if restart else ("stopped" if self.closing.is_set() else "failed")
        gone = EngineStopped("the engine process " + ("died before answering; a new one is starting" if restart
                                                      else "stopped before answering"))
        for engine, request in waiting:
            engine._fail(request, gone)
        if restart:
            worker.process.join(2.0)  # its pipe closed: it exited or is about to
            LOG.error("the engine process died (exit code %s); %d request(s) failed; starting a new one",
                      worker.process.exitcode, len(waiting))
            threading.Thread(target=self._restart, args=(died,), name="mmexit-engine-restart",
                             daemon=True).start()

    def _restart(self, died: float) -> None:
        """Start workers, with backoff, until one is ready; past ``max_restarts`` deaths per WINDOW s, give up."""
        while not self.closing.is_set():
            now = time.monotonic()
            self.deaths.append(now)
            while self.deaths and self.deaths[0] < now - WINDOW:
                self.deaths.popleft()
            if len(self.deaths) > self.max_restarts:
                self._give_up()
                return
            if self.closing.wait(min(BACKOFF_MAX, BACKOFF * 2 ** (len(self.deaths) - 1))):
                return
            reason = self._launch()
            if reason is None:
                self.restarts += 1
                self.ready_seconds = time.monotonic() - died
                LOG.warning("the engine process is ready again after %.1f s (restart %d)", self.ready_seconds,
                            self.restarts)
                if self.on_ready is not None:
                    self.on_ready(self.ready_seconds, True)
                return
            LOG.error("a new engine process did not start: %s", reason)

    def _give_up(self) -> None:
        with self.lock:
            if self.closing.is_set():
                return
            self.state, self.gave_up = "failed", True
        LOG.error("the engine process died %d times within %g s (limit %d restarts): giving up", len(self.deaths),
                  WINDOW, self.max_restarts)
        if self.on_give_up is not None:
            self.on_give_up()

    # ------------------------------------------------------------------ messages
    def _receive(self, worker: Worker) -> None:
        while True:
            try:
                message = pickle.loads(worker.connection.recv_bytes())
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "ready":
                worker.kinds = message[1]
                worker.ready.set()
            elif kind == "start_failed":
                worker.start_error = message[1]
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
        worker.ended.set()
        worker.ready.set()
        worker.outbox.put(None)
        self._ended(worker)

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
            worker = self.worker
            if self.state != "ready" or worker is None:
                raise EngineStopped("the engine process is restarting (it died); retry shortly"
                                    if self.state in ("restarting", "starting") else "the engine process is not running")
            self.requests[request_id] = (engine, request)
        request.future.add_done_callback(lambda f: self._cancelled(request_id) if f.cancelled() else None)
        worker.send(("submit", request_id, engine.name, request.items))

    def _cancelled(self, request_id: int) -> None:
        with self.lock:
            entry = self.requests.pop(request_id, None)
            worker = self.worker
        if entry is not None:
            entry[0]._drop(entry[1])
            if worker is not None:
                worker.send(("cancel", request_id))

    def release(self, engine: "ProcessEngine", drain: bool, timeout: Optional[float]) -> bool:
        """One stand-in stopped; when all have, stop the worker (draining it). True when it exited."""
        engine.released = True
        if not all(e.released for e in self.engines.values()):
            return True
        return self.release_all(drain, timeout)

    def release_all(self, drain: bool = False, timeout: Optional[float] = None) -> bool:
        """Stop supervising and stop the worker (draining it when asked). True when no worker runs."""
        with self.lock:
            self.closing.set()
            worker, self.state = self.worker, "stopping"
        if worker is not None and not worker.ended.is_set():
            worker.send(("stop", drain, timeout))
            worker.ended.wait(None if timeout is None else timeout + 5.0)
        for process in [w.process for w in (worker, self.launching) if w is not None]:
            process.join(5.0)
            if process.is_alive():
                process.kill()
                process.join(5.0)
        self.state = "stopped"
        return worker is None or not worker.process.is_alive()

    @property
    def alive(self) -> bool:
        worker = self.worker
        return self.state == "ready" and worker is not None and worker.process.is_alive()


def engine_hosts(engines: Iterable[BaseEngine]) -> list[EngineProcess]:
    """The worker processes behind ``engines`` (empty when they run in process)."""
    hosts = [engine.host for engine in engines if isinstance(engine, ProcessEngine)]
    return [host for position, host in enumerate(hosts) if host not in hosts[:position]]


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

    @property
    def phase(self) -> str:
        host = self.host.state
        if host in ("starting", "restarting", "failed"):
            return host
        if self.stopping or host in ("stopping", "stopped") or not self.host.alive:
            return "stopped"
        return "ready" if self.accepting else "draining"

    def describe(self) -> dict:
        worker = self.host.worker
        return super().describe() | {"engine_process": True, "engine_restarts": self.host.restarts,
                                     "engine_pid": None if worker is None else worker.process.pid}


def process_engines(run_dir: str, rule: Optional[str], device: Optional[str], threads: Optional[int],
                    build: dict, kinds: dict[str, str], max_batch: int, max_queue: int,
                    max_queue_wait: Optional[float], max_restarts: int = 5,
                    on_give_up: Optional[Callable[[], None]] = None) -> dict[str, ProcessEngine]:
    """Start a supervised worker process with ``build_service(load(run_dir, rule, device), **build)``; its
    engines' stand-ins by name, in the order of ``kinds`` ({name: kind} of the in-process service).
    ``max_restarts``: deaths per minute it restarts after (0: never restart)."""
    host = EngineProcess(run_dir, rule, device, threads, build, max_restarts, on_give_up)
    host.engines = {name: ProcessEngine(host, name, kind, max_batch, max_queue, max_queue_wait)
                    for name, kind in kinds.items()}
    host.start(list(kinds))
    return host.engines
