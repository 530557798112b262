"""Sweeps, operating-point selection and measured early-exit runs for text classifiers.

Three kinds of figures, never mixed up:
- *simulated* sweep rows: every layer ran once, exits decided afterwards with ``simulate_exits``
  (cheap, used for curves); labelled ``simulated: true``, no wall-clock figure;
- the operating point of each rule, chosen on the **calibration** split by
  ``mmexit.evaluation.operating_point`` (never on the test split);
- *measured* rows: the real batched early-exit path (``early_exit_forward``) on the evaluation
  split, timed against the full model by the BENCHMARKS.md protocol at each batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mmexit.evaluation.glue_metrics import compute_metrics, predictions_from_logits
from mmexit.evaluation.speed import efficiency, exit_histogram, layer_speedup
from mmexit.evaluation.timing import time_alternating
from mmexit.evaluation.rows import ResultRow
from mmexit.exits.base import ExitRule
from mmexit.inference.encoder import early_exit_forward
from mmexit.inference.exit_loop import simulate_exits
from mmexit.models.encoder import MultiExitEncoder


@dataclass
class SplitOutputs:
    """Every exit's outputs on one split: logits [M, N, C], pooled [M, N, H], labels [N]."""

    logits: Tensor
    pooled: Tensor
    labels: Tensor


@torch.inference_mode()
def collect_exit_outputs(model: MultiExitEncoder, batches: list[dict], accelerator=None,
                         desc: str = "exits") -> SplitOutputs:
    """Run every layer once over ``batches`` and keep each exit's logits and pooled states.

    With several processes, batch k is computed by process k % world_size and the results are
    gathered back in order, so every process ends with the whole split.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = next(model.parameters()).device
    mine = []
    quiet = accelerator is not None and not accelerator.is_local_main_process
    for index in tqdm(range(rank, len(batches), world), desc=desc, disable=quiet, leave=False):
        batch = batches[index]
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits, pooled = model.forward_exits(**inputs, return_pooled=True)
        mine.append((index, logits.float().cpu(), pooled.float().cpu(), batch["labels"].cpu()))
    if world > 1:
        from accelerate.utils import gather_object

        mine = sorted(gather_object(mine), key=lambda item: item[0])
    return SplitOutputs(torch.cat([m[1] for m in mine], 1), torch.cat([m[2] for m in mine], 1),
                        torch.cat([m[3] for m in mine]))


def score(metric_names: tuple[str, ...], logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Task metrics of per-row logits [N, C] against labels [N]."""
    return compute_metrics(metric_names, predictions_from_logits(logits), labels.numpy())


def simulated_point(rule: ExitRule, outputs: SplitOutputs, exit_layers: list[int],
                    metric_names: tuple[str, ...]) -> tuple[dict[str, float], float, Tensor]:
    """Metrics, layer speed-up and exit index [N] of ``rule`` decided on precomputed exits."""
    hidden = outputs.pooled if rule.needs_hidden else None
    exit_index = simulate_exits(rule, outputs.logits, hidden)
    chosen = outputs.logits[exit_index, torch.arange(exit_index.numel())]
    layers = torch.tensor(exit_layers)[exit_index]
    return score(metric_names, chosen, outputs.labels), layer_speedup(layers, exit_layers[-1]), exit_index


@torch.inference_mode()
def run_early_exit(model: MultiExitEncoder, rule: ExitRule, batches: list[dict]) -> tuple[Tensor, Tensor]:
    """The real batched path over ``batches``: chosen logits [N, C] and exit index [N]."""
    device = next(model.parameters()).device
    logits, exits = [], []
    for batch in tqdm(batches, desc=f"early exit {rule.describe()}", leave=False):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        output = early_exit_forward(model, rule, **inputs)
        logits.append(output.logits.float().cpu())
        exits.append(output.exit_index.cpu())
    return torch.cat(logits), torch.cat(exits)


def time_against_full(model: MultiExitEncoder, rule: ExitRule, batches: list[dict], repeats: int) -> dict:
    """Median seconds of the full model and the early-exit path over the same batches (A B A B)."""
    device = next(model.parameters()).device
    inputs = [{k: v.to(device) for k, v in b.items() if k != "labels"} for b in batches]

    def full() -> None:
        for item in inputs:
            model.forward_full(**item)

    def early() -> None:
        for item in inputs:
            early_exit_forward(model, rule, **item)

    times = time_alternating({"full": full, "exit": early}, repeats=repeats, warmup=1)
    return {"time_full_s": times["full"], "time_exit_s": times["exit"], "wall_speedup": times["full"] / times["exit"]}


def measured_rows(model: MultiExitEncoder, rule: ExitRule, method: str, split: str, eval_batches: list[dict],
                  timing_batches: dict[int, list[dict]], labels: Tensor, metric_names: tuple[str, ...],
                  primary: str, repeats: int, extra: Optional[dict] = None) -> tuple[list[dict], Tensor, Tensor]:
    """Rows of one operating point measured on the real path, one per timing batch size.

    Metrics, exit histogram and layer speed-up come from running the whole split through
    ``early_exit_forward``; the wall-clock speed-up from timing the subset in ``timing_batches``
    (efficiency divides it by the layer speed-up of that same subset).
    """
    logits, exit_index = run_early_exit(model, rule, eval_batches)
    layers = torch.tensor(model.exit_layers)[exit_index]
    metrics = score(metric_names, logits, labels)
    speedup = layer_speedup(layers, model.num_layers)
    rows = []
    extra = dict(extra or {})
    warning = "; ".join(w for w in (extra.pop("note", None), rule.warning) if w) or None
    for batch_size, batches in timing_batches.items():
        timed_rows = sum(b["input_ids"].shape[0] for b in batches)
        _, timed_exits = run_early_exit(model, rule, batches)
        timed_speedup = layer_speedup(torch.tensor(model.exit_layers)[timed_exits], model.num_layers)
        timing = time_against_full(model, rule, batches, repeats)
        rows.append(ResultRow(
            method, rule.describe(), rule.threshold, split, metrics, primary, speedup,
            exit_histogram(exit_index, model.exit_layers), False, timing["wall_speedup"],
            efficiency(timing["wall_speedup"], timed_speedup), batch_size, warning,
            extra={"timed_samples": timed_rows, "timed_layer_speedup": timed_speedup,
                   "time_full_s": timing["time_full_s"], "time_exit_s": timing["time_exit_s"], **extra},
        ).to_dict())
    return rows, logits, exit_index


def sweep_rows(rule: ExitRule, thresholds: list[float], method: str, split: str, outputs: SplitOutputs,
               exit_layers: list[int], metric_names: tuple[str, ...], primary: str) -> list[dict]:
    """Simulated rows of a threshold sweep (all layers ran; labelled simulated)."""
    rows = []
    for threshold in thresholds:
        point = rule.with_threshold(threshold)
        metrics, speedup, exit_index = simulated_point(point, outputs, exit_layers, metric_names)
        rows.append(ResultRow(method, point.describe(), threshold, split, metrics, primary, speedup,
                              exit_histogram(exit_index, exit_layers), True, warning=point.warning).to_dict())
    return rows

