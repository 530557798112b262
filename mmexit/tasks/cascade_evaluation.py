"""Evaluating SWEET's Multi-Model cascade through the one evaluation loop: ``mmexit cascade``.

The data, calibration and evaluation settings come from a member's recipe. The rule is max-prob,
with per-model temperatures when ``calibration.temperature`` is true. Sweeps are simulated from
every member's outputs; the loop chooses the point on the calibration split (fastest within
``evaluate.tolerance`` % of the deepest member, as for every task); the chosen point is run through
the real batched cascade and timed against the deepest member alone. The reference "full" rows
are the deepest member (its layer count is L); layers are charged cumulatively over the members a
row ran, so the layer speed-up can fall below 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoTokenizer

from mmexit.calibration.temperature import fit_temperatures
from mmexit.data.text import batches, load_text_task
from mmexit.errors import MMExitError
from mmexit.evaluation import text_eval
from mmexit.evaluation.loop import Sweep, evaluate_rules
from mmexit.evaluation.operating_point import Candidate, Choice
from mmexit.evaluation.results import write_results
from mmexit.evaluation.rows import full_model_rows
from mmexit.evaluation.speed import efficiency, exit_histogram, layer_speedup
from mmexit.evaluation.timing import machine_info, time_alternating
from mmexit.exits.base import ExitRule
from mmexit.exits.confidence import MaxProbRule
from mmexit.inference.cascade import cascade_forward, simulate_cascade
from mmexit.models.cascade import MultiModelCascade
from mmexit.models.loading import load_tokenizer
from mmexit.recipe.loading import load_recipe
from mmexit.recipe.tasks import validate_recipe

METHOD = "multi_model+maxprob"


class CascadeEvaluator:
    """The loop's hooks for the Multi-Model cascade (see ``evaluation.loop.Evaluator``)."""

    def __init__(self, cascade: MultiModelCascade, tokenizer, task, recipe: dict, members: list[str]) -> None:
        self.cascade, self.tokenizer, self.task, self.recipe, self.members = cascade, tokenizer, task, recipe, members
        self.evaluate, self.max_length = recipe["evaluate"], recipe["model"]["max_length"]
        self.split, self.calib_split = self.evaluate["split"], recipe["calibration"]["split"]
        self.cumulative, self.depth = cascade.cumulative_layers, cascade.depth
        _, self.calib = self.split_outputs(self.calib_split)
        self.eval_batches, self.outputs = self.split_outputs(self.split)

    def split_outputs(self, split: str) -> tuple[list[dict], text_eval.SplitOutputs]:
        """A split's padded batches and every member's outputs on it: logits [models, N, C]."""
        split_batches = list(batches(self.tokenizer, self.task.splits[split], self.evaluate["batch_size"],
                                     self.max_length))
        logits = torch.cat([self.cascade.all_logits(**_inputs(b)) for b in split_batches], 1)
        labels = torch.cat([b["labels"] for b in split_batches])
        return split_batches, text_eval.SplitOutputs(logits.float(), logits.new_zeros(0), labels)

    def point(self, rule: ExitRule, data: text_eval.SplitOutputs) -> tuple[dict, float, torch.Tensor]:
        """Simulated metrics, layer speed-up and exit index [N] of ``rule`` on precomputed outputs."""
        exit_index, charged = simulate_cascade(rule, data.logits, self.cumulative)
        chosen = data.logits[exit_index, torch.arange(exit_index.numel())]
        return text_eval.score(self.task.metrics, chosen, data.labels), layer_speedup(charged, self.depth), exit_index

    def reference(self) -> tuple[list[dict], float]:
        metrics = text_eval.score(self.task.metrics, self.outputs.logits[-1], self.outputs.labels)
        rows = full_model_rows(self.split, metrics, self.task.primary_metric, self.depth, self.outputs.labels.numel(),
                               self.evaluate["timing_batch_sizes"])
        full = text_eval.score(self.task.metrics, self.calib.logits[-1], self.calib.labels)
        return rows, full[self.task.primary_metric]

    def sweep(self, rule: ExitRule, thresholds: Sequence[float]) -> Sweep:
        rows, candidates, primary = [], [], self.task.primary_metric
        for threshold in thresholds:
            variant = rule.with_threshold(threshold)
            metrics, speedup, exit_index = self.point(variant, self.outputs)
            rows.append({"method": METHOD, "rule": variant.describe(), "operating_point": threshold,
                         "split": self.split, "metrics": metrics, "primary_metric": primary, "layer_speedup": speedup,
                         "wall_speedup": None, "efficiency": None, "batch_size": None,
                         "exit_histogram": exit_histogram(exit_index, self.cumulative), "simulated": True,
                         "cost_note": "layers charged cumulatively over the models run"})
            calib_metrics, calib_speedup, _ = self.point(variant, self.calib)
            candidates.append(Candidate(threshold, calib_metrics[primary], calib_speedup))
        return Sweep(rows, candidates)

    def measure(self, points: list[tuple[ExitRule, Choice]]) -> list[dict]:
        rows = []
        deepest = self.cascade.models[-1]
        for chosen, choice in points:
            measured = [cascade_forward(self.cascade.models, chosen, **_inputs(b)) for b in self.eval_batches]
            exit_index = torch.cat([m.exit_index for m in measured])
            metrics = text_eval.score(self.task.metrics, torch.cat([m.logits for m in measured]), self.outputs.labels)
            speedup = layer_speedup(torch.cat([m.layers_used for m in measured]), self.depth)
            for batch_size in self.evaluate["timing_batch_sizes"]:
                limit = self.evaluate["timing_samples"]
                examples = self.task.splits[self.split][:limit] if limit else self.task.splits[self.split]
                timed = [_inputs(b) for b in batches(self.tokenizer, examples, batch_size, self.max_length)]
                timed_layers = torch.cat([cascade_forward(self.cascade.models, chosen, **b).layers_used for b in timed])
                times = time_alternating({
                    "full": lambda: [deepest.forward_full(**b) for b in timed],
                    "exit": lambda: [cascade_forward(self.cascade.models, chosen, **b) for b in timed],
                }, repeats=self.evaluate["timing_repeats"], warmup=1)
                wall = times["full"] / times["exit"]
                rows.append({"method": METHOD, "rule": chosen.describe(), "operating_point": choice.point,
                             "split": self.split, "metrics": metrics, "primary_metric": self.task.primary_metric,
                             "layer_speedup": speedup, "wall_speedup": wall,
                             "efficiency": efficiency(wall, layer_speedup(timed_layers, self.depth)),
                             "batch_size": batch_size, "exit_histogram": exit_histogram(exit_index, self.cumulative),
                             "simulated": False, "time_full_s": times["full"], "time_exit_s": times["exit"],
                             **choice.as_extra(self.calib_split), "members": self.members})
        return rows

    def predictions(self) -> list[dict]:
        return []


