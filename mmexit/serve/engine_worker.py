"""The worker process of ``mmexit serve --engine-process`` (``mmexit.serve.engine_process`` starts it).

It loads the run again (``mmexit.serve.load``), builds the same engines (``build_service`` with the
same arguments) and answers ``submit`` messages over a pipe until told to stop or the pipe closes.
"""

from __future__ import annotations

import pickle
import threading
import time
from typing import Any, Optional

import torch

from mmexit.serve.load import load
from mmexit.serve.service import build_service

#: seconds between the worker's reports of layer calls and exits not yet sent with an answer
STATS_EVERY = 0.2


def dumps(message: Any) -> bytes:
    """Plain pickle: tensors travel as bytes, not as shared-memory handles (no file descriptor per tensor)."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def worker_main(connection, run_dir: str, rule: Optional[str], device: Optional[str], threads: Optional[int],
                build: dict) -> None:
    """The worker process: load the run, build its engines, answer messages until told to stop.

    Messages in: ("submit", id, engine, items), ("cancel", id), ("stop", drain, timeout).
    Messages out: ("ready", {engine: kind}) or ("start_failed", message); ("done", id, outputs, stats),
    ("failed", id, kind, message, retry_after, stats); ("stats", stats) every ``STATS_EVERY`` s while
    events wait; ("stopped", all_stopped).
    stats: {engine: (busy_rows, busy_seconds, calls [(layer, rows)], exits [(layer, rows)])}.
    """
    try:
        if threads:
            torch.set_num_threads(int(threads))
        service = build_service(load(run_dir, rule=rule, device=device), **build)
    except Exception as error:  # a bad run folder was caught by the HTTP process already; this is the rest
        connection.send_bytes(dumps(("start_failed", f"{error.__class__.__name__}: {error}")))
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
        data = dumps(message)
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
