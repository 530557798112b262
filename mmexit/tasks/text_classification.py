"""Text classification (GLUE, offline corpora) as a task: data, model, training, statistics, evaluation.

Evaluation: every exit's outputs on the calibration and evaluation splits are collected once
(all layers run); sweeps over each rule's operating points are *simulated* from them; each rule's
point is chosen on the calibration split (``choose_operating_point``); the chosen point is then
run through the real batched early-exit path on the evaluation split and timed against the full
model. Every exit's outputs on both splits are saved to ``exit_outputs.safetensors`` for
``tools/control.py``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from mmexit.calibration.statistics import ExitStatistics
from mmexit.data.examples import TextTask
from mmexit.data.text import Collator, LengthGroupedBatches, batches, load_text_task
from mmexit.errors import RecipeError
from mmexit.evaluation import text_eval
from mmexit.evaluation.operating_point import Candidate, choose_operating_point
from mmexit.evaluation.rows import full_model_rows
from mmexit.exits.base import ExitRule
from mmexit.inference.exit_loop import simulate_exits
from mmexit.models.encoder import CONFIG_NAME, MultiExitEncoder
from mmexit.models.loading import load_backbone, load_tokenizer, truncate_backbone
from mmexit.recipe.language import build_component
from mmexit.tasks.base import Evaluation, Run, Task
from mmexit.training.joint import FinalOnlyLoss, InternalExitsLoss
from mmexit.training.trainer import train_stage

logger = logging.getLogger(__name__)
EXIT_OUTPUTS_FILE = "exit_outputs.safetensors"


class TextClassificationTask(Task):
    """``task: text_classification``."""

    name = "text_classification"

    def load_data(self, recipe: dict) -> TextTask:
        data = load_text_task(recipe["data"])
        if not data.splits["train"] and "train" in recipe["run"]["stages"]:
            raise RecipeError(f"data: the training split of {data.name} is empty")
        for split in ("calib", recipe["evaluate"]["split"]):
            if not data.splits[split]:
                raise RecipeError(f"data: the {split} split of {data.name} is empty")
        return data

    def check_rules(self, recipe: dict, data: TextTask) -> None:
        for index, spec in enumerate(recipe["evaluate"]["rules"]):
            cls_rule = build_component(spec, "rule", f"evaluate.rules[{index}]", reserved=("sweep", "calibration"))
            if data.is_regression and cls_rule.needs_probabilities:
                raise RecipeError(f"evaluate.rules[{index}].name: rule '{cls_rule.name}' needs class probabilities, "
                                  f"but {data.name} is a regression task; allowed: patience, fixed, never")

    # ------------------------------------------------------------------------------------ model
    def build_model(self, run: Run) -> tuple[MultiExitEncoder, object]:
        model_cfg = run.recipe["model"]
        trained = run.output_dir / "model"
        source = model_cfg["init_from"]
        if source is None and "train" not in run.recipe["run"]["stages"]:
            if not (trained / CONFIG_NAME).exists():
                raise RecipeError(f"run.stages: no trained model in {trained} to evaluate (add the train stage, "
                                  "or set model.init_from to a trained run)")
            source = str(trained)
        tokenizer = load_tokenizer(model_cfg["backbone"], run.recipe["data"]["cache_dir"])
        if source is not None:
            model = MultiExitEncoder.from_pretrained(source)
            if model.num_labels != run.data.num_labels:
                raise RecipeError(f"model.init_from: {source} has {model.num_labels} outputs, "
                                  f"{run.data.name} needs {run.data.num_labels}")
            return model, tokenizer
        backbone = load_backbone(model_cfg["backbone"], run.recipe["data"]["cache_dir"], model_cfg["attn_implementation"])
        if model_cfg["num_layers"] is not None:
            truncate_backbone(backbone, model_cfg["num_layers"])
        model = MultiExitEncoder(backbone, run.data.num_labels, model_cfg["exits"], model_cfg["pooling"],
                                 model_cfg["head_dropout"])
        return model, tokenizer

    def train(self, run: Run) -> list[dict]:
        train, seed = run.recipe["train"], run.recipe["run"]["seed"]
        examples = run.data.splits["train"]
        collate = Collator(run.processor, run.recipe["model"]["max_length"])

        def stage(loss, epochs, lr, stage_seed, name):
            sampler = LengthGroupedBatches(examples, train["batch_size"], stage_seed)
            return train_stage(run.model, loss, examples, collate, run.accelerator, train, epochs, lr, stage_seed,
                               name, batch_sampler=sampler, checkpointing=run.checkpointing)

        if train["schedule"] == "two_stage":
            history = stage(FinalOnlyLoss(), train["epochs"], train["lr"], seed, "stage1")
            return history + stage(InternalExitsLoss(), train["stage2_epochs"] or train["epochs"],
                                   train["stage2_lr"] or train["head_lr"] or train["lr"], seed + 1, "stage2")
        loss = build_component(train["loss"], "loss", "train.loss")
        return stage(loss, train["epochs"], train["lr"], seed, "train")

    def save_model(self, run: Run, folder: Path) -> None:
        model = run.accelerator.unwrap_model(run.model)
        model.save_pretrained(folder, {"task": run.data.name, "labels": run.data.label_names,
                                       "max_length": run.recipe["model"]["max_length"]})
        run.processor.save_pretrained(str(folder))

    # ----------------------------------------------------------------------------- statistics
    def split_batches(self, run: Run, split: str, batch_size: int, limit: Optional[int] = None) -> list[dict]:
        """Padded batches of a split (tokenized before any timer starts)."""
        examples = run.data.splits[split][:limit] if limit else run.data.splits[split]
        return list(batches(run.processor, examples, batch_size, run.recipe["model"]["max_length"]))

    def _outputs(self, run: Run, split: str) -> text_eval.SplitOutputs:
        key = f"outputs:{split}"
        if key not in run.state:
            run.state[key] = text_eval.collect_exit_outputs(
                run.model, self.split_batches(run, split, run.recipe["evaluate"]["batch_size"]), run.accelerator,
                f"all exits ({split})")
        return run.state[key]

    def before_precision(self, run: Run) -> None:
        """Every exit's float32 outputs on the calibration and evaluation splits, kept to count the exit
        decisions ``evaluate.dtype`` changes and the point a float32 calibration would choose."""
        splits = {run.recipe["calibration"]["split"], run.recipe["evaluate"]["split"]}
        run.state["float32"] = {split: text_eval.collect_exit_outputs(
            run.model, self.split_batches(run, split, run.recipe["evaluate"]["batch_size"]), run.accelerator,
            f"float32 exits ({split})") for split in splits}

    def statistics(self, run: Run) -> ExitStatistics:
        outputs = self._outputs(run, run.recipe["calibration"]["split"])
        return ExitStatistics(outputs.labels, list(run.model.exit_layers), outputs.logits.shape[-1], outputs.logits)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, run: Run, rules: list[tuple[dict, ExitRule]], calib: ExitStatistics) -> Evaluation:
        evaluate = run.recipe["evaluate"]
        split, data, model = evaluate["split"], run.data, run.model
        calib_outputs = self._outputs(run, run.recipe["calibration"]["split"])
        outputs = self._outputs(run, split)
        exit_layers = list(model.exit_layers)
        full_metrics = text_eval.score(data.metrics, outputs.logits[-1], outputs.labels)
        rows = full_model_rows(split, full_metrics, data.primary_metric, model.num_layers, outputs.labels.numel(),
                               evaluate["timing_batch_sizes"])
        examples = data.splits[split]
        lines = [{"index": i, **_input_fields(example), "label": label, "full": full}
                 for i, (example, label, full) in enumerate(zip(examples, outputs.labels.tolist(),
                                                                 _predictions(outputs.logits[-1])))]
        chosen: dict[int, float] = {}
        if not run.accelerator.is_main_process:
            return Evaluation(rows, chosen, lines)
        save_exit_outputs(run, calib_outputs, outputs)
        eval_batches = self.split_batches(run, split, evaluate["batch_size"])
        timing_batches = {size: self.split_batches(run, split, size, evaluate["timing_samples"])
                          for size in evaluate["timing_batch_sizes"]}
        method_prefix = loss_label(run.recipe)
        calib_full = text_eval.score(data.metrics, calib_outputs.logits[-1], calib_outputs.labels)[data.primary_metric]
        for index, (spec, rule) in enumerate(rules):
            method = f"{method_prefix}+{rule.name}"
            thresholds = spec.get("sweep") or rule.default_sweep()
            rows += text_eval.sweep_rows(rule, thresholds, method, split, outputs, exit_layers, data.metrics,
                                         data.primary_metric)
            candidates = []
            for threshold in thresholds:
                metrics, speedup, _ = text_eval.simulated_point(rule.with_threshold(threshold), calib_outputs,
                                                                exit_layers, data.metrics)
                candidates.append(Candidate(threshold, metrics[data.primary_metric], speedup))
            choice = choose_operating_point(candidates, calib_full, evaluate["tolerance"])
            point = rule.with_threshold(choice.point)
            chosen[index] = choice.point
            measured, logits, exit_index = text_eval.measured_rows(
                model, point, method, split, eval_batches, timing_batches, outputs.labels, data.metrics,
                data.primary_metric, evaluate["timing_repeats"], choice.as_extra(run.recipe["calibration"]["split"]))
            rows += precision_effect(run, point, thresholds, measured, exit_index, logits)
            predictions = _predictions(logits)
            for line, prediction, exit_at in zip(lines, predictions, exit_index.tolist()):
                line[point.describe()] = {"prediction": prediction, "exit_layer": exit_layers[exit_at]}
        return Evaluation(rows, chosen, lines)

    def title(self, run: Run) -> str:
        return f"{run.recipe['run']['name']}: {run.recipe['model']['backbone']} on {run.data.name}"

    # ------------------------------------------------------------------------------ inference
    def load_for_inference(self, run_dir: Path, recipe: dict, device: Optional[str] = None, weights: bool = True):
        from transformers import AutoTokenizer

        folder = Path(run_dir) / "model"
        model = MultiExitEncoder.from_pretrained(folder, weights).eval()
        if device and weights:
            model.to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        return model, tokenizer


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


def precision_effect(run: Run, point: ExitRule, thresholds: list, rows: list[dict], exit_index: torch.Tensor,
                     logits: torch.Tensor) -> list[dict]:
    """``rows`` with what ``evaluate.dtype`` changed against float32 (when it is not float32), on the
    evaluation split: ``exits_changed``, the share of rows whose exit differs from the float32 model's
    at the same operating point (its exits decided on the float32 outputs); ``predictions_changed``,
    the share whose prediction differs; ``float32_point``, the point the operating-point choice picks
    on the float32 outputs (with the rule's calibration as fitted at this run's dtype).

    exit_index [N] and logits [N, C]: the deployed model's real early-exit path."""
    reference = run.state.get("float32")
    if not reference:
        return rows
    data, evaluate = run.data, run.recipe["evaluate"]
    test, calib = reference[evaluate["split"]], reference[run.recipe["calibration"]["split"]]
    exits = simulate_exits(point, test.logits, test.pooled if point.needs_hidden else None)
    chosen = test.logits[exits, torch.arange(exits.numel())]  # [N, C]
    changed = [a != b for a, b in zip(_predictions(chosen), _predictions(logits))]
    candidates = []
    for threshold in thresholds:
        metrics, speedup, _ = text_eval.simulated_point(point.with_threshold(threshold), calib,
                                                        list(run.model.exit_layers), data.metrics)
        candidates.append(Candidate(threshold, metrics[data.primary_metric], speedup))
    full = text_eval.score(data.metrics, calib.logits[-1], calib.labels)[data.primary_metric]
    extra = {"exits_changed": float((exits != exit_index.cpu()).float().mean()),
             "predictions_changed": sum(changed) / max(len(changed), 1),
             "float32_point": choose_operating_point(candidates, full, evaluate["tolerance"]).point}
    return [row | extra for row in rows]


def save_exit_outputs(run: Run, calib: text_eval.SplitOutputs, test: text_eval.SplitOutputs) -> None:
    """Every exit's logits and the labels on the calibration and evaluation splits, one safetensors file.

    Tensors ``calib.logits`` [M, Nc, C], ``calib.labels`` [Nc], ``test.logits``, ``test.labels``;
    metadata ``exit_layers`` (JSON), ``task``, ``primary_metric``.
    """
    from safetensors.torch import save as save_bytes

    from mmexit.files import atomic_write_bytes

    tensors = {"calib.logits": calib.logits.float().contiguous(), "calib.labels": calib.labels.contiguous(),
               "test.logits": test.logits.float().contiguous(), "test.labels": test.labels.contiguous()}
    metadata = {"exit_layers": json.dumps(list(run.model.exit_layers)), "task": run.data.name,
                "primary_metric": run.data.primary_metric}
    atomic_write_bytes(run.write_dir / EXIT_OUTPUTS_FILE, save_bytes(tensors, metadata=metadata))
