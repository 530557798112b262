"""Which decoder layer the continuous decoder runs next (``ContinuousDecoder``, one call per decision).

Deterministic; ages are counted in layer calls.

  1. age bound: a queue whose oldest token has waited more than ``max_wait`` calls (default: twice
     the decoder's layers) runs (the one waited on longest, the deeper one on ties): no token starves;
  2. else the queue with the highest score runs: its waiting tokens x its layer's weight, plus
     ``catch_up`` x the tokens waiting one layer deeper, the deeper one on ties. Layer weights grow
     with depth, 1 + ``depth_bias`` x layer / (layers - 1), and the layer-0 queue's is
     ``restart_weight`` (tokens that left at an exit re-enter there). The catch-up term prefers a
     call whose tokens then join the tokens one layer ahead (the two groups go on in one call
     instead of two); a restart weight below 1 lets tokens re-entering layer 0 gather while deeper
     queues run. ``depth_bias=0, catch_up=0, restart_weight=1``: the fullest queue; a huge
     ``depth_bias``: the deepest queue (every token in flight runs to its exit before layer 0 runs
     again: step-synchronous sweeps, with finished rows' slots refilled at once). Images waiting
     for a free slot count in the layer-0 queue (the decoder admits them just before a layer-0 call).

The defaults (1, 1, 0.5) were chosen on the per-token exit layers of trained runs (16 slots):
on the caption quickstart (four rules x four sets of 64 images) they take 6.3% fewer layer
calls than the earlier default (``depth_bias=2.5``, no catch-up term, restart weight 1),
the same calls for the full model, and 0.4% fewer on the 30-layer real captioner (exits every
3 layers); an order chosen with every token's exit layer known in advance (a beam search over
call orders) needs 5-8% fewer calls again (docs/results/serving.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol, Sequence


class Queued(Protocol):
    """What the scheduler reads of a group of tokens waiting at a layer: the call count it joined at."""

    entered: int


@dataclass(frozen=True)
class SchedulerSettings:
    """The scheduler's settings (module doc): max_wait, the age bound in layer calls (None: twice the
    decoder's layers; a huge value: no bound); depth_bias, catch_up, restart_weight: the score's weights;
    max_call: the most tokens one layer call takes (None: every token waiting at the layer; with more
    slots than ``max_call`` the pool is deeper than a call, and calls fill up with tokens of one layer)."""

    max_wait: Optional[int] = None
    depth_bias: float = 1.0
    catch_up: float = 1.0
    restart_weight: float = 0.5
    max_call: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_call is not None and self.max_call < 1:
            raise ValueError(f"max_call must be >= 1 (or None), got {self.max_call}")
        if (self.max_wait is not None and self.max_wait < 0) or min(self.depth_bias, self.catch_up) < 0 \
                or self.restart_weight <= 0:
            raise ValueError(f"max_wait, depth_bias and catch_up must be >= 0 and restart_weight > 0, got "
                             f"{self.max_wait}, {self.depth_bias}, {self.catch_up}, {self.restart_weight}")


class LayerScheduler:
    """Picks the layer whose queue runs next (module doc) for a decoder of ``num_layers`` layers."""

    def __init__(self, num_layers: int, settings: SchedulerSettings = SchedulerSettings()) -> None:
        self.max_wait = 2 * num_layers if settings.max_wait is None else int(settings.max_wait)
        self.last = num_layers - 1
        # score weight of each layer's queue: restart_weight at layer 0, 1 + depth_bias at the last layer
        self.layer_weight = [1.0 + settings.depth_bias * index / max(1, self.last) for index in range(num_layers)]
        self.layer_weight[0] = float(settings.restart_weight)
        self.catch_up = float(settings.catch_up)
        self.max_call = settings.max_call

    def pick(self, queues: Sequence[Sequence[Queued]], queued: Sequence[int], admissible: int,
             calls: int) -> Optional[int]:
        """The layer to run next, or None when nothing waits.

        queues: per layer, its waiting groups in the order they joined (the first is the oldest);
        queued: tokens waiting per layer; admissible: images that would take free slots at a layer-0
        call (they count in the layer-0 queue); calls: layer calls so far.
        """
        best, best_key = None, None
        max_wait, catch_up, last = self.max_wait, self.catch_up, self.last
        for index, queue in enumerate(queues):
            size = queued[index] + (admissible if index == 0 else 0)
            if size == 0:
                continue
            if self.max_call is not None:  # a call takes at most max_call of them
                size = min(size, self.max_call)
            waited = calls - queue[0].entered if queue else 0
            if waited > max_wait:
                key = (True, waited, index)
            else:
                score = size * self.layer_weight[index]
                if index < last:
                    score += catch_up * queued[index + 1]
                key = (False, score, index)
            if best_key is None or key > best_key:
                best, best_key = index, key
        return best
