"""SWEET's Multi-Model (MM) baseline: a batched cascade of independently fine-tuned truncated models.

Model k is a MultiExitEncoder truncated to its own depth d_k (d_1 < d_2 < ...), fine-tuned alone;
its last exit is its output. At inference model 1 runs on every row from the embeddings; a rule
decides on its output (as if it were exit 0 of a multi-exit model); the rows that do not stop run
model 2, again from the embeddings (the models share no computation), and so on; the last model
stops every row still running. A row that stops at model k is charged the cumulative depth
d_1 + ... + d_k layers, so the MM baseline can cost more than the deepest model alone (layer
speed-up < 1 when many rows go deep).

The same rule classes serve here: a rule sees ``ExitView(logits, k, num_models, pooled)``, so
per-exit temperatures and calibrations (fitted on the stacked cascade logits from
``cascade_all_logits``) work per model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule
from mmexit.inference.exit_loop import ActiveRows, simulate_exits
from mmexit.models.encoder import MultiExitEncoder


@dataclass
class CascadeOutput:
    """logits [batch, labels] of the model each row stopped at; exit_index [batch] (0-based model);
    layers_used [batch] (cumulative layers of every model the row ran)."""

    logits: Tensor
    exit_index: Tensor
    layers_used: Tensor


def model_depths(models: Sequence[MultiExitEncoder]) -> list[int]:
    """Each model's depth (layers up to its last exit)."""
    return [model.exit_layers[-1] for model in models]


def cumulative_layers(models: Sequence[MultiExitEncoder]) -> list[int]:
    """Layers charged to a row that stops at model k: d_1 + ... + d_k."""
    total, out = 0, []
    for depth in model_depths(models):
        total += depth
        out.append(total)
    return out


