"""What self-speculative decoding can gain on a machine, from the measured cost of its parts.

``mmexit.inference.speculative`` commits, per round, the agreed prefix of n drafted tokens plus
the full model's correction (no extra "bonus" token: the last draft never runs layers 1..E). A
round costs
    draft   n x (E x step + draft_head + draft_overhead)   (one position at a time, layers 1..E)
    verify  (L - E) x span(n) + final_head(n)              (layers E+1..L over the n positions at once)
and full greedy decoding costs L x step + final_head(1) + full_overhead per token. The overheads
are what a step spends outside the layers and the head (embedding, argmax, bookkeeping); the full
decoder's and the draft loop's differ, so they are measured apart. Both pay the prefix's prefill
once per sequence. With T tokens committed per round, the speed-up is
    (prefill + tokens x full_token) / (prefill + rounds x round),  rounds = tokens / T.
T is at most n (every draft accepted); with a per-token acceptance probability a that does not
depend on the position, T = 1 + a + ... + a^(n-1).

All costs are seconds (or any one unit) measured on the machine; ``span`` maps a chunk length n to
the cost of one layer over n positions (``span[1]`` is one position).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class PartCosts:
    """Measured costs: step (one layer, one position), span {n: one layer over n positions},
    draft_head (exit E's head, one row), final_head {n: the final head over n rows}, prefill (per
    sequence; 0 to leave it out), full_overhead / draft_overhead (per full-decoding step / per drafted
    token, outside the layers and the head); layers: L."""

    layers: int
    step: float
    span: Mapping[int, float]
    draft_head: float
    final_head: Mapping[int, float]
    prefill: float = 0.0
    full_overhead: float = 0.0
    draft_overhead: float = 0.0

    def full_token(self) -> float:
        """One token of full greedy decoding: L layers at one position + the final head on one row
        + the full decoder's per-step overhead."""
        return self.layers * self.step + self.final_head[1] + self.full_overhead

    def round(self, draft_layer: int, drafts: int) -> float:
        """One round with ``drafts`` drafted tokens at draft layer E (1-based)."""
        if not 1 <= draft_layer < self.layers:
            raise ValueError(f"draft_layer must be in 1..{self.layers - 1}, got {draft_layer}")
        draft = drafts * (draft_layer * self.step + self.draft_head + self.draft_overhead)
        verify = (self.layers - draft_layer) * self.span[drafts] + self.final_head[drafts]
        return draft + verify


def tokens_per_round(acceptance: float, drafts: int) -> float:
    """T = 1 + a + ... + a^(n-1): the expected tokens a round commits when each draft is accepted
    with probability ``acceptance`` given the earlier ones were."""
    return sum(acceptance ** i for i in range(drafts))


def predicted_speedup(costs: PartCosts, draft_layer: int, drafts: int, per_round: float,
                      tokens_per_sequence: Optional[float] = None) -> float:
    """Speed-up over full greedy decoding at ``per_round`` committed tokens per round (T).

    tokens_per_sequence: tokens a sequence generates (needed only when ``costs.prefill`` > 0)."""
    if per_round <= 0:
        raise ValueError(f"tokens per round must be > 0, got {per_round}")
    if costs.prefill and not tokens_per_sequence:
        raise ValueError("tokens_per_sequence is needed when the prefill cost is counted")
    tokens = tokens_per_sequence or 1.0
    full = costs.prefill + tokens * costs.full_token()
    speculative = costs.prefill + tokens / per_round * costs.round(draft_layer, drafts)
    return full / speculative


def acceptance_needed(costs: PartCosts, draft_layer: int, drafts: int, target: float,
                      tokens_per_sequence: Optional[float] = None) -> Optional[float]:
    """The smallest per-token acceptance a (``tokens_per_round``) at which the predicted speed-up
    reaches ``target``; None when even a = 1 (every draft accepted) falls short."""
    def speedup(a: float) -> float:
        return predicted_speedup(costs, draft_layer, drafts, tokens_per_round(a, drafts), tokens_per_sequence)

    if speedup(1.0) < target:
        return None
    low, high = 0.0, 1.0  # speed-up grows with a: bisect
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if speedup(middle) < target else (low, middle)
    return high
