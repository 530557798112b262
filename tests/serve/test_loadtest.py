"""``mmexit bench load`` and tools/soak.py against a real uvicorn server on 127.0.0.1 (ephemeral port), briefly."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from serve_helpers import make_tiny_run

import mmexit
from mmexit.runner import main as mmexit_main
from mmexit.serve.app import create_app
from mmexit.serve.service import build_service

SOAK = Path(__file__).resolve().parents[2] / "tools" / "soak.py"


def load_tool(path: Path = SOAK):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    run = make_tiny_run(tmp_path_factory.mktemp("run"))
    service = build_service(mmexit.load(run, device="cpu"), "continuous", max_batch=8)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(30)
    sock.close()


def test_open_loop_sweep_over_engines_with_json_and_png(server_url, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert mmexit_main(["bench", "load", "--url", server_url, "--sweep", "--rates", "10,30", "--duration", "1", "--engines",
                      "continuous,full", "--json", "--png", str(png), "--max-requests", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = report["runs"]
    assert [(r["engine"], r["offered_rps"]) for r in runs] == [("continuous", 10.0), ("continuous", 30.0),
                                                                ("full", 10.0), ("full", 30.0)]
    for run in runs:
        assert run["requests"] <= 40 and set(run["status"]) == {"200"}
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert abs(sum(run["exit_layer_mix"].values()) - 1) < 1e-3
    assert all(r["mean_exit_layer"] == 4.0 for r in runs if r["engine"] == "full")
    assert png.stat().st_size > 1000


def test_closed_loop_table_and_loopback_only(server_url, tmp_path, capsys):
    texts = tmp_path / "texts.tsv"
    texts.write_text("text\tlabel\ngood film\t1\ndull plot\t0\n")
    assert mmexit_main(["bench", "load", "--url", server_url, "--closed", "4", "--duration", "1",
                        "--texts-per-request", "3", "--texts", str(texts)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| run | offered/s | answers/s | texts/s |") and "default closed x4 | closed |" in out
    with pytest.raises(SystemExit):
        mmexit_main(["bench", "load", "--url", "http://10.1.2.3:8000"])
    assert "only loopback addresses" in capsys.readouterr().err
    assert mmexit_main(["bench", "load", "--url", server_url, "--texts", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_soak_mixes_malformed_requests_and_reports_windows(server_url, tmp_path, capsys):
    soak = load_tool()
    png, out = tmp_path / "soak.png", tmp_path / "soak.json"
    assert soak.main(["--url", server_url, "--rate", "20", "--duration", "3", "--window", "1", "--malformed", "0.3",
                      "--png", str(png), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["failures"] == 0 and summary["malformed"] >= 3 and summary["requests"] <= 20 * 3 * 1.5 + 10
    assert "200" in summary["status"] and "400" in summary["status"]
    assert set(summary["status"]) <= {"200", "400", "413"}
    assert len(summary["windows"]) >= 3 and summary["rss_mb"]["server"]["max"] > 0
    assert png.stat().st_size > 1000
    assert json.loads(capsys.readouterr().out)["failures"] == 0
    with pytest.raises(SystemExit):
        soak.parse_args(["--url", "http://10.1.2.3:8000", "--rate", "1"])
