"""``mmexit bench text``: the early-exit path against the full model on a text run (BENCHMARKS.md).

    mmexit bench text RUN|RECIPE.yaml [key=value ...] [--rule SPEC ...] [--quick] [--model DIR]
        [--batch-sizes 32 1] [--samples N] [--repeats N]

RUN: a trained text run folder (its recipe, model, calibration and chosen operating points).
RECIPE.yaml: the model in ``--model DIR`` or the recipe's ``run.output_dir`` when it holds one;
without one, the backbone with untrained exit heads (speed only, and it says so). Each rule runs at
its operating point (``--rule``: rule specs of ``mmexit.calibration.rule_spec``; default: every rule
of ``evaluate.rules`` at the point the run chose, else at its own threshold; rules that need a
calibration the run lacks are skipped). Prints, per rule and batch size: metric, layer speed-up,
measured wall-clock speed-up, efficiency and the exit histogram, with the machine. It also checks
that the measured exits equal the simulated ones and that a never-exit rule reproduces the full
model (a consistency check, not a speed target); exit 1 when they do not. ``--quick`` (64 samples,
3 repeats) finishes in about two minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from mmexit.calibration.rule_spec import build_rules, read_operating_points, resolve_rule
from mmexit.errors import MMExitError, RecipeError
from mmexit.evaluation import text_eval
from mmexit.evaluation.results import markdown_table
from mmexit.evaluation.rows import ResultRow
from mmexit.evaluation.timing import machine_info
from mmexit.exits.confidence import NeverExitRule
from mmexit.models.encoder import CONFIG_NAME
from mmexit.recipe.loading import load_recipe
from mmexit.recipe.tasks import task_for, validate_recipe
from mmexit.tasks.base import Run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="RUN|RECIPE", help="a trained text run folder, or a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides")
    parser.add_argument("--rule", dest="rules", nargs="+", metavar="SPEC",
                        help="rule specs to time: operating-point keys, NAME, NAME@VALUE (default: every rule)")
    parser.add_argument("--quick", action="store_true", help="64 samples, 3 repeats (CI smoke test)")
    parser.add_argument("--model", help="a trained mmexit output folder or model/ folder (with a recipe)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--samples", type=int, help="first N samples of the evaluation split (default: all)")
    parser.add_argument("--repeats", type=int, help="timed repeats, median taken (default 7; --quick 3)")


def read_target(target: str, overrides: list[str], model_dir: str | None) -> tuple[dict, Path, Path, bool]:
    """(validated recipe, its output folder, the run folder holding calibration and points, trained?)."""
    folder = Path(target)
    if folder.is_dir():
        if not (folder / "recipe.yaml").is_file():
            raise RecipeError(f"{folder}: not a run folder (no recipe.yaml); pass a run folder or a recipe")
        recipe = validate_recipe(load_recipe(folder / "recipe.yaml", [*overrides, f"run.output_dir={folder}"]))
    else:
        recipe = validate_recipe(load_recipe(target, overrides))
    if recipe["task"] != "text_classification":
        raise RecipeError(f"{target}: a {recipe['task']} recipe; mmexit bench text times text classifiers "
                          "(captioning: mmexit bench caption)")
    output_dir = Path(recipe["run"]["output_dir"])
    if model_dir:
        recipe["model"]["init_from"] = model_dir
        source = Path(model_dir)
        source = source.parent if source.name == "model" else source
    else:
        source = output_dir
    trained = bool(recipe["model"]["init_from"]) or (output_dir / "model" / CONFIG_NAME).exists()
    return recipe, output_dir, source, trained


def default_specs(folder: Path, recipe: dict) -> list[str]:
    """Every rule of the recipe: its operating-point key where the run chose one, else its name."""
    keys = {entry["index"]: entry["key"] for entry in read_operating_points(folder)["points"]}
    return [keys.get(index, rule.name) for index, (_, rule) in enumerate(build_rules(recipe))]


def run(args: argparse.Namespace) -> int:
    samples = args.samples or (64 if args.quick else None)
    repeats = args.repeats or (3 if args.quick else 7)
    recipe, output_dir, source, trained = read_target(args.target, args.overrides, args.model)
    # an untrained model is timed with fresh exit heads (speed only): build it as for training
    recipe["run"]["stages"] = ["evaluate"] if trained else ["train"]
    task = task_for("text_classification")
    run = Run(recipe, task, output_dir, Accelerator(cpu=not torch.cuda.is_available()))
    run.data = task.load_data(recipe)
    run.model, run.processor = task.build_model(run)
    run.model.eval()
    points = []
    for spec in args.rules or default_specs(source, recipe):
        try:
            points.append(resolve_rule(source, recipe, spec)[0])
        except MMExitError as error:
            if args.rules:
                raise
            print(f"bench: {error}; skipping it", file=sys.stderr)
    split = recipe["evaluate"]["split"]
    data = run.data
    examples = data.splits[split][:samples] if samples else data.splits[split]
    data.splits[split] = examples
    eval_batches = task.split_batches(run, split, 32)
    outputs = text_eval.collect_exit_outputs(run.model, eval_batches)
    timing = {size: task.split_batches(run, split, size) for size in args.batch_sizes}
    full = text_eval.score(data.metrics, outputs.logits[-1], outputs.labels)
    rows = [ResultRow("full", "full", None, split, full, data.primary_metric, 1.0,
                      {str(run.model.num_layers): len(examples)}, False, 1.0, 1.0, size).to_dict()
            for size in args.batch_sizes]
    problems = []
    never_logits, _ = text_eval.run_early_exit(run.model, NeverExitRule(), eval_batches)
    if not torch.equal(never_logits.argmax(-1), outputs.logits[-1].argmax(-1)):
        problems.append("never-exit predictions differ from the full model")
    for point in points:
        measured, _, exit_index = text_eval.measured_rows(
            run.model, point, f"bench+{point.name}", split, eval_batches, timing, outputs.labels,
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
