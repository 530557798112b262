"""The text-classification run: train -> calibrate -> evaluate -> report, from one recipe."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator

from mmexit.config import build_component
from mmexit.data.examples import TextTask
from mmexit.data.text import batches, load_text_task
from mmexit.errors import RecipeError
from mmexit.evaluation import text_eval
from mmexit.evaluation.results import atomic_write_text, write_results
from mmexit.evaluation.timing import machine_info
from mmexit.exits.base import ExitRule
from mmexit.models.encoder import MultiExitEncoder
from mmexit.models.loading import load_backbone, load_tokenizer, truncate_backbone
from mmexit.training.joint import FinalOnlyLoss, InternalExitsLoss
from mmexit.training.trainer import train_stage

logger = logging.getLogger(__name__)
RULE_RESERVED = ("sweep", "calibration")
PROBABILITY_RULES = ("maxprob", "entropy", "energy", "beem", "pcee")


@dataclass
class TextRun:
    """What the stages share: the validated recipe, its data, tokenizer and model."""

    recipe: dict
    task: TextTask
    output_dir: Path
    accelerator: Accelerator
    tokenizer: object = None
    model: Optional[MultiExitEncoder] = None


def prepare_text_run(recipe: dict, accelerator: Accelerator, output_dir: Path) -> TextRun:
    """Everything that can fail on bad input, done before anything is written: data, rules, model."""
    task = load_text_task(recipe["data"])
    for index, spec in enumerate(recipe["evaluate"]["rules"]):
        name = spec.get("name", spec.get("_target_", ""))
        if task.is_regression and name in PROBABILITY_RULES:
            raise RecipeError(
                f"evaluate.rules[{index}].name: rule '{name}' needs class probabilities, but {task.name} "
                "is a regression task; allowed: patience, fixed, never"
            )
    if not task.splits["train"] and "train" in recipe["run"]["stages"]:
        raise RecipeError(f"data: the training split of {task.name} is empty")
    run = TextRun(recipe, task, output_dir, accelerator)
    run.model = build_model(run).to(accelerator.device)  # a missing/unreachable model fails here
    return run


def build_model(run: TextRun) -> MultiExitEncoder:
    """A fresh model from ``model.backbone`` or a trained one (output folder / ``init_from``)."""
    model_cfg = run.recipe["model"]
    trained = run.output_dir / "model"
    source = model_cfg["init_from"]
    if source is None and "train" not in run.recipe["run"]["stages"] and (trained / "mmexit_model.json").exists():
        source = str(trained)
    run.tokenizer = load_tokenizer(model_cfg["backbone"], run.recipe["data"]["cache_dir"])
    if source is not None:
        model = MultiExitEncoder.from_pretrained(source)
        if model.num_labels != run.task.num_labels:
            raise RecipeError(f"model.init_from: {source} has {model.num_labels} outputs, {run.task.name} needs {run.task.num_labels}")
        return model
    if "train" not in run.recipe["run"]["stages"]:
        logger.warning("no trained model found (model.init_from unset, no %s): the exit heads are untrained", trained)
    backbone = load_backbone(model_cfg["backbone"], run.recipe["data"]["cache_dir"], model_cfg["attn_implementation"])
    if model_cfg["num_layers"] is not None:
        truncate_backbone(backbone, model_cfg["num_layers"])
    return MultiExitEncoder(backbone, run.task.num_labels, model_cfg["exits"], model_cfg["pooling"], model_cfg["head_dropout"])


def loss_label(recipe: dict) -> str:
    """How the exits were trained, for the ``method`` column."""
    if recipe["train"]["schedule"] == "two_stage":
        return "two_stage"
    spec = recipe["train"]["loss"]
    return spec.get("name") or spec["_target_"].rsplit(".", 1)[-1]


def stage_train(run: TextRun) -> None:
    """Fine-tune the backbone and exits; save model, tokenizer and the training log."""
    train = run.recipe["train"]
    seed = run.recipe["run"]["seed"]
    max_length = run.recipe["model"]["max_length"]
    examples = run.task.splits["train"]
    if train["schedule"] == "two_stage":
        history = train_stage(run.model, FinalOnlyLoss(), examples, run.tokenizer, run.accelerator, train,
                              max_length, train["epochs"], train["lr"], seed, "stage1")
        history += train_stage(run.model, InternalExitsLoss(), examples, run.tokenizer, run.accelerator, train,
                               max_length, train["stage2_epochs"] or train["epochs"],
                               train["stage2_lr"] or train["head_lr"] or train["lr"], seed + 1, "stage2")
    else:
        loss = build_component(train["loss"], "loss", "train.loss")
        history = train_stage(run.model, loss, examples, run.tokenizer, run.accelerator, train,
                              max_length, train["epochs"], train["lr"], seed)
    if run.accelerator.is_main_process:
        folder = run.output_dir / "model"
        run.accelerator.unwrap_model(run.model).save_pretrained(folder, {"task": run.task.name, "labels": run.task.label_names})
        run.tokenizer.save_pretrained(str(folder))
        atomic_write_text(run.output_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in history))


def split_batches(run: TextRun, split: str, batch_size: int, limit: Optional[int] = None) -> list[dict]:
    """Padded batches of a split (tokenized before any timer starts)."""
    examples = run.task.splits[split][:limit] if limit else run.task.splits[split]
    return list(batches(run.tokenizer, examples, batch_size, run.recipe["model"]["max_length"]))


def build_rules(run: TextRun) -> list[tuple[dict, ExitRule]]:
    """The recipe's rules, each with its spec (for sweep / calibration)."""
    return [
        (spec, build_component(spec, "rule", f"evaluate.rules[{i}]", reserved=RULE_RESERVED))
        for i, spec in enumerate(run.recipe["evaluate"]["rules"])
    ]


