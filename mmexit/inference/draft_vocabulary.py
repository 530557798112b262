"""A speculative draft's short vocabulary: the most frequent tokens of a corpus (FR-Spec).

Drafting scores only these tokens (``speculative_decode(..., draft_vocabulary=...)``); any other
token is left to verification, which stays exact. ``frequent_tokens`` ranks the tokens of the
training captions by count and keeps the first ``size`` (plus the tokens that must stay draftable,
e.g. EOS), restricted to what the model's heads can emit.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor


@dataclass
class DraftVocabulary:
    """ids: sorted token ids [n]; coverage: the share of the corpus's tokens (EOS counted once per
    text) that are in ids."""

    ids: Tensor
    coverage: float


def frequent_tokens(encode: Callable[[str], Sequence[int]], texts: Iterable[str], size: int,
                    always: Sequence[int] = (), allowed: Optional[Tensor] = None) -> DraftVocabulary:
    """The ``size`` most frequent token ids of ``texts`` (each encoded by ``encode``, then one
    ``always[0]`` counted after it when given: the EOS a caption ends with), plus ``always``; only
    ids in ``allowed`` (e.g. a captioner's ``head_ids``) count. Ties keep the smaller id."""
    if size < 1:
        raise ValueError(f"draft vocabulary size must be >= 1, got {size}")
    allowed_set = None if allowed is None else set(allowed.tolist())
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(encode(text))
        if always:
            counts[always[0]] += 1
    if allowed_set is not None:
        counts = Counter({token: n for token, n in counts.items() if token in allowed_set})
    if not counts:
        raise ValueError("draft vocabulary: the texts hold no token the heads can emit")
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    chosen = set(ranked[:size]) | set(always)
    covered = sum(n for token, n in counts.items() if token in chosen)
    return DraftVocabulary(torch.tensor(sorted(chosen), dtype=torch.long), covered / sum(counts.values()))
