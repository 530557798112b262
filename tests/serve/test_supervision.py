"""``--engine-process`` supervision and the health split: a worker killed with SIGKILL mid-load fails only
the requests it held (503), is replaced with the same run and arguments, and 200s resume; /readyz
follows it while /livez keeps answering; past ``--max-restarts`` a minute the server exits 1."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import make_tiny_run, random_texts
from test_serve_cli import metric_value, start_server

from mmexit.data.examples import TextExample
from mmexit.serve.engine_base import EngineStopped
from mmexit.serve.engine_process import process_engines
from mmexit.serve.load import load
from mmexit.serve.service import Limits
from mmexit.serve.text_rows import encode_rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("supervision") / "run", slow_rule=False)


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_killed_worker_is_replaced_and_answers_again(tiny_run):
    predictor = load(tiny_run)
    build = dict(engine="continuous", max_batch=8, max_queue=10**9, limits=Limits(max_queue_wait=0))
    proxy = process_engines(str(tiny_run), None, "cpu", 1, build, {"continuous": "continuous"}, 8, 64, None,
                            max_restarts=2)["continuous"]
    host = proxy.host
    rows = encode_rows(predictor.processor, [TextExample(t, None, 0) for t in random_texts(4, seed=5)],
                       predictor.max_length)
    try:
        first = proxy.submit(rows).result(60)
        old_pid = host.worker.process.pid
        os.kill(old_pid, signal.SIGKILL)
        assert wait_for(lambda: host.state != "ready", 20)
        assert proxy.phase in ("restarting", "ready")
        if host.state == "restarting":
            with pytest.raises(EngineStopped, match="restarting"):
                proxy.submit(rows)
        assert proxy.depth == 0
        assert wait_for(lambda: host.state == "ready", 120), host.state
        assert host.restarts == 1 and host.worker.process.pid != old_pid and host.ready_seconds > 0
        again = proxy.submit(rows).result(60)
        assert [r.exit_layer for r in again] == [r.exit_layer for r in first]
        worker = host.worker
    finally:
        assert proxy.stop(True, 30)
    assert host.state == "stopped" and not worker.process.is_alive() and proxy.phase == "stopped"


def test_without_restarts_a_dead_worker_fails_its_requests_and_stays_down(tiny_run):
    """``max_restarts=0``: the first death gives up (``mmexit serve`` then exits 1); requests get EngineStopped."""
    predictor = load(tiny_run)
    build = dict(engine="continuous", max_batch=8, max_queue=10**9, limits=Limits(max_queue_wait=0))
    gave_up = threading.Event()
    proxy = process_engines(str(tiny_run), None, "cpu", 1, build, {"continuous": "continuous"}, 8, 64, None,
                            max_restarts=0, on_give_up=gave_up.set)["continuous"]
    rows = encode_rows(predictor.processor, [TextExample(t, None, 0) for t in random_texts(4, seed=5)],
                       predictor.max_length)
    assert len(proxy.submit(rows).result(60)) == 4
    proxy.host.worker.process.kill()
    assert gave_up.wait(20) and proxy.host.gave_up and proxy.phase == "failed" and not proxy.alive
    with pytest.raises(EngineStopped, match="not running"):
        proxy.submit(rows)
    assert proxy.depth == 0
    assert proxy.stop(True, 5)


def test_livez_and_readyz_follow_the_engines_in_process(tiny_run):
    """Before start: starting; running: ready; an engine draining or stopped: 503 with its state; /livez stays 200."""
    from fastapi.testclient import TestClient

    from mmexit.serve.app import create_app
    from mmexit.serve.service import build_service

    service = build_service(load(tiny_run, device="cpu"), "continuous", max_batch=8)
    assert service.state() == "starting"
    with TestClient(create_app(service)) as client:
        assert client.get("/livez").json() == {"status": "alive"}
        assert client.get("/readyz").json() == {"status": "ready"}
        assert "mmexit_ready 1.0" in client.get("/metrics").text
        assert client.get("/health").json()["state"] == "ready"
        service.engines["batch"].accepting = False  # what stop(drain=True) does first
        answer = client.get("/readyz")
        assert answer.status_code == 503 and answer.json() == {"status": "draining"}
        assert service.engines["batch"].stop(True, 10)
        assert client.get("/readyz").json() == {"status": "stopped"} and client.get("/livez").status_code == 200
        assert "mmexit_ready 0.0" in client.get("/metrics").text
        assert client.get("/health").status_code == 503


def load_in_threads(url: str, stop: threading.Event, threads: int = 4, limit_s: float = 90.0) -> list:
    """POST one text per request from ``threads`` threads until ``stop`` (or ``limit_s``): (sent_at, status)."""
    answers: list = []
    deadline = time.monotonic() + limit_s

    def client(index: int) -> None:
        with httpx.Client(timeout=30) as session:
            count = 0
            while not stop.is_set() and time.monotonic() < deadline and count < 2000:
                sent = time.monotonic()
                try:
                    status = session.post(f"{url}/v1/classify", json={"texts": [f"good film {index}"]}).status_code
                except Exception as error:  # noqa: BLE001 - a hang or reset is what the test looks for
                    status = repr(error)
                answers.append((sent, status))
                count += 1
                if status != 200:
                    time.sleep(0.05)

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    answers.append(workers)  # type: ignore[arg-type]
    return answers


def test_sigkill_of_the_worker_mid_load_every_request_200_or_503_and_200s_resume(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    process, url = start_server(run, "--engine-process", "--threads", "1", "--max-batch", "4", "--timeout", "20")
    stop = threading.Event()
    try:
        assert url, "the server did not start"
        assert httpx.get(f"{url}/readyz", timeout=10).json() == {"status": "ready"}
        health = httpx.get(f"{url}/health", timeout=10).json()
        old_pid = health["engine_pid"]
        answers = load_in_threads(url, stop)
        workers = answers.pop()
        assert wait_for(lambda: sum(1 for _, s in answers if s == 200) >= 20, 30), "no load reached the server"
        killed_at = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        assert wait_for(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 503, 10)
        assert httpx.get(f"{url}/livez", timeout=10).status_code == 200
        assert httpx.get(f"{url}/readyz", timeout=10).json()["status"] == "restarting"
        assert wait_for(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200, 120)
        ready_at = time.monotonic()
        assert wait_for(lambda: sum(1 for t, s in answers if s == 200 and t > ready_at) >= 20, 30)
        stop.set()
        for worker in workers:
            worker.join(40)
        assert not any(worker.is_alive() for worker in workers), "a request hung"
        statuses = [status for _, status in answers]
        assert set(statuses) <= {200, 503}, sorted(set(map(str, statuses)))
        assert any(status == 503 for t, status in answers if t >= killed_at - 1)
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["engine_restarts"] == 1 and health["engine_pid"] != old_pid and health["status"] == "ok"
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert metric_value(metrics, r"^mmexit_engine_restarts_total (\S+)$") == 1
        assert metric_value(metrics, r"^mmexit_engine_ready_seconds_count (\S+)$") == 2  # first start + restart
        assert metric_value(metrics, r"^mmexit_ready (\S+)$") == 1
    finally:
        stop.set()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except Exception:  # noqa: BLE001
                process.kill()
                process.wait(10)


def test_past_max_restarts_the_server_exits_1(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    process, url = start_server(run, "--engine-process", "--threads", "1", "--max-restarts", "0")
    try:
        assert url, "the server did not start"
        os.kill(httpx.get(f"{url}/health", timeout=10).json()["engine_pid"], signal.SIGKILL)
        assert process.wait(60) == 1
        assert "died more than 0 times in a minute" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
