"""What the HTTP app and the Ray Serve deployment share: request parsing, limits, engines, answers.

``build_service(predictor, engine=...)`` wraps a loaded run (``mmexit.load``) with its engine:
  - text runs: ``continuous`` (the layer-level engine, ``mmexit.serve.engine``), ``batch`` (a
    shrinking batch, today's ``early_exit_forward`` path) or ``full`` (``model.forward_full``);
  - caption runs: a request-level batcher around ``CaptionPredictor.caption``.
Each bad request raises ``RequestError(status, message)`` with a one-line message; engine
outcomes map to 503 (queue full, with Retry-After; shutting down) and 504 (timeout).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mmexit.data.examples import TextExample
from mmexit.serve.batcher import BatchEngine, caption_batch, text_batch_engine
from mmexit.serve.engine import ContinuousEngine
from mmexit.serve.engine_base import BaseEngine, EngineFull, EngineStopped
from mmexit.serve.text_rows import encode_rows, row_result

ENGINES = ("continuous", "batch", "full")
ITEM_HELP = 'a string, a [text, text_pair] pair or an object {"text": ..., "text_pair": ...}'


class RequestError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}`` (one line)."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Limits:
    """Per-request limits: texts and characters per text, images and bytes per image, body bytes,
    seconds before 504. ``retry_after`` is the Retry-After (s) of a 503."""

    max_texts: int = 256
    max_chars: int = 20_000
    max_images: int = 16
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 25_000_000
    max_body_bytes: int = 32 * 2**20
    timeout: float = 30.0
    retry_after: int = 1


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def parse_json(body: bytes) -> Any:
    """A JSON request body (UTF-8), or RequestError(400) naming where it breaks."""
    try:
        return json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise RequestError(400, f"request body is not UTF-8 text (byte {error.start})") from None
    except RecursionError:
        raise RequestError(400, "request body is nested too deeply") from None
    except json.JSONDecodeError as error:
        raise RequestError(400, f"request body is not valid JSON ({error.msg} at line {error.lineno} "
                                f"column {error.colno})") from None


class Service:
    """A loaded run, its engine and limits. Subclasses: ``TextService``, ``CaptionService``."""

    task = "?"

    def __init__(self, predictor, engine: BaseEngine, limits: Limits) -> None:
        self.predictor, self.engine, self.limits = predictor, engine, limits

    def start(self) -> "Service":
        self.engine.start()
        return self

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> bool:
        return self.engine.stop(drain=drain, timeout=timeout)

    def health(self) -> dict:
        return {"status": "ok" if self.engine.alive else "stopped", "task": self.predictor.task,
                "operating_point": self.predictor.operating_point, **self.engine.describe(),
                "queue_depth": self.engine.depth, "run_dir": str(self.predictor.run_dir),
                "exit_layers": list(self.predictor.model.exit_layers) if hasattr(self.predictor.model, "exit_layers")
                else None}

    async def run(self, items: Sequence[Any]) -> list:
        """Submit rows to the engine and await them (503 when full or stopping, 504 on timeout)."""
        try:
            future = self.engine.submit(items)
        except EngineFull as error:
            raise RequestError(503, f"server busy: {error}; retry later",
                               {"Retry-After": str(self.limits.retry_after)}) from None
        except EngineStopped as error:
            raise RequestError(503, str(error), {"Retry-After": str(self.limits.retry_after)}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.limits.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            future.cancel()
            raise RequestError(504, f"no answer within {self.limits.timeout:g} s (the request was dropped)") from None
        except EngineStopped as error:
            raise RequestError(503, str(error)) from None


class TextService(Service):
    """``/v1/classify``: texts (or pairs) -> labels, probabilities and exit layers."""

    task = "text_classification"

    def parse(self, payload: Any) -> list[TextExample]:
        """{"texts": [item, ...]} -> examples, or RequestError naming the first problem."""
        limits = self.limits
        if not isinstance(payload, dict) or "texts" not in payload:
            raise RequestError(400, f'expected a JSON object {{"texts": [...]}}, got {_type_name(payload)}'
                               + (" without \"texts\"" if isinstance(payload, dict) else ""))
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise RequestError(400, f'"texts" must be an array of texts, got {_type_name(texts)}')
        if not texts:
            raise RequestError(400, '"texts" is empty: give at least one text')
        if len(texts) > limits.max_texts:
            raise RequestError(413, f'too many texts: {len(texts)} (at most {limits.max_texts} per request)')
        examples = []
        for position, item in enumerate(texts):
            if isinstance(item, str):
                example = TextExample(item, None, 0)
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(t, str) for t in item):
                example = TextExample(item[0], item[1], 0)
            elif isinstance(item, dict):
                for key, allowed in (("text", (str,)), ("text_pair", (str, type(None)))):
                    if not isinstance(item.get(key), allowed):
                        wanted = "a string" if key == "text" else "a string or null"
                        got = "nothing" if key not in item else _type_name(item[key])
                        raise RequestError(400, f"texts[{position}].{key}: expected {wanted}, got {got}")
                example = TextExample(item["text"], item.get("text_pair"), 0)
            else:
                raise RequestError(400, f"texts[{position}]: expected {ITEM_HELP}, got {_type_name(item)}")
            chars = len(example.text_a) + len(example.text_b or "")
            if chars > limits.max_chars:
                raise RequestError(413, f"texts[{position}]: {chars} characters (at most {limits.max_chars})")
            examples.append(example)
        return examples

    async def classify(self, payload: Any) -> dict:
        examples = self.parse(payload)
        predictor = self.predictor
        rows = encode_rows(predictor.processor, examples, predictor.max_length)
        outputs = await self.run(rows)
        names = predictor.label_names
        temperatures = None if self.engine.kind == "full" else getattr(predictor.rule, "temperatures", None)
        return {"results": [row_result(output, names, temperatures) for output in outputs],
                "operating_point": self.operating_point}

    @property
    def operating_point(self) -> str:
        return "full" if self.engine.kind == "full" else self.predictor.operating_point

    def health(self) -> dict:
        return super().health() | {"operating_point": self.operating_point}


class CaptionService(Service):
    """``/v1/caption``: images (multipart files or base64 JSON) -> captions and layers per token."""

    task = "captioning"

    def decode_images(self, blobs: Sequence[bytes]) -> list:
        """Raw image files -> PIL images (RGB, fully decoded), or RequestError naming the first bad one."""
        from PIL import Image

        limits = self.limits
        if not blobs:
            raise RequestError(400, "no images: send multipart files or {\"images\": [BASE64, ...]}")
        if len(blobs) > limits.max_images:
            raise RequestError(413, f"too many images: {len(blobs)} (at most {limits.max_images} per request)")
        images = []
        for position, blob in enumerate(blobs):
            if len(blob) > limits.max_image_bytes:
                raise RequestError(413, f"images[{position}]: {len(blob)} bytes (at most {limits.max_image_bytes})")
            try:
                with Image.open(io.BytesIO(blob)) as image:
                    if image.size[0] * image.size[1] > limits.max_image_pixels:
                        raise RequestError(413, f"images[{position}]: {image.size[0]}x{image.size[1]} pixels "
                                                f"(at most {limits.max_image_pixels})")
                    images.append(image.convert("RGB"))
            except RequestError:
                raise
            except Exception as error:  # PIL raises many types for corrupt files
                raise RequestError(400, f"images[{position}]: cannot read the image "
                                        f"({error.__class__.__name__})") from None
        return images

    def parse_json_images(self, payload: Any) -> list[bytes]:
        if not isinstance(payload, dict) or not isinstance(payload.get("images"), list):
            raise RequestError(400, f'expected a JSON object {{"images": [BASE64, ...]}}, got {_type_name(payload)}')
        blobs = []
        for position, item in enumerate(payload["images"]):
            if not isinstance(item, str):
                raise RequestError(400, f"images[{position}]: expected a base64 string, got {_type_name(item)}")
            data = item.split(",", 1)[1] if item.startswith("data:") and "," in item else item
            try:
                blobs.append(base64.b64decode(data, validate=True))
            except (binascii.Error, ValueError):
                raise RequestError(400, f"images[{position}]: not valid base64") from None
        return blobs

    async def caption(self, blobs: Sequence[bytes]) -> dict:
        images = self.decode_images(blobs)
        results = await self.run(images)
        return {"results": results, "operating_point": self.predictor.operating_point}


def build_service(predictor, engine: str = "continuous", max_batch: int = 32, max_queue: int = 1024,
                  limits: Optional[Limits] = None, slots: Optional[int] = None, max_wait_ms: Optional[float] = None
                  ) -> Service:
    """The service of a loaded run with the chosen engine (not started)."""
    limits = limits or Limits()
    if predictor.task == "captioning":
        batcher = BatchEngine(caption_batch(predictor), "caption", max_batch, max_queue,
                              5.0 if max_wait_ms is None else max_wait_ms)
        return CaptionService(predictor, batcher, limits)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    model, rule = predictor.model, predictor.rule
    pad_id = int(getattr(predictor.processor, "pad_token_id", 0) or 0)
    if engine == "continuous":
        built: BaseEngine = ContinuousEngine(model, rule, predictor.max_length, max_batch, max_queue, slots,
                                             100.0 if max_wait_ms is None else max_wait_ms, pad_id)
    else:
        built = text_batch_engine(model, rule, predictor.max_length, engine == "full", max_batch, max_queue,
                                  5.0 if max_wait_ms is None else max_wait_ms, pad_id)
    return TextService(predictor, built, limits)