def _run_model(model: MultiExitEncoder, input_ids: Tensor, attention_mask: Tensor,
               token_type_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """One model's output logits [rows, labels] and pooled state [rows, hidden] (its last exit)."""
    hidden, context = model.embed(input_ids, attention_mask, token_type_ids)
    for layer in range(model.exit_layers[-1]):
        hidden = model.run_layer(layer, hidden, context)
    last = model.num_exits - 1
    pooled = model.exit_pooled(last, hidden, context)
    return model.heads[last].classify(pooled), pooled


@torch.inference_mode()
def cascade_forward(
    models: Sequence[MultiExitEncoder],
    rule: ExitRule,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Optional[Tensor] = None,
) -> CascadeOutput:
    """Run the cascade batched: only the rows that did not stop are handed to the next model."""
    num_models = len(models)
    active = ActiveRows(rule, input_ids.shape[0], num_models, input_ids.device)
    ids, mask, types = input_ids, attention_mask, token_type_ids
    for index, model in enumerate(models):
        logits, pooled = _run_model(model, ids, mask, types)  # [active, labels], [active, hidden]
        if index == num_models - 1:
            active.finish(logits)
            break
        keep = active.ask(index, logits, pooled)
        if active.done:
            break
        if keep is not None:
            ids, mask = ids[keep], mask[keep]
            types = None if types is None else types[keep]
    charge = torch.tensor(cumulative_layers(models), device=input_ids.device)
    return CascadeOutput(active.outputs, active.exit_index, charge[active.exit_index])


@torch.inference_mode()
def cascade_all_logits(
    models: Sequence[MultiExitEncoder],
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Optional[Tensor] = None,
) -> Tensor:
    """Every model's output on every row: [num_models, batch, labels] (for calibration and sweeps)."""
    return torch.stack([_run_model(m, input_ids, attention_mask, token_type_ids)[0] for m in models])


def simulate_cascade(rule: ExitRule, all_logits: Tensor, cumulative: Sequence[int]) -> tuple[Tensor, Tensor]:
    """*Simulated* cascade on precomputed outputs [num_models, N, C]: exit index [N], layers charged [N]."""
    exit_index = simulate_exits(rule, all_logits)
    charge = torch.tensor(list(cumulative), device=exit_index.device)
    return exit_index, charge[exit_index]


class MultiModelCascade:
    """The MM baseline's models in order of depth, loaded from trained mmexit output folders."""

    def __init__(self, models: Sequence[MultiExitEncoder]) -> None:
        self.models = sorted(models, key=lambda model: model.exit_layers[-1])

    @classmethod
    def from_folders(cls, folders: Sequence[str | Path]) -> "MultiModelCascade":
        return cls([MultiExitEncoder.from_pretrained(folder).eval() for folder in folders])

    @property
    def cumulative_layers(self) -> list[int]:
        return cumulative_layers(self.models)

    @property
    def depth(self) -> int:
        """The deepest model's depth: the L of the layer speed-up (L * N / sum of layers charged)."""
        return self.models[-1].exit_layers[-1]

    def forward(self, rule: ExitRule, input_ids: Tensor, attention_mask: Tensor,
                token_type_ids: Optional[Tensor] = None) -> CascadeOutput:
        return cascade_forward(self.models, rule, input_ids, attention_mask, token_type_ids)

    def all_logits(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None) -> Tensor:
        return cascade_all_logits(self.models, input_ids, attention_mask, token_type_ids)


# ------------------------------------------------------------------------ evaluation of a cascade
def evaluate_cascade(folders: Sequence[str | Path], recipe_path: str, output_dir: str | Path,
                     overrides: Optional[list[str]] = None, thresholds: Optional[list[float]] = None) -> list[dict]:
    """Sweep (simulated) and measure the MM cascade of trained member folders; write results.json.

    The data, calibration and evaluation settings come from ``recipe_path`` (any member's recipe).
    The rule is max-prob, with per-model temperatures when ``calibration.temperature`` is true;
    the operating point is chosen on the calibration split as in the runner (fastest within
    ``evaluate.tolerance`` points of the deepest member). Rows use the results.json row format;
    the reference "full" rows are the deepest member alone (so its layer count is L).
    """
    from mmexit.calibration.temperature import fit_temperatures
    from mmexit.recipe.loading import load_recipe
    from mmexit.recipe.tasks import validate_recipe
    from mmexit.data.text import batches, load_text_task
    from mmexit.evaluation import text_eval
    from mmexit.evaluation.results import write_results
    from mmexit.evaluation.rows import full_model_rows
    from mmexit.evaluation.speed import efficiency, exit_histogram, layer_speedup
    from mmexit.evaluation.timing import machine_info, time_alternating
    from mmexit.exits.confidence import MaxProbRule
    from mmexit.models.loading import load_tokenizer

    recipe = validate_recipe(load_recipe(recipe_path, overrides or []))
    cascade = MultiModelCascade.from_folders(folders)
    models = cascade.models
    first = Path(folders[0])
    tokenizer_source = first / "model" if (first / "model" / "tokenizer_config.json").exists() else None
    if tokenizer_source is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    else:
        tokenizer = load_tokenizer(recipe["model"]["backbone"], recipe["data"]["cache_dir"])
    task = load_text_task(recipe["data"])
    evaluate, max_length = recipe["evaluate"], recipe["model"]["max_length"]

    def split_outputs(split: str) -> tuple[list[dict], text_eval.SplitOutputs]:
        split_batches = list(batches(tokenizer, task.splits[split], evaluate["batch_size"], max_length))
        logits = torch.cat([cascade.all_logits(**_inputs(b)) for b in split_batches], 1)
        labels = torch.cat([b["labels"] for b in split_batches])
        return split_batches, text_eval.SplitOutputs(logits.float(), logits.new_zeros(0), labels)

    _, calib = split_outputs(recipe["calibration"]["split"])
    eval_batches, outputs = split_outputs(evaluate["split"])
    rule = MaxProbRule()
    if recipe["calibration"]["temperature"]:
        rule.temperatures = fit_temperatures(calib.logits, calib.labels)
    cumulative, depth = cascade.cumulative_layers, cascade.depth
    metrics_names, primary = task.metrics, task.primary_metric
    split = evaluate["split"]
    full_metrics = text_eval.score(metrics_names, outputs.logits[-1], outputs.labels)
    rows = full_model_rows(split, full_metrics, primary, depth, outputs.labels.numel(), evaluate["timing_batch_sizes"])

    def point(candidate, data):
        exit_index, charged = simulate_cascade(candidate, data.logits, cumulative)
        chosen = data.logits[exit_index, torch.arange(exit_index.numel())]
        return text_eval.score(metrics_names, chosen, data.labels), layer_speedup(charged, depth), exit_index

    grid = thresholds or rule.default_sweep()
    for threshold in grid:
        metrics, speedup, exit_index = point(rule.with_threshold(threshold), outputs)
        rows.append({"method": "multi_model+maxprob", "rule": rule.with_threshold(threshold).describe(),
                     "operating_point": threshold, "split": split, "metrics": metrics, "primary_metric": primary,
                     "layer_speedup": speedup, "wall_speedup": None, "efficiency": None, "batch_size": None,
                     "exit_histogram": exit_histogram(exit_index, cumulative), "simulated": True,
                     "cost_note": "layers charged cumulatively over the models run"})
    calib_full = text_eval.score(metrics_names, calib.logits[-1], calib.labels)[primary]
    candidates = [(t, *point(rule.with_threshold(t), calib)[:2]) for t in grid]
    within = [c for c in candidates if 100 * (calib_full - c[1][primary]) <= evaluate["tolerance"] + 1e-9]
    best = max(within, key=lambda c: (c[2], c[1][primary])) if within else max(candidates, key=lambda c: (c[1][primary], c[2]))
    chosen = rule.with_threshold(best[0])
    measured = [cascade.forward(chosen, **_inputs(b)) for b in eval_batches]
    exit_index = torch.cat([m.exit_index for m in measured])
    logits = torch.cat([m.logits for m in measured])
    metrics = text_eval.score(metrics_names, logits, outputs.labels)
    speedup = layer_speedup(torch.cat([m.layers_used for m in measured]), depth)
    deepest = models[-1]
    for batch_size in evaluate["timing_batch_sizes"]:
        limit = evaluate["timing_samples"]
        examples = task.splits[split][:limit] if limit else task.splits[split]
        timed = [_inputs(b) for b in batches(tokenizer, examples, batch_size, max_length)]
        timed_layers = torch.cat([cascade.forward(chosen, **b).layers_used for b in timed])
        times = time_alternating({
            "full": lambda: [deepest.forward_full(**b) for b in timed],
            "exit": lambda: [cascade.forward(chosen, **b) for b in timed],
        }, repeats=evaluate["timing_repeats"], warmup=1)
        wall = times["full"] / times["exit"]
        rows.append({"method": "multi_model+maxprob", "rule": chosen.describe(), "operating_point": best[0],
                     "split": split, "metrics": metrics, "primary_metric": primary, "layer_speedup": speedup,
                     "wall_speedup": wall, "efficiency": efficiency(wall, layer_speedup(timed_layers, depth)),
                     "batch_size": batch_size, "exit_histogram": exit_histogram(exit_index, cumulative),
                     "simulated": False, "time_full_s": times["full"], "time_exit_s": times["exit"],
                     "selected_on": recipe["calibration"]["split"], "calib_metric": best[1][primary],
                     "calib_full_metric": calib_full, "calib_layer_speedup": best[2],
                     "members": [str(f) for f in folders]})
    title = f"multi-model cascade ({', '.join(str(c) for c in cumulative)} cumulative layers) on {task.name}"
    write_results(Path(output_dir), recipe | {"cascade_members": [str(f) for f in folders]}, rows, machine_info(), title)
    return rows


def _inputs(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key != "labels"}


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m mmexit.models.cascade MEMBER_DIR... --recipe R --output OUT [key=value ...]``."""
    import argparse
    import sys

    from mmexit.errors import MMExitError

    parser = argparse.ArgumentParser(prog="python -m mmexit.models.cascade",
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


if __name__ == "__main__":
    import sys

    sys.exit(main())
