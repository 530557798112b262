#!/usr/bin/env python
"""Benchmark the early-exit path against the full model on a recipe's data (BENCHMARKS.md).

    python tools/bench.py RECIPE.yaml [key=value ...] [--quick] [--model DIR] [--batch-sizes 32 1]

Uses the trained model in ``DIR`` (default: the recipe's ``run.output_dir/model``; without one,
the backbone with untrained exit heads, and says so). Each rule of ``evaluate.rules`` runs at its
operating point: the one the run selected (from ``results.json``), else its ``threshold``. Prints,
per rule and batch size: metric, layer speed-up, measured wall-clock speed-up, efficiency and the
exit histogram, with the machine. It also checks that the measured exits equal the simulated ones
and that a never-exit rule reproduces the full model (a consistency check, not a speed target).
``--quick`` (64 samples, 3 repeats) finishes in about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from mmexit.recipe.loading import load_recipe  # noqa: E402
from mmexit.recipe.tasks import task_for, validate_recipe  # noqa: E402
from mmexit.errors import MMExitError  # noqa: E402
from mmexit.evaluation import text_eval  # noqa: E402
from mmexit.evaluation.results import markdown_table  # noqa: E402
from mmexit.evaluation.rows import ResultRow  # noqa: E402
from mmexit.evaluation.timing import machine_info  # noqa: E402
from mmexit.exits.confidence import NeverExitRule  # noqa: E402


def selected_points(output_dir: Path) -> dict[str, float]:
    """Operating points the run measured, by rule name (from results.json)."""
    path = output_dir / "results.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["method"].split("+")[-1]: r["operating_point"] for r in rows if not r["simulated"] and r["method"] != "full"}


def bench(recipe_path: str, overrides: list[str], quick: bool, model_dir: str | None,
          batch_sizes: list[int], samples: int | None = None, repeats: int | None = None) -> int:
    from accelerate import Accelerator

    from mmexit.models.encoder import CONFIG_NAME
    from mmexit.runner import quiet_libraries
    from mmexit.stages import build_rules, load_calibration
    from mmexit.tasks.base import Run

    quiet_libraries()
    samples = samples or (64 if quick else None)
    repeats = repeats or (3 if quick else 7)
    recipe = validate_recipe(load_recipe(recipe_path, overrides))
    if recipe["task"] != "text_classification":
        print("bench: error: tools/bench.py times text classifiers; use tools/bench_caption.py for captioning",
              file=sys.stderr)
        return 2
    output_dir = Path(recipe["run"]["output_dir"])
    if model_dir:
        recipe["model"]["init_from"] = model_dir
    trained = bool(recipe["model"]["init_from"]) or (output_dir / "model" / CONFIG_NAME).exists()
    # an untrained model is timed with fresh exit heads (speed only): build it as for training
    recipe["run"]["stages"] = ["evaluate"] if trained else ["train"]
    task = task_for("text_classification")
    run = Run(recipe, task, output_dir, Accelerator(cpu=not torch.cuda.is_available()))
    run.data = task.load_data(recipe)
    run.model, run.processor = task.build_model(run)
    run.model.eval()
    rules = build_rules(recipe)
    try:
        load_calibration(output_dir if trained else Path(model_dir or output_dir), rules)
    except MMExitError as error:
        print(f"bench: {error}; skipping rules that need it", file=sys.stderr)
        rules = [(spec, rule) for spec, rule in rules if not rule.needs_calibration]
    points = selected_points(output_dir)
    split = recipe["evaluate"]["split"]
    data = run.data
    examples = data.splits[split][:samples] if samples else data.splits[split]
    data.splits[split] = examples
    eval_batches = task.split_batches(run, split, 32)
    outputs = text_eval.collect_exit_outputs(run.model, eval_batches)
    timing = {size: task.split_batches(run, split, size) for size in batch_sizes}
    full = text_eval.score(data.metrics, outputs.logits[-1], outputs.labels)
    rows = [ResultRow("full", "full", None, split, full, data.primary_metric, 1.0,
                      {str(run.model.num_layers): len(examples)}, False, 1.0, 1.0, size).to_dict()
            for size in batch_sizes]
    problems = []
    never_logits, _ = text_eval.run_early_exit(run.model, NeverExitRule(), eval_batches)
    if not torch.equal(never_logits.argmax(-1), outputs.logits[-1].argmax(-1)):
        problems.append("never-exit predictions differ from the full model")
    for spec, rule in rules:
        point = rule.with_threshold(points.get(rule.name, rule.threshold))
        measured, _, exit_index = text_eval.measured_rows(
            run.model, point, f"bench+{rule.name}", split, eval_batches, timing, outputs.labels,
            data.metrics, data.primary_metric, repeats)
        _, _, simulated = text_eval.simulated_point(point, outputs, run.model.exit_layers, data.metrics)
        if not torch.equal(exit_index, simulated):
            problems.append(f"{point.describe()}: measured exits differ from simulated ones")
        rows += measured
    title = f"bench: {recipe['model']['backbone']} on {data.name}, {len(examples)} samples" + (
        "" if trained else " (UNTRAINED exit heads: speed only)")
    print(markdown_table(rows, machine_info(), title))
    if problems:
        print("bench: INCONSISTENT: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("bench: consistent (never-exit == full model; measured exits == simulated exits)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--quick", action="store_true", help="64 samples, 3 repeats (CI smoke test)")
    parser.add_argument("--model", help="a trained mmexit output folder or model/ folder")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--samples", type=int, help="first N samples of the evaluation split (default: all)")
    parser.add_argument("--repeats", type=int, help="timed repeats, median taken (default 7)")
    args = parser.parse_args(argv)
    try:
        return bench(args.recipe, args.overrides, args.quick, args.model, args.batch_sizes, args.samples, args.repeats)
    except MMExitError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
