"""Ray Serve deployment of a trained run: the same app and engine as ``mmexit serve``, one per replica.

Each replica loads the run, starts its own engine (``continuous``, ``batch`` or ``full`` for text
runs; the caption batcher for caption runs) and serves the FastAPI app of ``mmexit.serve.app``
(``/health``, ``/v1/classify``, ``/v1/caption``, ``/metrics`` per replica) through
``serve.ingress``. Ray's router spreads requests over replicas; each replica's engine batches
the requests it holds, so give it enough of them at once (``max_ongoing_requests``, default 256:
Ray's own default of 5 would starve the batching).

Python::

    from ray import serve
    from mmexit.serve.ray_deployment import mmexit_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(mmexit_app("outputs/quickstart", engine="continuous", num_replicas=2), route_prefix="/")
    # or autoscaling on the requests each replica holds:
    serve.run(mmexit_app("outputs/quickstart", autoscaling_config={
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 64}), route_prefix="/")

Shell (an application builder; every ``key=value`` is an argument of ``mmexit_app``)::

    serve run mmexit.serve.ray_deployment:build_app run_dir=outputs/quickstart num_replicas=2

``ray_actor_options`` (default ``{"num_cpus": 1}``) reserves resources per replica; on a GPU node
pass ``{"num_gpus": 1}`` and ``device="cuda"``. Python callers can also use the deployment handle:
``await handle.classify.remote(["a text", ...])``. Needs ``pip install -e ".[ray]"`` (``ray[serve]``).
"""

from __future__ import annotations

from typing import Any, Optional

from mmexit.serve.app import create_app
from mmexit.serve.load import load
from mmexit.serve.service import Limits, TextService, build_service


class MMExitReplica:
    """One replica: a loaded run and its started engine; the ASGI app is built after the constructor."""

    def __init__(self, run_dir: str, rule: Optional[str] = None, engine: str = "continuous", max_batch: int = 32,
                 max_queue: int = 1024, timeout: float = 30.0, device: Optional[str] = None,
                 threads: Optional[int] = None, slots: Optional[int] = None,
                 max_wait_ms: Optional[float] = None, max_wait_calls: Optional[int] = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(int(threads))
        predictor = load(run_dir, rule=rule, device=device)
        self.service = build_service(predictor, engine, max_batch, max_queue, Limits(timeout=timeout), slots,
                                     max_wait_ms, max_wait_calls=max_wait_calls).start()  # shed load past timeout / 2

    def __serve_build_asgi_app__(self):
        return create_app(self.service)  # its lifespan drains the engine when the replica stops

    async def classify(self, texts: list) -> dict:
        """For deployment handles: the same answer as POST /v1/classify {"texts": texts}."""
        if not isinstance(self.service, TextService):
            raise ValueError("this deployment serves a captioning run")
        return await self.service.classify({"texts": texts})

    def health(self) -> dict:
        return self.service.health()

    def check_health(self) -> None:
        """Ray's replica health check (every ``health_check_period_s``): raising makes Ray replace the
        replica, e.g. when its engine thread died."""
        state = self.service.state()
        if state not in ("ready", "draining"):
            raise RuntimeError(f"the engine is {state}")


def mmexit_app(run_dir: str, *, rule: Optional[str] = None, engine: str = "continuous", max_batch: int = 32,
               max_queue: int = 1024, timeout: float = 30.0, device: Optional[str] = None,
               threads: Optional[int] = None, slots: Optional[int] = None, max_wait_ms: Optional[float] = None,
               max_wait_calls: Optional[int] = None, num_replicas: Optional[int] = None,
               autoscaling_config: Optional[dict] = None, ray_actor_options: Optional[dict] = None,
               max_ongoing_requests: int = 256,
               name: str = "mmexit"):
    """A bound Ray Serve application: ``num_replicas`` fixed replicas or an ``autoscaling_config``."""
    from ray import serve

    deployment = serve.deployment(serve.ingress()(MMExitReplica))
    options: dict[str, Any] = {"name": name, "max_ongoing_requests": int(max_ongoing_requests),
                               "ray_actor_options": ray_actor_options or {"num_cpus": 1},
                               "graceful_shutdown_timeout_s": float(timeout) + 5.0}
    if autoscaling_config is not None:
        options["autoscaling_config"] = autoscaling_config
    else:
        options["num_replicas"] = int(num_replicas or 1)
    return deployment.options(**options).bind(str(run_dir), rule, engine, int(max_batch), int(max_queue),
                                              float(timeout), device, threads, slots, max_wait_ms, max_wait_calls)


def build_app(args: dict):
    """Application builder for ``serve run mmexit.serve.ray_deployment:build_app run_dir=... [key=value]``."""
    args = dict(args)
    run_dir = args.pop("run_dir")
    numbers = {"max_batch": int, "max_queue": int, "timeout": float, "threads": int, "slots": int,
               "max_wait_ms": float, "max_wait_calls": int, "num_replicas": int, "max_ongoing_requests": int}
    typed = {key: numbers[key](value) if key in numbers else value for key, value in args.items()}
    return mmexit_app(run_dir, **typed)
