"""``mmexit bench precision``: one trained text run at several inference precisions (docs/results/precision.md).

    mmexit bench precision RUN [--dtypes float32 bfloat16 int8] [--rule SPEC]
        [--samples 128] [--repeats 5] [--threads 2] [--output docs/results/precision.md]

Per dtype (``mmexit.models.precision``, applied to a copy of the float32 model): every exit's
outputs on the calibration and test splits; the rule's operating point chosen on the calibration
split at that precision (the recipe's tolerance; as ``evaluate.dtype`` does); the real early-exit
path on the test split: accuracy, layer speed-up, and the share of test rows whose exit differs from
the float32 model's, (a) at the same point and (b) each at its own calibrated point. Timing (model path
only, tokenization outside): every dtype's full model and early-exit path over the first
``--samples`` test rows at batch 1 and 32, all candidates interleaved in one ``time_alternating``
loop (A B C D ..., medians), so every ratio against the float32 full model is measured back to back.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from mmexit.calibration.rule_spec import build_rules, resolve_rule
from mmexit.data.text import batches, load_text_task
from mmexit.errors import MMExitError
from mmexit.evaluation import text_eval
from mmexit.evaluation.operating_point import Candidate, choose_operating_point
from mmexit.evaluation.speed import layer_speedup
from mmexit.evaluation.timing import machine_info, time_alternating
from mmexit.inference.encoder import early_exit_forward
from mmexit.inference.exit_loop import simulate_exits
from mmexit.models.encoder import MultiExitEncoder
from mmexit.models.precision import apply_precision
from mmexit.serve.predictor import read_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a trained text run (e.g. outputs/quickstart)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"],
                        help="precisions compared (float32 always, first)")
    parser.add_argument("--rule", help="rule spec: NAME (the run's rule, its point re-chosen per dtype) or an "
                                       "operating-point key (default: the run's first rule)")
    parser.add_argument("--samples", type=int, default=128, help="test rows timed per batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="also write the table here (Markdown)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    dtypes = ["float32", *[d for d in args.dtypes if d != "float32"]]
    command = "mmexit bench precision " + " ".join(args.argv)
    return bench(args.run, dtypes, args.rule, args.samples, args.repeats, args.output, command)


def evaluate_dtype(model, rule, spec, recipe, calib_batches, test_batches, metrics, primary) -> dict:
    """Accuracy, chosen point, exits of one model at one precision."""
    calib = text_eval.collect_exit_outputs(model, calib_batches, desc="calib")
    test = text_eval.collect_exit_outputs(model, test_batches, desc="test")
    layers = list(model.exit_layers)
    candidates = []
    for threshold in spec.get("sweep") or rule.default_sweep():
        scores, speedup, _ = text_eval.simulated_point(rule.with_threshold(threshold), calib, layers, metrics)
        candidates.append(Candidate(threshold, scores[primary], speedup))
    calib_full = text_eval.score(metrics, calib.logits[-1], calib.labels)[primary]
    point = rule.with_threshold(choose_operating_point(candidates, calib_full, recipe["evaluate"]["tolerance"]).point)
    logits, exit_index = text_eval.run_early_exit(model, point, test_batches)
    return {"point": point, "test": test, "exit_index": exit_index,
            "full": text_eval.score(metrics, test.logits[-1], test.labels)[primary],
            "early": text_eval.score(metrics, logits, test.labels)[primary],
            "layer_speedup": layer_speedup(torch.tensor(layers)[exit_index], model.num_layers),
            "simulate": lambda p: simulate_exits(p, test.logits, test.pooled if p.needs_hidden else None)}


def time_all(models: dict, point_of: dict, batches_of: dict, repeats: int) -> dict:
    """Median seconds of every dtype's full and early-exit path per batch size, interleaved in one loop."""
    times = {}
    for size, size_batches in batches_of.items():
        inputs = [{k: v for k, v in b.items() if k != "labels"} for b in size_batches]
        candidates = {}
        for name, model in models.items():
            def full(model=model):
                for item in inputs:
                    model.forward_full(**item)

            def early(model=model, rule=point_of[name]):
                for item in inputs:
                    early_exit_forward(model, rule, **item)
            candidates[f"{name}/full"], candidates[f"{name}/exit"] = full, early
        times[size] = time_alternating(candidates, repeats=repeats, warmup=1)
    return times


