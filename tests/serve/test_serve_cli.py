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


def test_past_max_connections_a_request_gets_503_at_once(tmp_path):
    """The HTTP layer's admission limit: with 2 requests held by a slow rule, the others get 503, not a wait."""
    run = make_tiny_run(tmp_path / "run")
    process, url = start_server(run, "--rule", "slow@0.9", "--max-connections", "2", "--threads", "1")
    try:
        assert url, "the server did not start"
        statuses: list = [None] * 8

        def client(index: int) -> None:
            try:
                statuses[index] = httpx.post(f"{url}/v1/classify", json={"texts": ["good film"]}, timeout=30).status_code
            except Exception as error:  # noqa: BLE001 - recorded for the assertion
                statuses[index] = repr(error)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
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
        results: list = [None] * 6

        def client(index: int) -> None:
            try:
                results[index] = httpx.post(f"{url}/v1/classify", json={"texts": ["good film", "dull plot"]},
                                            timeout=30).status_code
            except Exception as error:  # noqa: BLE001 - recorded for the assertion
                results[index] = repr(error)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # every request reached the server (12 rows queued)
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            depth = float(re.search(r'^mmexit_queue_depth\{engine="continuous"\} (\S+)$', metrics, re.M).group(1))
            answered = re.search(r'^mmexit_requests_total\{endpoint="/v1/classify",status="200"\} (\S+)$', metrics,
                                 re.M)
            if depth + 2 * float(answered.group(1) if answered else 0) >= 12 and depth > 0:
                break
            time.sleep(0.02)
        assert depth > 0, "no request in flight when SIGTERM was sent"
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(60)
        assert process.wait(60) == 0
        assert results == [200] * 6
        assert "server stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
