"""Request-level batching: collect up to ``max_batch`` rows (or wait ``max_wait_ms``), run them together.

``BatchEngine(run_batch)`` is the classic dynamic batcher: the model thread takes the queue's
oldest rows (whole requests or parts of them, FIFO), waits at most ``max_wait_ms`` for a fuller
batch, and calls ``run_batch(items) -> outputs`` once. Three batch functions:
  - ``early_exit_batch``: today's path, ``early_exit_forward`` on the padded batch (a shrinking
    batch: exited rows leave it, the batch ends with its slowest row);
  - ``full_model_batch``: ``model.forward_full`` (every row runs every layer, the last exit only);
  - captioning: ``CaptionPredictor.caption`` on a list of images (``caption_batch``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch

from mmexit.exits.base import ExitRule
from mmexit.inference.encoded_rows import EncodedRow, RowOutput, pad_rows
from mmexit.inference.encoder import early_exit_forward
from mmexit.models.encoder import MultiExitEncoder
from mmexit.serve.engine_base import BaseEngine

BatchFn = Callable[[Sequence[Any]], list]


class BatchEngine(BaseEngine):
    """A dynamic batcher around ``run_batch(items) -> outputs`` (one output per item, in order)."""

    def __init__(self, run_batch: BatchFn, kind: str = "batch", max_batch: int = 32, max_queue: int = 1024,
                 max_wait_ms: float = 5.0, check: Optional[Callable[[Any], None]] = None,
                 max_queue_wait: Optional[float] = None) -> None:
        super().__init__(max_batch, max_queue, max_queue_wait)
        self.run_batch, self.kind = run_batch, kind
        self.max_wait = float(max_wait_ms) / 1000.0
        self.check = check
        self.in_flight: list[tuple[Any, int]] = []
        self.calls = 0

    def describe(self) -> dict:
        return super().describe() | {"max_wait_ms": self.max_wait * 1000.0}

    def _check_items(self, items: Sequence[Any]) -> None:
        if self.check is not None:
            for item in items:
                self.check(item)

    def _step(self) -> None:
        with self.cond:
            while not self.stopping and self.pending:
                waited = time.monotonic() - self.pending[0].submitted
                if self._pending_rows() >= self.max_batch or waited >= self.max_wait:
                    break
                self.cond.wait(self.max_wait - waited)
            self.in_flight = self._take(self.max_batch)
        if not self.in_flight:
            return
        start = time.perf_counter()
        outputs = self.run_batch([request.items[row] for request, row in self.in_flight])
        self._account(time.perf_counter() - start, len(outputs))
        self.calls += 1
        taken, self.in_flight = self.in_flight, []
        for (request, row), output in zip(taken, outputs):
            self._answer(request, row, output)

    def _fail_in_flight(self, error: BaseException) -> None:
        for request, _ in self.in_flight:
            self._fail(request, error)
        self.in_flight = []


def _report(engine_hooks: BaseEngine, exit_layers: Sequence[int], layers: torch.Tensor, num_layers: int) -> None:
    """Rows per layer call and exits per layer of one shrinking batch, from its rows' exit layers [rows]."""
    if engine_hooks.on_call is not None:
        engine_hooks.on_call(0, int(layers.numel()))
        for layer in range(1, num_layers + 1):
            engine_hooks.on_call(layer, int((layers >= layer).sum()))
    if engine_hooks.on_exit is not None:
        for layer in exit_layers:
            count = int((layers == layer).sum())
            if count:
                engine_hooks.on_exit(int(layer), count)


def early_exit_batch(model: MultiExitEncoder, rule: ExitRule, pad_id: int = 0,
                     hooks: Optional[BaseEngine] = None) -> BatchFn:
    """Rows -> RowOutputs through ``early_exit_forward`` on the padded batch (a shrinking batch)."""
    device = next(model.parameters()).device

    def run(rows: Sequence[EncodedRow]) -> list[RowOutput]:
        batch = {k: v.to(device) for k, v in pad_rows(rows, pad_id).items()}
        output = early_exit_forward(model, rule, **batch)
        logits, exits, layers = output.logits.float().cpu(), output.exit_index.cpu(), output.layers_used.cpu()
        if hooks is not None:
            _report(hooks, model.exit_layers, layers, model.num_layers)
        return [RowOutput(logits[i], int(exits[i]), int(layers[i])) for i in range(len(rows))]

    return run


def full_model_batch(model: MultiExitEncoder, pad_id: int = 0, hooks: Optional[BaseEngine] = None) -> BatchFn:
    """Rows -> RowOutputs through ``model.forward_full`` (every layer, the last exit)."""
    device = next(model.parameters()).device
    last = model.num_exits - 1

    def run(rows: Sequence[EncodedRow]) -> list[RowOutput]:
        batch = {k: v.to(device) for k, v in pad_rows(rows, pad_id).items()}
        logits = model.forward_full(**batch).float().cpu()
        if hooks is not None:
            _report(hooks, model.exit_layers, torch.full((len(rows),), model.num_layers), model.num_layers)
        return [RowOutput(logits[i], last, model.num_layers) for i in range(len(rows))]

    return run


def text_batch_engine(model: MultiExitEncoder, rule: Optional[ExitRule], max_length: int, full: bool = False,
                      max_batch: int = 32, max_queue: int = 1024, max_wait_ms: float = 5.0,
                      pad_id: int = 0, max_queue_wait: Optional[float] = None) -> BatchEngine:
    """A ``BatchEngine`` of text rows: the shrinking batch (``full=False``) or the full model."""
    def check(item: Any) -> None:
        if not isinstance(item, EncodedRow):
            raise TypeError(f"text engines take EncodedRow items, got {type(item).__name__}")
        if not 0 < item.length <= max_length:
            raise ValueError(f"a row has {item.length} tokens; this engine takes 1 to {max_length}")

    engine = BatchEngine(lambda rows: [], "full" if full else "batch", max_batch, max_queue, max_wait_ms, check,
                         max_queue_wait)
    # the batch function reports rows per layer and exits to the engine's hooks (set by the metrics)
    engine.run_batch = (full_model_batch(model, pad_id, engine) if full
                        else early_exit_batch(model, rule, pad_id, engine))
    return engine


def caption_batch(predictor) -> BatchFn:
    """PIL images -> caption dicts through ``CaptionPredictor.caption`` (its own batched decoding)."""

    def run(images: Sequence[Any]) -> list[dict]:
        return predictor.caption(list(images), batch_size=max(1, len(images)))

    return run