def stage_calibrate(run: TextRun, rules: list[tuple[dict, ExitRule]], calib: text_eval.SplitOutputs) -> dict:
    """Fit temperatures and each rule's calibration on the calibration split; save calibration.json."""
    saved: dict = {"split": run.recipe["calibration"]["split"], "rules": {}}
    if run.recipe["calibration"]["temperature"]:
        from mmexit.calibration.temperature import fit_temperatures

        temperatures = fit_temperatures(calib.logits, calib.labels)
        saved["temperatures"] = temperatures
        for _, rule in rules:
            if hasattr(rule, "temperatures"):
                rule.temperatures = temperatures
    for index, (spec, rule) in enumerate(rules):
        if spec.get("calibration"):
            calibration = build_component(spec["calibration"], "calibration", f"evaluate.rules[{index}].calibration")
            calibration.fit(rule, calib.logits, calib.labels, run.model.exit_layers)
        saved["rules"][str(index)] = {"rule": rule.name, "state": rule.calibration_state()}
    if run.accelerator.is_main_process:
        atomic_write_text(run.output_dir / "calibration.json", json.dumps(saved, indent=2, default=_json))
    return saved


def load_calibration(run: TextRun, rules: list[tuple[dict, ExitRule]]) -> None:
    """Restore calibration.json when evaluating without a calibrate stage in this run."""
    path = run.output_dir / "calibration.json"
    if not path.exists():
        for index, (spec, rule) in enumerate(rules):
            if rule.needs_calibration:
                raise RecipeError(f"evaluate.rules[{index}]: rule '{rule.name}' needs the calibrate stage (no {path})")
        return
    saved = json.loads(path.read_text())
    for index, (_, rule) in enumerate(rules):
        state = saved["rules"].get(str(index))
        if state and state["rule"] == rule.name:
            rule.load_calibration_state(state["state"])


