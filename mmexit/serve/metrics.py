"""Prometheus metrics of a server (``GET /metrics``), in a registry of its own.

- ``mmexit_requests_total{endpoint,status}``: HTTP requests answered;
- ``mmexit_request_latency_seconds{endpoint}``: histogram of request latency (receipt to answer);
- ``mmexit_exits_total{engine,layer}``: rows answered per exit layer (1-based);
- ``mmexit_queue_depth{engine}``: rows accepted and not answered yet (waiting or in flight);
- ``mmexit_layer_call_rows{engine,layer}``: histogram of rows per layer call (layer 0 = embedding;
  for the shrinking batch, the rows still in the batch at that layer);
- ``mmexit_rows_total{engine}``: rows answered;
- ``mmexit_ready``: 1 when every engine is ready (``/readyz`` 200), else 0;
- ``mmexit_engine_restarts_total``: engine worker processes started after a death (``--engine-process``);
- ``mmexit_engine_ready_seconds``: histogram of a worker's time to ready (from its predecessor's
  death for a restart; the first start is observed too).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from mmexit.serve.engine_base import BaseEngine
from mmexit.serve.engine_process import engine_hosts

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
READY_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ENDPOINTS = ("/livez", "/readyz", "/health", "/metrics", "/v1/classify", "/v1/caption")


class ServeMetrics:
    """The server's metrics; ``attach(engine)`` hooks the engine's layer calls, exits and queue."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("mmexit_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("mmexit_request_latency_seconds", "request latency, receipt to answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.exits = Counter("mmexit_exits", "rows answered per exit layer", ["engine", "layer"],
                             registry=self.registry)
        self.rows = Counter("mmexit_rows", "rows answered", ["engine"], registry=self.registry)
        self.queue_depth = Gauge("mmexit_queue_depth", "rows accepted and not answered (waiting or in flight)",
                                 ["engine"], registry=self.registry)
        self.call_rows = Histogram("mmexit_layer_call_rows", "rows per layer call (layer 0: the embedding)",
                                   ["engine", "layer"], buckets=ROW_BUCKETS, registry=self.registry)
        self.ready = Gauge("mmexit_ready", "1 when every engine is ready (/readyz 200)", registry=self.registry)
        self.restarts = Counter("mmexit_engine_restarts", "engine worker processes started after a death",
                                registry=self.registry)
        self.ready_seconds = Histogram("mmexit_engine_ready_seconds", "an engine worker's time to ready",
                                       buckets=READY_BUCKETS, registry=self.registry)

    def attach(self, name: str, engine: BaseEngine) -> None:
        """Hook one engine (``name`` labels its series)."""
        self.queue_depth.labels(name).set_function(lambda: engine.depth)
        engine.on_call = lambda layer, rows: self.call_rows.labels(name, str(layer)).observe(rows)

        def exited(layer: int, rows: int) -> None:
            self.exits.labels(name, str(layer)).inc(rows)
            self.rows.labels(name).inc(rows)

        engine.on_exit = exited

    def attach_service(self, service) -> None:
        """Readiness of ``service``, and the restarts and start times of its engine worker processes."""

        self.ready.set_function(lambda: 1.0 if service.state() == "ready" else 0.0)
        for host in engine_hosts(service.engines.values()):
            if host.ready_seconds is not None:
                self.ready_seconds.observe(host.ready_seconds)
            host.on_ready = self.restarted

    def restarted(self, seconds: float, restart: bool = True) -> None:
        self.ready_seconds.observe(seconds)
        if restart:
            self.restarts.inc()

    def observe(self, path: str, status: int, seconds: float) -> None:
        endpoint = path if path in ENDPOINTS else "other"
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
