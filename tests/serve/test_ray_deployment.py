"""The Ray Serve deployment on a local Ray instance (skipped when ``ray[serve]`` is not installed)."""

from __future__ import annotations

import socket

import httpx
import pytest
from serve_helpers import make_tiny_run, random_texts

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install 'ray[serve]')")
serve = pytest.importorskip("ray.serve", reason="ray[serve] is not installed (pip install 'ray[serve]')")


def test_two_replicas_serve_the_same_app_over_http_and_handles(tmp_path):
    import mmexit
    from mmexit.serve.ray_deployment import build_app

    run = make_tiny_run(tmp_path / "run", slow_rule=False)  # replicas cannot import serve_helpers
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"run_dir": str(run), "max_batch": "8", "threads": "1", "num_replicas": "2"})
        handle = serve.run(app, route_prefix="/", name="mmexit")
        base = f"http://127.0.0.1:{port}"
        texts = random_texts(5, seed=2)
        response = httpx.post(f"{base}/v1/classify", json={"texts": texts}, timeout=60)
        assert response.status_code == 200, response.text
        expected = mmexit.load(run, device="cpu").predict(texts)
        assert [r["exit_layer"] for r in response.json()["results"]] == [r["exit_layer"] for r in expected]
        bad = httpx.post(f"{base}/v1/classify", json={"texts": []}, timeout=30)
        assert bad.status_code == 400 and bad.json() == {"error": '"texts" is empty: give at least one text'}
        assert httpx.get(f"{base}/health", timeout=30).json()["engine"] == "continuous"
        replicas = {httpx.get(f"{base}/health", timeout=30).json()["pid"] for _ in range(40)}
        assert len(replicas) == 2, f"Ray's router should spread requests over both replicas, saw {replicas}"
        by_handle = handle.classify.remote(texts[:2]).result(timeout_s=60)
        assert [r["label"] for r in by_handle["results"]] == [r["label"] for r in expected[:2]]
    finally:
        serve.shutdown()
        ray.shutdown()
