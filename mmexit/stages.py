"""train -> calibrate -> evaluate -> report, once, for any task.

The task (``mmexit.tasks``) supplies data, model, training data and loss, exit statistics and
evaluation; everything else is here: the order of stages, the one calibration file format
(``calibration.json``, written here; read back by ``mmexit.calibration.rule_spec``), the inference
precision (``evaluate.dtype``, applied after training, so calibration and evaluation see the
deployed model), the chosen operating points
(``operating_points.json``, read by ``mmexit.load``), predictions, rows and the report. Only the
main process writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mmexit.calibration.rule_spec import (
    CALIBRATION_FILE,
    OPERATING_POINTS_FILE,
    RULE_RESERVED,
    build_rules,
    load_calibration,
)
from mmexit.calibration.statistics import ExitStatistics
from mmexit.calibration.temperature import fit_temperatures
from mmexit.evaluation.results import write_results
from mmexit.evaluation.rows import with_dtype
from mmexit.evaluation.timing import machine_info
from mmexit.exits.base import ExitRule
from mmexit.files import atomic_write_text
from mmexit.models.precision import apply_precision
from mmexit.recipe.language import build_component
from mmexit.tasks.base import Run

logger = logging.getLogger(__name__)


def _json(value):
    return value.tolist() if hasattr(value, "tolist") else str(value)


def calibrate(run: Run, rules: list[tuple[dict, ExitRule]], stats: ExitStatistics) -> dict:
    """Fit temperatures (``calibration.temperature``) and each rule's calibration; save calibration.json.

    Format: {"split", "temperatures": [T_i] | null, "rules": {"<index>": {"rule": name, "state": {...}}}}.
    """
    saved: dict = {"split": run.recipe["calibration"]["split"], "temperatures": None, "rules": {}}
    if run.recipe["calibration"].get("temperature"):
        temperatures = fit_temperatures(stats.require_logits("temperature"), stats.labels)
        saved["temperatures"] = temperatures
        for _, rule in rules:
            if hasattr(rule, "temperatures"):
                rule.temperatures = temperatures
    for index, (spec, rule) in enumerate(rules):
        if spec.get("calibration"):
            calibration = build_component(spec["calibration"], "calibration", f"evaluate.rules[{index}].calibration",
                                          reserved=())
            calibration.fit(rule, stats)
        saved["rules"][str(index)] = {"rule": rule.name, "state": rule.calibration_state()}
    if run.accelerator.is_main_process:
        atomic_write_text(run.write_dir / CALIBRATION_FILE, json.dumps(saved, indent=2, default=_json))
    return saved


def save_operating_points(run: Run, rules: list[tuple[dict, ExitRule]], chosen: dict[int, float]) -> None:
    """operating_points.json: per measured rule, its spec, chosen threshold and label; the first is the default."""
    entries = []
    for index, (spec, rule) in enumerate(rules):
        if index not in chosen:
            continue
        point = rule.with_threshold(chosen[index])
        entries.append({"index": index, "rule": rule.name, "threshold": chosen[index], "key": point.describe(),
                        "spec": {k: v for k, v in spec.items() if k not in RULE_RESERVED}})
    payload = {"default": entries[0]["key"] if entries else None, "points": entries}
    atomic_write_text(run.write_dir / OPERATING_POINTS_FILE, json.dumps(payload, indent=2, default=_json))


def write_predictions(run: Run, split: str, lines: list[dict]) -> None:
    atomic_write_text(run.write_dir / f"predictions_{split}.jsonl", "".join(json.dumps(line) + "\n" for line in lines))


def run_stages(run: Run) -> list[dict]:
    """Run the recipe's stages in order; returns the result rows (empty without evaluate)."""
    stages = run.recipe["run"]["stages"]
    main = run.accelerator.is_main_process
    if "train" in stages:
        history = run.task.train(run)
        if main:
            run.task.save_model(run, run.write_dir / "model")
            atomic_write_text(run.write_dir / "train_log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    run.model.eval()
    rows: list[dict] = []
    dtype = run.recipe["evaluate"].get("dtype", "float32")
    if dtype != "float32" and ("calibrate" in stages or "evaluate" in stages):  # the deployed precision, after training
        run.task.before_precision(run)
        run.model = apply_precision(run.model, dtype, run.accelerator.device)
    if "calibrate" in stages or "evaluate" in stages:
        rules = build_rules(run.recipe)
        stats = run.task.statistics(run)
        if "calibrate" in stages:
            calibrate(run, rules, stats)
        else:
            source = run.output_dir if (run.output_dir / CALIBRATION_FILE).is_file() else _trained_folder(run)
            load_calibration(source, rules)
            if main and (source / CALIBRATION_FILE).is_file():  # the run's results depend on it: keep it with them
                atomic_write_text(run.write_dir / CALIBRATION_FILE, (source / CALIBRATION_FILE).read_text())
        if "evaluate" in stages:
            evaluation = run.task.evaluate(run, rules, stats)
            rows = with_dtype(evaluation.rows, dtype)
            if main:
                write_predictions(run, run.recipe["evaluate"].get("split", "test"), evaluation.predictions)
                save_operating_points(run, rules, evaluation.chosen)
                atomic_write_text(run.write_dir / "rows.json", json.dumps(rows, indent=2, default=_json))
    if "report" in stages and main:
        if not rows and (run.output_dir / "rows.json").exists():  # a report-only run: the last run's rows
            for name in ("rows.json", "examples.md"):
                if (run.output_dir / name).is_file():
                    atomic_write_text(run.write_dir / name, (run.output_dir / name).read_text())
            rows = json.loads((run.write_dir / "rows.json").read_text())
        if rows:
            paths = write_results(run.write_dir, run.recipe, rows, machine_info(), run.task.title(run))
            examples = run.write_dir / "examples.md"
            if examples.is_file():
                atomic_write_text(paths["markdown"], paths["markdown"].read_text() + "\n" + examples.read_text())
    return rows


def _trained_folder(run: Run) -> Path:
    """The run folder a ``model.init_from`` points at (its calibration.json may be reused)."""
    source = run.recipe["model"].get("init_from")
    if not source:
        return run.output_dir
    folder = Path(source)
    return folder.parent if folder.name == "model" else folder
