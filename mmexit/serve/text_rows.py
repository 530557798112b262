"""Rows of a text request: tokenized one by one for the serving engines, answered as JSON dicts.

A served text becomes an ``EncodedRow``: its token ids [len] (no padding: the engines pad per layer
call) and token type ids [len] or None. ``row_result`` turns an engine's ``RowOutput`` (exit logits
[labels], exit index) into the same dict ``TextPredictor.predict`` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from mmexit.data.examples import TextExample


@dataclass
class EncodedRow:
    """One tokenized text (or pair): input_ids [len], token_type_ids [len] or None."""

    input_ids: Tensor
    token_type_ids: Optional[Tensor] = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class RowOutput:
    """What an engine answers per row: logits [labels] of the exit it left at (CPU, float32),
    exit_index (0-based position in the model's exit list) and exit_layer (1-based layer number)."""

    logits: Tensor
    exit_index: int
    exit_layer: int


def encode_rows(tokenizer, examples: Sequence[TextExample], max_length: int) -> list[EncodedRow]:
    """Tokenize (truncating to ``max_length``) and strip the padding: one ``EncodedRow`` per example.

    Singles and pairs are tokenized separately (one tokenizer call each), so a request may mix them.
    """
    rows: list[Optional[EncodedRow]] = [None] * len(examples)
    for pairs in (False, True):
        positions = [i for i, e in enumerate(examples) if (e.text_b is not None) == pairs]
        if not positions:
            continue
        texts_a = [examples[i].text_a for i in positions]
        texts_b = [examples[i].text_b for i in positions] if pairs else None
        batch = tokenizer(texts_a, texts_b, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        types = batch.get("token_type_ids")
        for row, position in enumerate(positions):
            keep = batch["attention_mask"][row].bool()
            rows[position] = EncodedRow(batch["input_ids"][row][keep].clone(),
                                        None if types is None else types[row][keep].clone())
    return rows  # type: ignore[return-value]


def pad_rows(rows: Sequence[EncodedRow], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad rows to the longest: input_ids, attention_mask (and token_type_ids) [rows, longest]."""
    longest = max(row.length for row in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    with_types = rows[0].token_type_ids is not None
    types = torch.zeros((len(rows), longest), dtype=torch.long) if with_types else None
    for index, row in enumerate(rows):
        ids[index, :row.length] = row.input_ids
        mask[index, :row.length] = 1
        if types is not None and row.token_type_ids is not None:
            types[index, :row.length] = row.token_type_ids
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    return batch


def row_result(output: RowOutput, label_names: Sequence[str], temperatures: Optional[Sequence[float]]) -> dict:
    """An engine row -> {label, label_index, probabilities, exit_layer} as ``TextPredictor.predict``."""
    logits = output.logits.float()
    if logits.shape[-1] == 1:
        return {"label": float(logits[0]), "label_index": None, "probabilities": None,
                "exit_layer": output.exit_layer}
    scaled = logits / float(temperatures[output.exit_index]) if temperatures is not None else logits
    index = int(logits.argmax())
    return {"label": label_names[index] if index < len(label_names) else index, "label_index": index,
            "probabilities": [round(float(p), 6) for p in scaled.softmax(-1)], "exit_layer": output.exit_layer}