def bench(run_dir: str, dtypes: list[str], rule_name: str | None, samples: int, repeats: int,
          output: str | None, command: str) -> int:
    """Evaluate and time every dtype; print (and write to ``output``) the table."""
    folder, recipe = read_run(run_dir)
    if recipe["task"] != "text_classification":
        raise MMExitError(f"{folder}: mmexit bench precision compares text classifiers (this run is {recipe['task']})")
    data = load_text_task(recipe["data"])
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "model"))
    max_length = recipe["model"]["max_length"]
    calib_batches = list(batches(tokenizer, data.splits[recipe["calibration"]["split"]], 32, max_length))
    test_examples = data.splits[recipe["evaluate"]["split"]]
    test_batches = list(batches(tokenizer, test_examples, 32, max_length))
    timing_batches = {size: list(batches(tokenizer, test_examples[:samples], size, max_length)) for size in (1, 32)}
    recipe_rules = build_rules(recipe)
    rule, _ = resolve_rule(folder, recipe, rule_name or recipe_rules[0][1].name)
    spec = next((spec for spec, known in recipe_rules if known.name == rule.name), {})  # its sweep
    float32 = MultiExitEncoder.from_pretrained(folder / "model").eval()
    models, results = {}, {}
    for name in dtypes:
        models[name] = float32 if name == "float32" else apply_precision(copy.deepcopy(float32), name, "cpu")
        results[name] = evaluate_dtype(models[name], rule, spec, recipe, calib_batches, test_batches, data.metrics,
                                       data.primary_metric)
        print(f"{name}: full {100 * results[name]['full']:.2f}, {results[name]['point'].describe()} "
              f"{100 * results[name]['early']:.2f}", file=sys.stderr)
    reference = results["float32"]
    times = time_all(models, {name: r["point"] for name, r in results.items()}, timing_batches, repeats)
    lines = table(dtypes, results, reference, times, timing_batches, models)
    machine = machine_info()
    text = "\n".join([
        f"Run: {folder} ({recipe['model']['backbone']}, {data.name}; {len(test_examples)} test rows). "
        f"Rule: {rule.name}, its point chosen on the calibration split at each precision "
        f"(tolerance {recipe['evaluate']['tolerance']}%).",
        f"Timing: first {samples} test rows, batch 1 and 32, model path only, every dtype's full and early-exit "
        f"path interleaved in one loop, median of {repeats}.",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()),
        f"Command: `{command}`", "", *lines])
    print(text)
    if output:
        Path(output).write_text(text + "\n")
    return 0


def table(dtypes, results, reference, times, timing_batches, models) -> list[str]:
    """The Markdown table: one line per dtype."""
    header = ["dtype", "acc full", "acc exit", "point", "point fp32-calib", "layer x", "exits changed (same point)",
              "exits changed (own point)", "full x b1", "exit x b1", "eff b1", "full x b32", "exit x b32", "eff b32"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ref_exits = reference["exit_index"]
    for name in dtypes:
        result = results[name]
        same = (reference["simulate"](result["point"]) != result["exit_index"]).float().mean()
        own = (ref_exits != result["exit_index"]).float().mean()
        cells = [name, f"{100 * result['full']:.2f}", f"{100 * result['early']:.2f}", f"{result['point'].threshold:g}",
                 f"{reference['point'].threshold:g}", f"{result['layer_speedup']:.2f}", f"{100 * same:.1f}%",
                 f"{100 * own:.1f}%"]
        for size in (1, 32):
            t = times[size]
            base = t["float32/full"]
            exits = torch.cat([early_exit_forward(models[name], result["point"],
                                                  **{k: v for k, v in b.items() if k != "labels"}).exit_index
                               for b in timing_batches[size]])
            timed_layers = layer_speedup(torch.tensor(models[name].exit_layers)[exits], models[name].num_layers)
            efficiency = (t[f"{name}/full"] / t[f"{name}/exit"]) / timed_layers
            cells += [f"{base / t[f'{name}/full']:.2f}", f"{base / t[f'{name}/exit']:.2f}", f"{efficiency:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "acc: test accuracy x100 (full model; early exit at the dtype's own point). full x / exit x: "
              "wall-clock speed-up against the float32 full model at that batch size (same loop). eff: the dtype's "
              "own wall speed-up (its full / its early exit) / the layer speed-up of the timed rows. exits changed: "
              "share of test rows whose exit differs from the float32 model's, at the dtype's point (same point) "
              "or with each model at its own calibrated point (own point)."]
    return lines