def evaluate_cascade(folders: Sequence[str | Path], recipe_path: str, output_dir: str | Path,
                     overrides: Optional[list[str]] = None, thresholds: Optional[list[float]] = None) -> list[dict]:
    """Sweep (simulated), choose and measure the MM cascade of trained member folders; write results.json."""
    recipe = validate_recipe(load_recipe(recipe_path, overrides or []))
    cascade = MultiModelCascade.from_folders(folders)
    first = Path(folders[0]) / "model"
    if (first / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(first))
    else:
        tokenizer = load_tokenizer(recipe["model"]["backbone"], recipe["data"]["cache_dir"])
    task = load_text_task(recipe["data"])
    members = [str(f) for f in folders]
    evaluator = CascadeEvaluator(cascade, tokenizer, task, recipe, members)
    rule = MaxProbRule()
    if recipe["calibration"]["temperature"]:
        rule.temperatures = fit_temperatures(evaluator.calib.logits, evaluator.calib.labels)
    spec = {"sweep": thresholds} if thresholds else {}
    evaluation = evaluate_rules(evaluator, [(spec, rule)], recipe["evaluate"]["tolerance"])
    title = f"multi-model cascade ({', '.join(str(c) for c in cascade.cumulative_layers)} cumulative layers) on {task.name}"
    write_results(Path(output_dir), recipe | {"cascade_members": members}, evaluation.rows, machine_info(), title)
    return evaluation.rows


def _inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def cascade_main(argv: Optional[list[str]] = None) -> int:
    """``mmexit cascade MEMBER_DIR... --recipe R --output OUT [--set key=value ...]``."""
    parser = argparse.ArgumentParser(prog="mmexit cascade",
                                     description="Evaluate the Multi-Model cascade of trained truncated members.")
    parser.add_argument("members", nargs="+", help="output folders of the trained members (any order)")
    parser.add_argument("--recipe", required=True, help="the members' recipe (data, calibration, evaluate settings)")
    parser.add_argument("--output", required=True, help="folder for results.json / results.md")
    parser.add_argument("--set", nargs="*", default=[], help="key=value recipe overrides")
    args = parser.parse_args(argv)
    try:
        evaluate_cascade(args.members, args.recipe, args.output, args.set)
    except MMExitError as error:
        print(f"mmexit: error: {error}", file=sys.stderr)
        return error.exit_code
    print((Path(args.output) / "results.md").read_text())
    return 0
