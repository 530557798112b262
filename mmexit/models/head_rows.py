"""The rows of an LM head for a subset of token ids, selected once per weight version.

A head that scores only some tokens (a captioner's caption vocabulary, a speculative draft's
frequent tokens) multiplies by ``weight[ids]``. Selecting those rows copies them (SmolLM2: 7,444 of
49,152 rows x 576 = 17 MB), which on a CPU at batch 1 costs more than the product itself (2.9 ms
against 0.85 ms). Outside autograd the selection is kept and reused until the weight changes
(another tensor, another dtype or device, or an in-place update, seen by ``Tensor._version``);
with gradients on it is made afresh every call, so that training reaches the head's weight.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


def _select(head: nn.Linear, ids: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    bias = None if head.bias is None else head.bias.index_select(0, ids)
    return head.weight.index_select(0, ids), bias


def _version(tensor: Tensor) -> int:
    """The in-place update counter (an inference tensor has none: it cannot change outside inference mode)."""
    return -1 if tensor.is_inference() else tensor._version


class HeadRows:
    """``rows(head, ids)`` -> (weight [len(ids), width], bias [len(ids)] or None), cached per ids
    tensor (held here, so its identity stays valid; ids are never changed in place) while gradients
    are off. Copies and pickles of a model start with an empty cache."""

    def __init__(self, max_entries: int = 4) -> None:
        self.max_entries = max_entries
        self._entries: dict[int, tuple[Tensor, tuple, tuple[Tensor, Optional[Tensor]]]] = {}

    def __deepcopy__(self, memo: dict) -> "HeadRows":
        return HeadRows(self.max_entries)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries, "_entries": {}}

    def rows(self, head: nn.Linear, ids: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        if torch.is_grad_enabled():
            return _select(head, ids)
        weight, bias = head.weight, head.bias
        key = (weight.data_ptr(), _version(weight), weight.dtype, weight.device,
               None if bias is None else (bias.data_ptr(), _version(bias)))
        entry = self._entries.get(id(ids))
        if entry is not None and entry[0] is ids and entry[1] == key:
            return entry[2]
        if len(self._entries) >= self.max_entries and id(ids) not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        selected = _select(head, ids)
        self._entries[id(ids)] = (ids, key, selected)
        return selected


def scores(hidden: Tensor, head: nn.Linear, ids: Tensor, cache: HeadRows) -> Tensor:
    """The head's logits for ``ids`` only: hidden [..., width] -> [..., len(ids)]."""
    weight, bias = cache.rows(head, ids)
    return nn.functional.linear(hidden, weight, bias)
