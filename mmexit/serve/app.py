"""The FastAPI app of ``mmexit serve``: health, classify, caption, metrics; one-line JSON errors.

- ``GET /livez``: 200 while the process answers (a Kubernetes liveness probe);
- ``GET /readyz``: 200 when every engine is ready, else 503 with the state (starting, restarting
  after a worker died, draining, stopped, failed): a readiness probe;
- ``GET /health``: 200 with the task, operating point, engine, state and queue depth once loaded
  (503 when an engine is not running);
- ``POST /v1/classify[?engine=continuous|batch|full]``:
  ``{"texts": [TEXT | [TEXT, PAIR] | {"text": .., "text_pair": ..}, ...]}``
  -> ``{"results": [{"label", "label_index", "probabilities", "exit_layer"}], "operating_point"}``;
- ``POST /v1/caption``: multipart image files, or ``{"images": [BASE64, ...]}`` ->
  ``{"results": [{"caption", "tokens", "layers"}], "operating_point"}``;
- ``GET /metrics``: Prometheus text format (``mmexit.serve.metrics``).
Every error is ``{"error": "<one line>"}``: 400 malformed JSON / wrong types / empty / the other
task's endpoint, 404, 405, 413 over a limit, 503 + Retry-After when the queue is full or the
server drains, 504 past the request timeout, 500 for an engine failure. Requests of all clients
go to one engine, which batches them. On shutdown (SIGTERM) uvicorn stops accepting, lets the
requests in flight finish, then the engine drains and stops.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mmexit.serve.metrics import ServeMetrics
from mmexit.serve.service import CaptionService, RequestError, Service, TextService, parse_json

LOG = logging.getLogger("mmexit.serve")


def error(status: int, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP answer by endpoint and status, and times it."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - start)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading when the length is known)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError(400, f"bad Content-Length header: {length!r}")
        if int(length) > limit:
            raise RequestError(413, f"request body of {int(length)} bytes (at most {limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(service: Service, metrics: Optional[ServeMetrics] = None, manage_engine: bool = True) -> FastAPI:
    """The app around a built service; with ``manage_engine`` its lifespan starts and drains the engine."""
    metrics = metrics or ServeMetrics()
    for name, engine in service.engines.items():
        metrics.attach(name, engine)
    metrics.attach_service(service)
    limits = service.limits

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if manage_engine:
            service.start()
        yield
        if manage_engine:
            await asyncio.to_thread(service.stop, True, limits.timeout + 5.0)

    app = FastAPI(title="mmexit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.service, app.state.metrics = service, metrics

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"not found: {request.url.path} (endpoints: GET /livez, GET /readyz, GET /health, GET /metrics, "
                         "POST /v1/classify, POST /v1/caption)",
                    405: f"method {request.method} not allowed on {request.url.path}"}
        return error(exc.status_code, messages.get(exc.status_code, str(exc.detail)), getattr(exc, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(_: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        LOG.exception("request failed")
        return error(500, f"internal error: {exc.__class__.__name__}: {exc}")

    @app.get("/livez")
    async def livez() -> JSONResponse:
        return JSONResponse({"status": "alive"})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        state = service.state()
        return JSONResponse({"status": state}, status_code=200 if state == "ready" else 503)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        if not isinstance(service, TextService):
            raise RequestError(400, "this server runs a captioning model: POST images to /v1/caption")
        payload = parse_json(await read_body(request, limits.max_body_bytes))
        return JSONResponse(await service.classify(payload, request.query_params.get("engine")))

    @app.post("/v1/caption")
    async def caption(request: Request) -> JSONResponse:
        if not isinstance(service, CaptionService):
            raise RequestError(400, "this server runs a text classification model: POST texts to /v1/classify")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > limits.max_body_bytes:
                raise RequestError(413, f"request body of {int(length)} bytes (at most {limits.max_body_bytes})")
            try:
                form = await request.form(max_files=limits.max_images + 1, max_fields=limits.max_images + 8)
            except Exception as exc:  # malformed multipart bodies, too many parts
                raise RequestError(400, f"cannot read the multipart body: {getattr(exc, 'detail', exc)}") from None
            files = [value for _, value in form.multi_items() if hasattr(value, "read")]
            if len(files) > limits.max_images:
                raise RequestError(413, f"too many images (at most {limits.max_images} per request)")
            blobs = [await upload.read(limits.max_image_bytes + 1) for upload in files]
        else:
            blobs = service.parse_json_images(parse_json(await read_body(request, limits.max_body_bytes)))
        return JSONResponse(await service.caption(blobs, request.query_params.get("engine")))

    return app