def _json(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def stage_evaluate(run: TextRun, rules: list[tuple[dict, ExitRule]], calib: text_eval.SplitOutputs) -> list[dict]:
    """Full model, simulated sweeps, and measured operating points; predictions saved per split."""
    evaluate = run.recipe["evaluate"]
    split = evaluate["split"]
    task = run.task
    eval_batches = split_batches(run, split, evaluate["batch_size"])
    outputs = text_eval.collect_exit_outputs(run.model, eval_batches, run.accelerator, f"all exits ({split})")
    exit_layers = run.model.exit_layers
    full_metrics = text_eval.score(task.metrics, outputs.logits[-1], outputs.labels)
    rows = text_eval.full_model_rows(split, full_metrics, task.primary_metric, run.model.num_layers,
                                     outputs.labels.numel(), evaluate["timing_batch_sizes"])
    predictions = {"label": outputs.labels.tolist(), "full": _predictions(outputs.logits[-1])}
    if not run.accelerator.is_main_process:
        return rows
    timing_batches = {size: split_batches(run, split, size, evaluate["timing_samples"])
                      for size in evaluate["timing_batch_sizes"]}
    method_prefix = loss_label(run.recipe)
    for spec, rule in rules:
        method = f"{method_prefix}+{rule.name}"
        thresholds = spec.get("sweep") or rule.default_sweep()
        rows += text_eval.sweep_rows(rule, thresholds, method, split, outputs, exit_layers, task.metrics, task.primary_metric)
        threshold, selection = text_eval.select_operating_point(
            rule, thresholds, calib, exit_layers, task.metrics, task.primary_metric, evaluate["tolerance"])
        chosen = rule.with_threshold(threshold)
        extra = {"selected_on": run.recipe["calibration"]["split"], **selection}
        if getattr(chosen, "warning", None):
            extra["warning"] = chosen.warning
        measured, logits, exit_index = text_eval.measured_rows(
            run.model, chosen, method, split, eval_batches, timing_batches, outputs.labels, task.metrics,
            task.primary_metric, evaluate["timing_repeats"], extra)
        rows += measured
        predictions[chosen.describe()] = {"prediction": _predictions(logits),
                                          "exit_layer": [exit_layers[i] for i in exit_index.tolist()]}
    lines = []
    for index, label in enumerate(predictions["label"]):
        line = {"index": index, "label": label, "full": predictions["full"][index]}
        for key, value in predictions.items():
            if isinstance(value, dict):
                line[key] = {"prediction": value["prediction"][index], "exit_layer": value["exit_layer"][index]}
        lines.append(json.dumps(line))
    atomic_write_text(run.output_dir / f"predictions_{split}.jsonl", "\n".join(lines) + "\n")
    return rows


def _predictions(logits: torch.Tensor) -> list:
    return logits[:, 0].tolist() if logits.shape[-1] == 1 else logits.argmax(-1).tolist()


def run_text(run: TextRun) -> list[dict]:
    """Run the recipe's stages in order; returns the result rows (empty without evaluate)."""
    stages = run.recipe["run"]["stages"]
    if "train" in stages:
        stage_train(run)
    run.model.eval()
    rows: list[dict] = []
    if "calibrate" in stages or "evaluate" in stages:
        rules = build_rules(run)
        calib_split = run.recipe["calibration"]["split"]
        calib = text_eval.collect_exit_outputs(
            run.model, split_batches(run, calib_split, run.recipe["evaluate"]["batch_size"]), run.accelerator,
            f"all exits ({calib_split})")
        if "calibrate" in stages:
            stage_calibrate(run, rules, calib)
        else:
            load_calibration(run, rules)
        if "evaluate" in stages:
            rows = stage_evaluate(run, rules, calib)
            if run.accelerator.is_main_process:
                atomic_write_text(run.output_dir / "rows.json", json.dumps(rows, indent=2, default=_json))
    if "report" in stages and run.accelerator.is_main_process:
        if not rows and (run.output_dir / "rows.json").exists():
            rows = json.loads((run.output_dir / "rows.json").read_text())
        if rows:
            title = f"{run.recipe['run']['name']}: {run.recipe['model']['backbone']} on {run.task.name}"
            write_results(run.output_dir, run.recipe, rows, machine_info(), title)
    return rows
