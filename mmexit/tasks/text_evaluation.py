"""Text classification's hooks of the one evaluation loop (``evaluation.loop.evaluate_rules``).

Every exit's outputs on the calibration and evaluation splits are collected once (all layers
run); sweeps over each rule's operating points are *simulated* from them; the loop chooses each
rule's point on the calibration split; the chosen point is then run through the real batched
early-exit path on the evaluation split and timed against the full model. Every exit's outputs
on both splits are saved to ``exit_outputs.safetensors`` for ``tools/control.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmexit.evaluation import text_eval
from mmexit.evaluation.exit_outputs import EXIT_OUTPUTS_FILE, ExitOutputs, save_exit_outputs
from mmexit.evaluation.loop import Sweep
from mmexit.evaluation.operating_point import Candidate, Choice, choose_operating_point
from mmexit.evaluation.rows import full_model_rows
from mmexit.exits.base import ExitRule
from mmexit.inference.exit_loop import simulate_exits
from mmexit.tasks.base import Run


class TextEvaluator:
    """The loop's hooks for ``task: text_classification`` (see ``evaluation.loop.Evaluator``).

    ``split_outputs(split)`` gives every exit's outputs on a split (collected once per run);
    ``split_batches(split, batch_size, limit)`` the padded batches of a split."""

    def __init__(self, run: Run, split_outputs, split_batches) -> None:
        self.run, self.data, self.model = run, run.data, run.model
        self.evaluate = run.recipe["evaluate"]
        self.split, self.calib_split = self.evaluate["split"], run.recipe["calibration"]["split"]
        self.calib_outputs = split_outputs(self.calib_split)
        self.outputs = split_outputs(self.split)
        self.split_batches = split_batches
        self.exit_layers = list(self.model.exit_layers)
        self.method_prefix = loss_label(run.recipe)
        self.grids: list[list[float]] = []  # each swept rule's thresholds, in the loop's order
        examples = self.data.splits[self.split]
        self.lines = [{"index": i, **_input_fields(example), "label": label, "full": full}
                      for i, (example, label, full) in enumerate(zip(examples, self.outputs.labels.tolist(),
                                                                      _predictions(self.outputs.logits[-1])))]

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return text_eval.score(self.data.metrics, logits, labels)[self.data.primary_metric]

    def reference(self) -> tuple[list[dict], float]:
        full_metrics = text_eval.score(self.data.metrics, self.outputs.logits[-1], self.outputs.labels)
        rows = full_model_rows(self.split, full_metrics, self.data.primary_metric, self.model.num_layers,
                               self.outputs.labels.numel(), self.evaluate["timing_batch_sizes"])
        return rows, self.score(self.calib_outputs.logits[-1], self.calib_outputs.labels)

    def candidates(self, rule: ExitRule, thresholds: Sequence[float], outputs: text_eval.SplitOutputs) -> list[Candidate]:
        """Simulated points of ``rule`` on ``outputs`` (the chooser's input)."""
        out = []
        for threshold in thresholds:
            metrics, speedup, _ = text_eval.simulated_point(rule.with_threshold(threshold), outputs, self.exit_layers,
                                                            self.data.metrics)
            out.append(Candidate(threshold, metrics[self.data.primary_metric], speedup))
        return out

    def sweep(self, rule: ExitRule, thresholds: Sequence[float]) -> Sweep:
        self.grids.append(list(thresholds))
        rows = text_eval.sweep_rows(rule, list(thresholds), self.method(rule), self.split, self.outputs,
                                    self.exit_layers, self.data.metrics, self.data.primary_metric)
        return Sweep(rows, self.candidates(rule, thresholds, self.calib_outputs))

    def method(self, rule: ExitRule) -> str:
        return f"{self.method_prefix}+{rule.name}"

    def save_outputs(self) -> None:
        """Every exit's outputs on both splits, to the run's ``exit_outputs.safetensors``."""
        save_exit_outputs(self.run.write_dir / EXIT_OUTPUTS_FILE, ExitOutputs(
            self.calib_outputs.logits, self.calib_outputs.labels, self.outputs.logits, self.outputs.labels,
            self.exit_layers, self.data.name, self.data.primary_metric))

    def measure(self, points: list[tuple[ExitRule, Choice]]) -> list[dict]:
        evaluate = self.evaluate
        eval_batches = self.split_batches(self.split, evaluate["batch_size"])
        timing_batches = {size: self.split_batches(self.split, size, evaluate["timing_samples"])
                          for size in evaluate["timing_batch_sizes"]}
        rows: list[dict] = []
        for (point, choice), thresholds in zip(points, self.grids):
            measured, logits, exit_index = text_eval.measured_rows(
                self.model, point, self.method(point), self.split, eval_batches, timing_batches, self.outputs.labels,
                self.data.metrics, self.data.primary_metric, evaluate["timing_repeats"],
                choice.as_extra(self.calib_split))
            rows += self.precision_effect(point, thresholds, measured, exit_index, logits)
            for line, prediction, exit_at in zip(self.lines, _predictions(logits), exit_index.tolist()):
                line[point.describe()] = {"prediction": prediction, "exit_layer": self.exit_layers[exit_at]}
        return rows

    def predictions(self) -> list[dict]:
        return self.lines

    def precision_effect(self, point: ExitRule, thresholds: Sequence[float], rows: list[dict],
                         exit_index: torch.Tensor, logits: torch.Tensor) -> list[dict]:
        """``rows`` with what ``evaluate.dtype`` changed against float32 (when it is not float32), on the
        evaluation split: ``exits_changed``, the share of rows whose exit differs from the float32
        model's at the same operating point (its exits decided on the float32 outputs);
        ``predictions_changed``, the share whose prediction differs; ``float32_point``, the point the
        chooser picks on the float32 outputs (with the rule's calibration as fitted at this dtype).

        exit_index [N] and logits [N, C]: the deployed model's real early-exit path."""
        reference = self.run.state.get("float32")
        if not reference:
            return rows
        test, calib = reference[self.split], reference[self.calib_split]
        exits = simulate_exits(point, test.logits, test.pooled if point.needs_hidden else None)
        chosen = test.logits[exits, torch.arange(exits.numel())]  # [N, C]
        changed = [a != b for a, b in zip(_predictions(chosen), _predictions(logits))]
        full = self.score(calib.logits[-1], calib.labels)
        choice = choose_operating_point(self.candidates(point, thresholds, calib), full, self.evaluate["tolerance"])
        extra = {"exits_changed": float((exits != exit_index.cpu()).float().mean()),
                 "predictions_changed": sum(changed) / max(len(changed), 1), "float32_point": choice.point}
        return [row | extra for row in rows]


def _input_fields(example) -> dict:
    fields = {"text": example.text_a}
    if example.text_b is not None:
        fields["text_pair"] = example.text_b
    return fields


def _predictions(logits: torch.Tensor) -> list:
    return logits[:, 0].tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()


def loss_label(recipe: dict) -> str:
    """How the exits were trained, for the ``method`` column."""
    if recipe["train"]["schedule"] == "two_stage":
        return "two_stage"
    spec = recipe["train"]["loss"]
    return spec.get("name") or spec["_target_"].rsplit(".", 1)[-1]
