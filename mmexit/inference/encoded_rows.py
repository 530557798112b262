"""Tokenized text rows as the continuous and batch encoders take them, their padding, and the answer per row.

An ``EncodedRow`` is one tokenized text (or pair) without padding: the engines pad per call
(``pad_rows``), to the longest row of that call. A ``RowOutput`` is what an engine answers per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


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
