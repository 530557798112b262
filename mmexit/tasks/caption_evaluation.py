"""Captioning's hooks of the one evaluation loop (``evaluation.loop.evaluate_rules``).

Per rule: a sweep over operating points on (a subset of) the calibration split with the real
early-exit decoder (layer counts measured; plus, optionally, the oracle mode, labelled
simulated); the loop chooses the point there (fastest within ``evaluate.tolerance`` % of the full
model's CIDEr); the chosen points are then decoded on the test split, scored with pycocoevalcap
and timed against the full model (``evaluation.caption_eval``).
"""

from __future__ import annotations

from collections.abc import Sequence

from mmexit.evaluation.caption_eval import (caption_row, captions_of, decode, project, time_points, timed_rows,
                                            write_examples)
from mmexit.evaluation.caption_metrics import CaptionScorer, write_results_file
from mmexit.evaluation.loop import Sweep
from mmexit.evaluation.operating_point import Candidate, Choice
from mmexit.exits.base import ExitRule
from mmexit.tasks.base import Run


class CaptionEvaluator:
    """The loop's hooks for ``task: captioning`` (see ``evaluation.loop.Evaluator``).

    ``task`` gives the encoder outputs of a split (``task.encoded``) and the pixels of the timed
    images (``task.images``)."""

    def __init__(self, task, run: Run) -> None:
        self.run, self.model, self.tokenizer = run, run.model, run.processor
        self.evaluate = evaluate = run.recipe["evaluate"]
        self.batch = evaluate["batch_size"]
        self.sweep_items = run.data["calib"][: evaluate["sweep_max_images"] or None]
        self.test_items = run.data["test"]
        device = next(self.model.parameters()).device
        self.sweep_features = project(self.model, task.encoded(run, "calib", self.sweep_items).to(device))
        self.test_features = project(self.model, task.encoded(run, "test").to(device))
        # only the timed images are decoded from pixels (the encoder is timed on its own)
        self.test_images = task.images(run, "test", self.test_items[: evaluate["timing_images"]]).to(device)
        # sweeps: BLEU-4 and CIDEr with the Python tokenizer (no java start per point); test rows: PTB
        self.sweep_scorer = CaptionScorer({i.image_id: i.captions for i in self.sweep_items}, ("Bleu_4", "CIDEr"),
                                          use_java=False)
        self.test_scorer = CaptionScorer({i.image_id: i.captions for i in self.test_items}, tuple(evaluate["metrics"]))
        self.lines: list[dict] = []

    def decode(self, rule, features, policy=None):
        return decode(self.model, features, rule, self.evaluate, self.batch, self.tokenizer, policy)

    def reference(self) -> tuple[list[dict], float]:
        full = self.decode(None, self.sweep_features)
        scores = self.sweep_scorer.score(captions_of(full, self.sweep_items, self.tokenizer))
        row = caption_row("full", "full", None, "calib", scores, full, self.model, self.batch, False)
        return [row.to_dict()], scores["CIDEr"]

    def sweep(self, rule: ExitRule, thresholds: Sequence[float]) -> Sweep:
        rows, candidates = [], []
        for threshold in thresholds:
            variant = rule.with_threshold(threshold)
            result = self.decode(variant, self.sweep_features)
            scores = self.sweep_scorer.score(captions_of(result, self.sweep_items, self.tokenizer))
            row = caption_row(variant.name, variant.describe(), threshold, "calib", scores, result, self.model,
                              self.batch, False, variant.warning)
            rows.append(row.to_dict())
            candidates.append(Candidate(threshold, scores["CIDEr"], row.layer_speedup))
            if self.evaluate["oracle_sweep"] and self.evaluate["policy"] != "oracle":
                oracle = self.decode(variant, self.sweep_features, policy="oracle")
                rows.append(caption_row(f"{variant.name} (oracle)", variant.describe(), threshold, "calib",
                                        self.sweep_scorer.score(captions_of(oracle, self.sweep_items, self.tokenizer)),
                                        oracle, self.model, None, True).to_dict())
        return Sweep(rows, candidates)

    def measure(self, points: list[tuple[ExitRule, Choice]]) -> list[dict]:
        items, tokenizer = self.test_items, self.tokenizer
        predictions_dir = self.run.write_dir / "predictions"
        full_test = self.decode(None, self.test_features)
        full_captions = captions_of(full_test, items, tokenizer)
        write_results_file(full_captions, predictions_dir / "full_test.json")
        full_metrics = self.test_scorer.score(full_captions)
        self.lines = [{"index": i, "image_id": item.image_id, "image": item.path.name,
                       "full": full_captions[item.image_id]} for i, item in enumerate(items)]
        examples = {"full": full_captions}
        test_results = []
        for rule, choice in points:
            result = self.decode(rule, self.test_features)
            captions = captions_of(result, items, tokenizer)
            write_results_file(captions, predictions_dir / f"{rule.describe().replace('/', '_')}_test.json")
            examples[rule.describe()] = captions
            for position, (line, item) in enumerate(zip(self.lines, items)):
                layers = result.token_layers[position] if result.token_layers else None
                line[rule.describe()] = {"caption": captions[item.image_id], "layers": layers}
            test_results.append((rule, choice, result, self.test_scorer.score(captions)))
        timed = time_points(self.model, self.evaluate, tokenizer, self.test_images, [r for r, *_ in test_results])
        rows = timed_rows(self.model, timed, full_test, full_metrics, test_results)
        write_examples(self.run.write_dir, items, examples, test_results, self.evaluate["examples"])
        return rows

    def predictions(self) -> list[dict]:
        return self.lines
