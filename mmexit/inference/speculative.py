"""Exact self-speculative decoding (LayerSkip-style) over mmexit's decoder adapters.

One round, for a sequence whose last committed token x sits at cache position p (every earlier
position has true K/V at every layer):
1. **draft**: x, then each drafted token, runs layers 1..E one position at a time (writing their
   K/V at positions p..p+k-1) and the exit head at layer E picks the next token greedily: k drafted
   tokens d_1..d_k (fewer when a draft is EOS or the length limit is near);
2. **verify**: the k hidden states after layer E go through layers E+1..L as ONE causal chunk
   (``adapter.span``); layers 1..E are not run again, their K/V are the draft's (the same layers
   computed them at the same positions from the same tokens). The final head gives the full
   model's next token v_i after each of the k positions;
3. **accept**: the longest prefix with d_i == v_i is kept, plus v_{a+1} (the full model's
   correction) when a draft was rejected. Cache entries past the last committed token are rolled
   back by moving the position: the preallocated cache is overwritten from there next round and a
   query never reads past its own position.
Every committed token is the full model's greedy choice given the committed prefix, so the output
equals full greedy decoding (up to floating-point ties: the verify chunk computes layers E+1..L for
k positions at once instead of one at a time).

Two options make a draft cheaper without touching exactness (verification decides every token):
- ``draft_vocabulary``: the draft head scores only these token ids (e.g. the most frequent tokens of
  the training captions, ``draft_vocabulary.frequent_tokens``; FR-Spec, Zhao et al. 2025): a
  1,024-token draft head costs ~0.05 ms where SmolLM2's 7.4k-token caption head costs ~0.9 ms; a
  token outside it is never drafted, so it is always the full model's correction;
- ``confidence``: drafting stops after a token whose draft probability (softmax over the scored
  tokens) is below this value; that token is still proposed, the next ones would likely be wasted.

Rows are decoded one at a time (batch size 1 inside; per-row acceptance lengths would misalign a
batch). ``model`` is a multi-exit decoder model (``Captioner`` or ``text_generation.TextDecoder``):
``adapter``, ``exits`` (1-based; the draft layer must be an internal exit), ``num_layers``,
``embed``, ``exit_logits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from mmexit.models.kv_cache import DecoderCache


@dataclass
class SpeculativeResult:
    """tokens: per row, generated ids (EOS included when produced, BOS excluded).

    draft_layer: E; draft_tokens: k (per round, at most); drafted / accepted: draft tokens proposed /
    kept over all rows; rounds: draft-verify rounds; row_rounds: rounds per row.
    """

    tokens: list[list[int]]
    draft_layer: int
    draft_tokens: int
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    row_rounds: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return sum(len(row) for row in self.tokens) / self.rounds if self.rounds else 0.0


def _draft_exit(model, draft_layer: int) -> int:
    internal = list(model.exits[:-1])
    if draft_layer not in internal:
        raise ValueError(f"draft_layer must be an internal exit layer of the model ({internal}), got {draft_layer}")
    return internal.index(draft_layer)


@torch.inference_mode()
def speculative_decode(model, features: Tensor, draft_layer: int, draft_tokens: int = 3, max_len: int = 20,
                       bos_id: int = 1, eos_id: Optional[int] = 2, draft_vocabulary: Optional[Tensor] = None,
                       confidence: Optional[float] = None) -> SpeculativeResult:
    """Self-speculative greedy decoding of every row of features [B, ...] (one row at a time).

    draft_layer: E (1-based, an internal exit); draft_tokens: k >= 1; max_len: generated tokens at
    most; bos_id: the first input token; eos_id: stops a row (None: never); draft_vocabulary: sorted
    token ids [n] the draft head scores (None: the exit's whole head; needs ``model.exit_scores``);
    confidence: stop drafting after a token drafted with probability below it (None: always k).
    """
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be in [0, 1], got {confidence}")
    if draft_vocabulary is not None and not hasattr(model, "exit_scores"):
        raise ValueError(f"draft_vocabulary: {type(model).__name__} has no exit_scores (a Captioner has)")
    draft = _Draft(model, _draft_exit(model, draft_layer), draft_vocabulary, confidence)
    result = SpeculativeResult([], draft_layer, draft_tokens)
    for row in range(features.shape[0]):
        rounds_before = result.rounds
        result.tokens.append(_decode_row(model, features[row:row + 1], draft, draft_layer, draft_tokens,
                                         max_len, bos_id, eos_id, result))
        result.row_rounds.append(result.rounds - rounds_before)
    return result


class _Draft:
    """Exit E's head as a drafter: ``next(hidden [1, width])`` -> (token id, keep drafting?)."""

    def __init__(self, model, exit_index: int, vocabulary: Optional[Tensor], confidence: Optional[float]) -> None:
        self.model, self.exit_index, self.vocabulary, self.confidence = model, exit_index, vocabulary, confidence

    def next(self, hidden: Tensor) -> tuple[int, bool]:
        if self.vocabulary is None:
            logits = self.model.exit_logits(self.exit_index, hidden)[0]  # [vocab]
        else:
            logits = self.model.exit_scores(self.exit_index, hidden, self.vocabulary)[0]  # [n]
        best = int(logits.argmax())
        token = best if self.vocabulary is None else int(self.vocabulary[best])
        if self.confidence is None:
            return token, True
        probability = float(torch.softmax(logits.float(), dim=-1)[best])
        return token, probability >= self.confidence


def _decode_row(model, features: Tensor, draft: _Draft, draft_layer: int, k: int, max_len: int, bos_id: int,
                eos_id: Optional[int], result: SpeculativeResult) -> list[int]:
    """One sequence (features [1, ...]); updates the counters of ``result``; returns its tokens."""
    adapter, device = model.adapter, features.device
    cache = DecoderCache(adapter, features, max_len)
    offset, last_exit = cache.offset, model.num_exits - 1
    generated: list[int] = []
    token = bos_id
    while len(generated) < max_len:
        p = len(generated)  # caption position of `token`, the last committed one
        drafts, hiddens = [], []
        for i in range(min(k, max_len - p)):
            hidden = model.embed(torch.tensor([token if i == 0 else drafts[-1]], device=device),
                                 torch.tensor(p + i, device=device))  # [1, width]
            for index in range(draft_layer):
                hidden = adapter.step(index, hidden, cache, None, offset + p + i)
            hiddens.append(hidden)
            token_i, keep_drafting = draft.next(hidden)
            drafts.append(token_i)
            if token_i == eos_id or not keep_drafting:
                break
        chunk = torch.stack(hiddens, dim=1)  # [1, n, width] after layer E at positions p..p+n-1
        for index in range(draft_layer, model.num_layers):
            chunk = adapter.span(index, chunk, cache, None, offset + p)
        verified = model.exit_logits(last_exit, chunk[0]).argmax(-1).tolist()  # [n] the full model's tokens
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == verified[accepted]:
            accepted += 1
        new = drafts[:accepted] + verified[accepted:accepted + 1]  # agreed prefix + the correction
        result.drafted += len(drafts)
        result.accepted += accepted
        result.rounds += 1
        if eos_id is not None and eos_id in new:
            generated += new[: new.index(eos_id) + 1]
            break
        generated += new
        token = generated[-1]
    return generated
