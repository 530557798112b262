"""The Ray Serve deployment on a local Ray instance (``pip install -e ".[ray]"``; CI installs it with ``.[dev]``).

One Ray instance, one test (Ray starts in ~20 s on 2 cores): the README's ``serve run`` arguments
build the app; two replicas answer as ``mmexit.load(...).predict``, a bad request gets 400, requests
reach both replicas; a replica killed with SIGKILL under load is replaced by Ray, and no request
fails beyond the ones it held."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import make_tiny_run, random_texts

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install -e '.[ray]')")

REPO = Path(__file__).resolve().parents[2]


def readme_serve_run() -> dict:
    """The README's ``serve run mmexit.serve.ray_deployment:build_app key=value ...`` line, as build_app's args."""
    found = re.search(r"^serve run (\S+)((?: \w+=\S+)+)", (REPO / "README.md").read_text(), re.M)
    assert found, "the README has no `serve run ...` line"
    assert found.group(1) == "mmexit.serve.ray_deployment:build_app"
    return dict(item.split("=", 1) for item in shlex.split(found.group(2)))


def pids(base: str, count: int = 20) -> set[int]:
    return {httpx.get(f"{base}/health", timeout=30).json()["pid"] for _ in range(count)}


def load_in_threads(base: str, stop: threading.Event, threads: int) -> tuple[list, list[threading.Thread]]:
    """Closed-loop POSTs from ``threads`` threads until ``stop`` (at most 90 s, 3000 each): (sent_at, status)."""
    answers: list = []
    deadline = time.monotonic() + 90

    def client() -> None:
        with httpx.Client(timeout=30) as session:
            for _ in range(3000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                sent = time.monotonic()
                try:
                    answers.append((sent, session.post(f"{base}/v1/classify", json={"texts": ["good film"]}).status_code))
                except Exception as error:  # noqa: BLE001 - a hang or a reset is what the test looks for
                    answers.append((sent, repr(error)))

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    return answers, workers


def test_two_replicas_answer_as_predict_and_ray_replaces_a_killed_one(tmp_path):
    import mmexit
    from mmexit.serve.ray_deployment import build_app

    run = make_tiny_run(tmp_path / "run", slow_rule=False)  # replicas cannot import serve_helpers
    args = readme_serve_run()
    assert args["num_replicas"] == "2"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    stop = threading.Event()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(args | {"run_dir": str(run), "max_batch": "8", "threads": "1"}),
                           route_prefix="/", name="mmexit")
        base = f"http://127.0.0.1:{port}"
        texts = random_texts(6, seed=2)
        response = httpx.post(f"{base}/v1/classify", json={"texts": texts}, timeout=60)
        assert response.status_code == 200, response.text
        expected = mmexit.load(run, device="cpu").predict(texts)
        results = response.json()["results"]
        assert [(r["label"], r["exit_layer"]) for r in results] == [(r["label"], r["exit_layer"]) for r in expected]
        for got, want in zip(results, expected):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        bad = httpx.post(f"{base}/v1/classify", json={"texts": []}, timeout=30)
        assert bad.status_code == 400 and bad.json() == {"error": '"texts" is empty: give at least one text'}
        assert httpx.get(f"{base}/readyz", timeout=30).json() == {"status": "ready"}
        before = pids(base)
        assert len(before) == 2, f"Ray's router should spread requests over both replicas, saw {before}"
        by_handle = handle.classify.remote(texts[:2]).result(timeout_s=60)
        assert [r["label"] for r in by_handle["results"]] == [r["label"] for r in expected[:2]]

        threads = 3
        answers, workers = load_in_threads(base, stop, threads)
        time.sleep(1.0)
        os.kill(max(before), signal.SIGKILL)
        deadline, after = time.monotonic() + 180, before  # a new replica imports torch: slow on a loaded 2-core machine
        while time.monotonic() < deadline and not after - before:
            time.sleep(0.5)
            after = pids(base, 6)
        assert after - before, "Ray did not replace the killed replica"
        replaced = time.monotonic()
        while time.monotonic() < replaced + 10 and sum(1 for t, s in answers if t > replaced and s == 200) < 20:
            time.sleep(0.1)
        stop.set()
        for worker in workers:
            worker.join(40)
        assert not any(worker.is_alive() for worker in workers), "a request hung"
        failed = [status for _, status in answers if status != 200]
        assert len(failed) <= threads, f"more failures than requests in flight at the kill: {failed}"
        assert sum(1 for t, s in answers if t > replaced and s == 200) >= 20
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
