"""What the HTTP app and the Ray Serve deployment share: request parsing, limits, engines, answers.

``build_service(predictor, engine=...)`` wraps a loaded run (``mmexit.load``) with its engines:
  - text runs: ``continuous`` (the layer-level engine, ``mmexit.serve.engine``), ``batch`` (a
    shrinking batch, today's ``early_exit_forward`` path) and ``full`` (``model.forward_full``),
    all three behind one server (a request picks one with ``?engine=``; ``engine`` is the default);
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
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from mmexit.data.coco import upright_rgb
from mmexit.data.examples import TextExample
from mmexit.serve.batcher import BatchEngine, caption_batch, text_batch_engine
from mmexit.serve.caption_engine import ContinuousCaptionEngine, continuous_captions_supported
from mmexit.serve.engine import ContinuousEngine
from mmexit.serve.engine_base import BaseEngine, EngineFull, EngineStopped
from mmexit.serve.text_rows import encode_rows, row_result

ITEM_HELP = 'a string, a [text, text_pair] pair or an object {"text": ..., "text_pair": ...}'


class RequestError(Exception):
    """A request the server answers with ``status`` and ``{"error": message}`` (one line)."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Limits:
    """Per-request limits: texts and characters per text, images and bytes per image, body bytes,
    seconds before 504; ``max_queue_wait``: refuse (503) past this many seconds of queued work
    (None: half the timeout; 0: no such bound). ``retry_after``: the Retry-After (s) of a 503 when
    the engine has no estimate yet."""

    max_texts: int = 256
    max_chars: int = 20_000
    max_images: int = 16
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 25_000_000
    max_body_bytes: int = 32 * 2**20
    timeout: float = 30.0
    retry_after: int = 1
    max_queue_wait: Optional[float] = None

    @property
    def queue_wait(self) -> Optional[float]:
        """The engines' ``max_queue_wait`` in seconds, or None for no time bound."""
        if self.max_queue_wait is None:
            return self.timeout / 2
        return self.max_queue_wait if self.max_queue_wait > 0 else None


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
    """A loaded run, its engines (by name; ``default`` answers requests that name none) and limits.
    Subclasses: ``TextService``, ``CaptionService``."""

    task = "?"

    def __init__(self, predictor, engines: dict[str, BaseEngine], limits: Limits, default: Optional[str] = None
                 ) -> None:
        self.predictor, self.engines, self.limits = predictor, dict(engines), limits
        self.default = default or next(iter(self.engines))

    @property
    def engine(self) -> BaseEngine:
        return self.engines[self.default]

    def engine_named(self, name: Optional[str]) -> BaseEngine:
        if name is None or name == "":
            return self.engine
        if name not in self.engines:
            raise RequestError(400, f"engine: unknown {name!r}; this server runs {', '.join(self.engines)}")
        return self.engines[name]

    def start(self) -> "Service":
        for engine in self.engines.values():
            engine.start()
        return self

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> bool:
        """Stop every engine (draining them one after the other); True when all stopped."""
        return all([engine.stop(drain=drain, timeout=timeout) for engine in self.engines.values()])

    def state(self) -> str:
        """ready when every engine is; else the first engine's other state (starting, restarting,
        draining, stopped, failed): what ``/readyz`` reports."""
        states = [engine.phase for engine in self.engines.values()]
        return next((state for state in states if state != "ready"), "ready")

    def health(self) -> dict:
        engine = self.engine
        state = self.state()
        return {"status": "ok" if all(e.alive for e in self.engines.values()) else state, "state": state,
                "task": self.predictor.task, "operating_point": self.predictor.operating_point,
                **engine.describe(), "engines": list(self.engines), "queue_depth": engine.depth,
                "run_dir": str(self.predictor.run_dir), "pid": os.getpid(),
                "exit_layers": list(getattr(self.predictor.model, "exit_layers", []) or []) or None}

    async def run(self, items: Sequence[Any], engine: Optional[str] = None) -> list:
        """Submit rows to an engine and await them (503 when full or stopping, 504 on timeout)."""
        chosen = self.engine_named(engine)
        try:
            future = chosen.submit(items)
        except EngineFull as error:
            raise RequestError(503, f"server busy: {error}; retry later",
                               {"Retry-After": str(error.retry_after)}) from None
        except EngineStopped as error:
            raise RequestError(503, str(error), {"Retry-After": str(self.limits.retry_after)}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.limits.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            future.cancel()
            raise RequestError(504, f"no answer within {self.limits.timeout:g} s (the request was dropped)") from None
        except EngineStopped as error:
            raise RequestError(503, str(error)) from None
        except EngineFull as error:  # refused by an engine process's own queue (mmexit.serve.engine_process)
            raise RequestError(503, f"server busy: {error}; retry later",
                               {"Retry-After": str(error.retry_after)}) from None


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

    async def classify(self, payload: Any, engine: Optional[str] = None) -> dict:
        """A parsed ``{"texts": [...]}`` body -> ``{"results": [...], "operating_point": ...}``."""
        chosen = self.engine_named(engine)
        examples = self.parse(payload)
        predictor = self.predictor
        rows = encode_rows(predictor.processor, examples, predictor.max_length)
        outputs = await self.run(rows, engine)
        names = predictor.label_names
        temperatures = None if chosen.kind == "full" else getattr(predictor.rule, "temperatures", None)
        return {"results": [row_result(output, names, temperatures) for output in outputs],
                "operating_point": self.operating_point(chosen.kind)}

    def operating_point(self, kind: Optional[str] = None) -> str:
        return "full" if (kind or self.engine.kind) == "full" else self.predictor.operating_point

    def health(self) -> dict:
        return super().health() | {"operating_point": self.operating_point()}


class CaptionService(Service):
    """``/v1/caption``: images (multipart files or base64 JSON) -> captions and layers per token."""

    task = "captioning"

    def decode_images(self, blobs: Sequence[bytes]) -> list:
        """Raw image files -> PIL images (upright RGB, fully decoded), or RequestError naming the first bad one."""
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
                    images.append(upright_rgb(image))
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

    async def caption(self, blobs: Sequence[bytes], engine: Optional[str] = None) -> dict:
        """Images -> captions, by the request batcher (``caption``, the default) or, where the server
        offers it, the continuous decoder (``?engine=continuous``)."""
        self.engine_named(engine)
        images = self.decode_images(blobs)
        results = await self.run(images, engine)
        return {"results": results, "operating_point": self.predictor.operating_point}


@dataclass
class EngineSettings:
    """What ``build_service`` hands every engine builder."""

    max_batch: int = 32
    max_queue: int = 1024
    slots: Optional[int] = None
    max_wait_ms: float = 5.0  # the request batchers' wait for a fuller batch
    max_wait_calls: Optional[int] = None  # the continuous engines' age bound, in layer calls
    group_lengths: bool = True
    queue_wait: Optional[float] = None


def _continuous_text(predictor, settings: EngineSettings) -> BaseEngine:
    return ContinuousEngine(predictor.model, predictor.rule, predictor.max_length, settings.max_batch,
                            settings.max_queue, settings.slots, settings.max_wait_calls, _pad_id(predictor),
                            settings.group_lengths, settings.queue_wait)


def _batch_text(predictor, settings: EngineSettings, full: bool = False) -> BaseEngine:
    return text_batch_engine(predictor.model, predictor.rule, predictor.max_length, full, settings.max_batch,
                             settings.max_queue, settings.max_wait_ms, _pad_id(predictor), settings.queue_wait)


def _pad_id(predictor) -> int:
    return int(getattr(predictor.processor, "pad_token_id", 0) or 0)


#: THE table of text engines: name -> builder(predictor, settings). A new engine is one file (its
#: runner under the continuous core, or a BaseEngine) plus one line here.
TEXT_ENGINES: dict[str, Callable[[Any, EngineSettings], BaseEngine]] = {
    "continuous": _continuous_text,
    "batch": _batch_text,
    "full": lambda predictor, settings: _batch_text(predictor, settings, full=True),
}
ENGINES = tuple(TEXT_ENGINES)


def build_service(predictor, engine: str = "continuous", max_batch: int = 32, max_queue: int = 1024,
                  limits: Optional[Limits] = None, slots: Optional[int] = None, max_wait_ms: Optional[float] = None,
                  engines: Optional[Sequence[str]] = None, group_lengths: bool = True,
                  max_wait_calls: Optional[int] = None) -> Service:
    """The service of a loaded run (not started). Text runs get ``engines`` (default: every engine of
    ``TEXT_ENGINES``, so one server compares them: ``POST /v1/classify?engine=full``), ``engine``
    answering by default. max_wait_ms: how long the request batchers wait for a fuller batch
    (default 5); max_wait_calls: the continuous engines' age bound of a layer queue, in layer calls
    (default: twice the layers)."""
    limits = limits or Limits()
    settings = EngineSettings(max_batch, max_queue, slots, 5.0 if max_wait_ms is None else max_wait_ms,
                              max_wait_calls, group_lengths, limits.queue_wait)
    if predictor.task == "captioning":
        batcher = BatchEngine(caption_batch(predictor), "caption", max_batch, max_queue, settings.max_wait_ms,
                              max_queue_wait=limits.queue_wait)
        captioners: dict[str, BaseEngine] = {"caption": batcher}
        recipe = getattr(predictor, "recipe", None)
        if engine == "continuous" and "continuous" in (engines or ENGINES) and recipe is not None and \
                continuous_captions_supported(recipe) is None:
            captioners["continuous"] = ContinuousCaptionEngine(predictor, slots or max_batch, max_queue,
                                                               limits.queue_wait, max_wait_calls=max_wait_calls)
        return CaptionService(predictor, captioners, limits, "caption")
    names = list(engines or ENGINES)
    if engine not in names:
        names.insert(0, engine)
    for name in names:
        if name not in TEXT_ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    return TextService(predictor, {name: TEXT_ENGINES[name](predictor, settings) for name in names}, limits, engine)
