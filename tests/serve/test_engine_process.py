"""``mmexit serve --engine-process``: the engines run in a worker process of their own.

Answers equal the in-process engines' row for row (every engine); the HTTP process keeps the queue
bound (503 at once, no round trip); the worker's exits reach /metrics; SIGTERM drains through the
worker and exits 0 (a worker that dies: tests/serve/test_supervision.py).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import torch
from serve_helpers import make_tiny_run, random_texts
from test_serve_cli import metric_value, post_concurrently, sigterm_with_requests_in_flight, start_server

from mmexit.data.examples import TextExample
from mmexit.serve.engine_base import EngineStopped
from mmexit.serve.engine_process import process_engines
from mmexit.serve.load import load
from mmexit.serve.service import Limits, build_service
from mmexit.serve.text_rows import encode_rows


def _build(engine: str = "continuous", max_batch: int = 8) -> dict:
    return dict(engine=engine, max_batch=max_batch, max_queue=10**9, limits=Limits(max_queue_wait=0))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("engine_process") / "run", slow_rule=False)


def test_every_engine_in_a_worker_answers_as_in_process(tiny_run):
    predictor = load(tiny_run)
    service = build_service(predictor, "continuous", 8, 64, Limits())
    kinds = {name: engine.kind for name, engine in service.engines.items()}
    proxies = process_engines(str(tiny_run), None, "cpu", 1, _build(), kinds, 8, 64, None)
    service.start()
    try:
        texts = random_texts(24, seed=3)
        rows = encode_rows(predictor.processor, [TextExample(t, None, 0) for t in texts], predictor.max_length)
        for name in kinds:
            here = service.engines[name].submit(rows).result(60)
            there = [f.result(60) for f in [proxies[name].submit(rows[:10]), proxies[name].submit(rows[10:])]]
            there = there[0] + there[1]
            assert [r.exit_layer for r in there] == [r.exit_layer for r in here], name
            # the worker may start on the first request before the second arrives: other call
            # compositions, so equal up to float rounding (bitwise equality: tests/serve/test_engine.py)
            assert all(torch.allclose(a.logits, b.logits, rtol=0, atol=1e-5) for a, b in zip(here, there)), name
            assert proxies[name].depth == 0 and proxies[name].rows_done == len(rows)
        assert len({r.exit_layer for r in here}) >= 1
        layers = {r.exit_layer for r in service.engines["continuous"].submit(rows).result(60)}
        assert len(layers) > 1, "the tiny model should exit at more than one layer"
    finally:
        service.stop()
        assert all(proxy.stop(True, 30) for proxy in proxies.values())
    assert not any(proxy.alive for proxy in proxies.values())
    with pytest.raises(EngineStopped):
        proxies["continuous"].submit(rows[:1])


def test_the_http_process_drops_its_weights_once_the_worker_runs_the_engines(tiny_run):
    """``move_engines_to_a_process`` (what ``mmexit serve --engine-process`` does): the HTTP process's
    model keeps its structure (exits, labels, /health) but no weights; answers come from the worker."""
    from mmexit.serve.serve_cli import move_engines_to_a_process, parse_args

    args = parse_args([str(tiny_run), "--engine-process", "--threads", "1"])
    predictor = load(tiny_run)
    expected = predictor.predict(["good film", "dull plot"])
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars, timeout=args.timeout,
                    max_queue_wait=args.max_queue_wait)
    service = build_service(predictor, args.engine, args.max_batch, args.max_queue, limits, args.slots,
                            args.max_wait_ms, args.engines, args.group_lengths, args.max_wait_calls)
    move_engines_to_a_process(service, args, limits)
    try:
        assert predictor.weights_released
        assert {p.device.type for p in predictor.model.parameters()} == {"meta"}
        assert predictor.describe()["exit_layers"] == list(predictor.model.exit_layers)
        rows = encode_rows(predictor.processor, [TextExample(t, None, 0) for t in ["good film", "dull plot"]],
                           predictor.max_length)
        answers = service.engines[service.default].submit(rows).result(60)
        assert [r.exit_layer for r in answers] == [r["exit_layer"] for r in expected]
    finally:
        assert all(engine.stop(True, 30) for engine in service.engines.values())


def test_a_run_loads_without_its_weights(tiny_run):
    """``load(weights=False)`` (the HTTP process of ``serve --engine-process``): the structure, labels
    and rule of the run, every tensor on meta; asking it to predict is one clear error."""
    from mmexit.errors import ModelLoadError

    whole, structure = load(tiny_run), load(tiny_run, weights=False)
    assert {p.device.type for p in structure.model.parameters()} == {"meta"} and structure.weights_released
    assert structure.describe() == whole.describe() and structure.label_names == whole.label_names
    assert structure.operating_point == whole.operating_point
    assert {k: v.shape for k, v in structure.model.state_dict().items()} == \
        {k: v.shape for k, v in whole.model.state_dict().items()}
    with pytest.raises(ModelLoadError, match="structure only"):
        structure.predict(["good film"])


def test_server_with_an_engine_process_answers_counts_and_drains(tmp_path):
    run = make_tiny_run(tmp_path / "run")
    expected = load(run, rule="slow@0.9").predict(["good film", "dull plot", "warm cold dark light"])
    process, url = start_server(run, "--engine-process", "--rule", "slow@0.9", "--threads", "1", "--max-batch", "4")
    try:
        assert url, "the server did not start"
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["engine_process"] is True
        body = httpx.post(f"{url}/v1/classify", json={"texts": ["good film", "dull plot", "warm cold dark light"]},
                          timeout=30).json()
        assert [r["exit_layer"] for r in body["results"]] == [r["exit_layer"] for r in expected]
        assert [r["label"] for r in body["results"]] == [r["label"] for r in expected]
        for got, want in zip(body["results"], expected):
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)
        assert httpx.post(f"{url}/v1/classify?engine=full", json={"texts": ["good film"]},
                          timeout=30).json()["results"][0]["exit_layer"] == 4
        deadline = time.monotonic() + 5  # the worker reports exits recorded after an answer within 0.2 s
        while True:
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            if metric_value(metrics, r'^mmexit_rows_total\{engine="full"\} (\S+)$') >= 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert metric_value(metrics, r'^mmexit_rows_total\{engine="continuous"\} (\S+)$') == 3
        assert metric_value(metrics, r'^mmexit_rows_total\{engine="full"\} (\S+)$') == 1
        assert metric_value(metrics, r'^mmexit_layer_call_rows_count\{engine="full",layer="4"\} (\S+)$') >= 1

        results = sigterm_with_requests_in_flight(process, url, "batch", ["good film"] * 3)
        assert process.wait(60) == 0
        assert results == [200] * 6
        assert "server stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_the_http_process_refuses_past_the_queue_bound_without_the_worker(tmp_path):
    """--max-queue 2 with the slow rule: requests past 2 rows get 503 + Retry-After from the HTTP process."""
    run = make_tiny_run(tmp_path / "run")
    process, url = start_server(run, "--engine-process", "--rule", "slow@0.9", "--max-queue", "2", "--threads", "1")
    try:
        assert url, "the server did not start"
        answers = [(a, None) if isinstance(a, str) else (a.status_code, a.headers.get("retry-after"))
                   for a in post_concurrently(f"{url}/v1/classify", {"texts": ["good film"]}, 6)]
        statuses = [a[0] for a in answers]
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and statuses.count(503) >= 1, answers
        assert all(retry is not None for status, retry in answers if status == 503)
    finally:
        process.kill()
        process.wait(10)
