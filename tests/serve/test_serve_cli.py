"""``mmexit serve``: a bad run folder, rule or address is one line and exit 2; as a process, SIGTERM answers
every request in flight with 200 and exits 0."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from serve_helpers import make_tiny_run

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmexit.runner", "serve", *args]


def environment() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def test_a_bad_run_folder_is_one_line_and_exit_2(capsys):
    from mmexit.runner import main

    assert main(["serve", "/no/such/run"]) == 2  # the console script exits with main()'s value
    expected = "mmexit: error: /no/such/run: not a folder (expected a trained mmexit run folder)\n"
    assert capsys.readouterr().err == expected


@pytest.mark.parametrize("args,message", [
    (["{run}", "--rule", "maxprop@0.9"], r"^mmexit: error: rule: the run has no rule 'maxprop'; its rules: .*$"),
    (["{run}", "--port", "{busy}"], r"^mmexit: error: cannot listen on 127.0.0.1:\d+: Address already in use$"),
    (["{run}", "--port", "99999"], r"--port must be 0..65535$"),
    (["{run}", "--engine", "fast"], r"argument --engine: invalid choice: 'fast'"),
    (["{run}", "--max-batch", "0"], r"--max-batch must be >= 1$"),
    (["{run}", "--max-connections", "0"], r"--max-connections must be >= 1$"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    from mmexit.serve.serve_cli import serve_main

    run = make_tiny_run(tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        argv = [a.replace("{run}", str(run)).replace("{busy}", str(busy.getsockname()[1])) for a in args]
        try:
            code = serve_main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, lines[-1]), lines


def start_server(run: Path, *args: str) -> tuple[subprocess.Popen, str | None]:
    """``mmexit serve RUN --port 0 ARGS`` as a process, and its URL once it listens (None if it did not start)."""
    process = subprocess.Popen(serve_command(str(run), "--port", "0", *args),
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment())
    url, deadline = None, time.monotonic() + 90
    while url is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        url = found.group(1) if found else None
    return process, url


def post_concurrently(url: str, body: dict, count: int) -> list:
    """POST ``body`` to ``url`` from ``count`` threads at once: each one's response, or repr of its error."""
    answers: list = [None] * count

    def client(index: int) -> None:
        try:
            answers[index] = httpx.post(url, json=body, timeout=30)
        except Exception as error:  # noqa: BLE001 - recorded for the assertion
            answers[index] = repr(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return answers


def metric_value(metrics: str, pattern: str) -> float:
    """The value of the Prometheus line matching ``pattern`` (its group 1), 0 when absent."""
    found = re.search(pattern, metrics, re.M)
    return float(found.group(1)) if found else 0.0


def sigterm_with_requests_in_flight(process: subprocess.Popen, url: str, engine: str, texts: list[str],
                                    count: int = 6) -> list:
    """POST ``{"texts": texts}`` to ``url``/v1/classify?engine=ENGINE from ``count`` threads; once every row
    was accepted and some are still in flight, SIGTERM the server. Each request's status (or error)."""
    answers: list = []
    sender = threading.Thread(target=lambda: answers.extend(post_concurrently(
        f"{url}/v1/classify?engine={engine}", {"texts": texts}, count)))
    sender.start()
    deadline, depth = time.monotonic() + 10, 0.0
    while time.monotonic() < deadline:  # every request reached the server
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        depth = metric_value(metrics, rf'^mmexit_queue_depth\{{engine="{engine}"\}} (\S+)$')
        done = metric_value(metrics, rf'^mmexit_rows_total\{{engine="{engine}"\}} (\S+)$')
        if depth + done >= count * len(texts) and depth > 0:
            break
        time.sleep(0.02)
    assert depth > 0, "no request in flight when SIGTERM was sent"
    process.send_signal(signal.SIGTERM)
    sender.join(90)
    return [a if isinstance(a, str) else a.status_code for a in answers]


def test_past_max_connections_a_request_gets_503_at_once(tmp_path):
    """The HTTP layer's admission limit: with 2 requests held by a slow rule, the others get 503, not a wait."""
    run = make_tiny_run(tmp_path / "run")
    process, url = start_server(run, "--rule", "slow@0.9", "--max-connections", "2", "--threads", "1")
    try:
        assert url, "the server did not start"
        statuses = [a if isinstance(a, str) else a.status_code
                    for a in post_concurrently(f"{url}/v1/classify", {"texts": ["good film"]}, 8)]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(503) >= 1 and statuses.count(200) >= 1, statuses
    finally:
        process.kill()
        process.wait(10)


def test_sigterm_answers_requests_in_flight_and_exits_0(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    process, url = start_server(run, "--rule", "slow@0.9", "--max-batch", "4", "--threads", "1")
    try:
        assert url, "the server did not start"
        assert httpx.get(f"{url}/health", timeout=10).json()["operating_point"] == "slow@0.9"
        results = sigterm_with_requests_in_flight(process, url, "continuous", ["good film", "dull plot"])
        assert process.wait(60) == 0
        assert results == [200] * 6
        assert "server stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
