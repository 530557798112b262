"""Which layer runs next, on which rows: the per-layer queues and the policy of continuous batching.

Every row in flight (a text being classified, an image's current caption token) holds a slot
(``slot_pool.SlotPool``) and waits in the queue of the layer it runs next. Modelled on vLLM's
``Scheduler.schedule()`` / ``update_from_output()`` split:
  - ``schedule(admissible, admit)`` says what runs next: a ``Batch`` (a layer, at most ``max_call``
    of the rows waiting there). When it picks layer 0 it first asks ``admit(count)`` to bring that
    many waiting rows into free slots (they join the layer-0 queue, behind the rows already there);
  - ``update(outcome)`` takes what the call did: the rows that go on to the next layer, the rows
    that re-enter layer 0 (a caption's next token) and the rows that finished (their slots are freed
    by the caller).

The policy, deterministic; ages are counted in layer calls (``calls``, the calls so far):
  1. age bound: a queue whose oldest row has waited more than ``max_wait`` calls (default: twice the
     model's layers) runs (the one waited on longest, the deeper one on ties): no row starves;
  2. else the queue with the highest score runs: its waiting rows (at most ``max_call``) x its layer's
     weight, plus ``catch_up`` x the rows waiting one layer deeper, the deeper one on ties. Layer
     weights grow with depth, 1 + ``depth_bias`` x layer / (layers - 1), and the layer-0 queue's is
     ``restart_weight``; rows that could be admitted now (``admissible``: waiting rows, at most the
     free slots) count in the layer-0 queue. The catch-up term prefers a call whose rows then join
     the rows one layer ahead (the two groups go on in one call instead of two); a restart weight
     below 1 lets rows entering layer 0 gather while deeper queues run. ``depth_bias=0, catch_up=0,
     restart_weight=1``: the fullest queue; a huge ``depth_bias``: the deepest queue (every row in
     flight runs to its exit before layer 0 runs again).
A call takes its queue's oldest ``max_call`` rows, or the rows ``choose(queue, count)`` picks (the
text runner groups rows of similar length; the oldest row is always among them).

The defaults (1, 1, 0.5) were chosen on the per-token exit layers of trained captioners (16 slots):
on the caption quickstart (four rules x four sets of 64 images) they take 6.3% fewer layer calls
than ``depth_bias=2.5`` with no catch-up term and restart weight 1, the same calls for the full
model, and 0.4% fewer on the 30-layer real captioner (exits every 3 layers); an order chosen with
every token's exit layer known in advance (a beam search over call orders) needs 5-8% fewer calls
again (docs/results/serving.md).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

#: choose(queue, count) -> the ``count`` rows of ``queue`` (oldest first, longer than count) a call runs
Chooser = Callable[[list[int], int], list[int]]


@dataclass(frozen=True)
class SchedulerSettings:
    """max_wait: the age bound in layer calls (None: twice the model's layers; a huge value: no bound);
    depth_bias, catch_up, restart_weight: the score's weights (module doc); max_call: the most rows one
    layer call takes (None: every row waiting at the layer); admit_ahead: rows the layer-0 queue may
    hold after an admission (None: ``max_call``; more gives ``choose`` rows to choose from)."""

    max_wait: Optional[int] = None
    depth_bias: float = 1.0
    catch_up: float = 1.0
    restart_weight: float = 0.5
    max_call: Optional[int] = None
    admit_ahead: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_call is not None and self.max_call < 1:
            raise ValueError(f"max_call must be >= 1 (or None), got {self.max_call}")
        if self.admit_ahead is not None and self.admit_ahead < 1:
            raise ValueError(f"admit_ahead must be >= 1 (or None), got {self.admit_ahead}")
        if (self.max_wait is not None and self.max_wait < 0) or min(self.depth_bias, self.catch_up) < 0 \
                or self.restart_weight <= 0:
            raise ValueError(f"max_wait, depth_bias and catch_up must be >= 0 and restart_weight > 0, got "
                             f"{self.max_wait}, {self.depth_bias}, {self.catch_up}, {self.restart_weight}")


@dataclass
class Batch:
    """What runs next: ``layer`` (0-based) on ``rows`` (slots, at most ``max_call``)."""

    layer: int
    rows: list[int]


@dataclass
class Outcome:
    """What a call of ``layer`` did: ``ran`` rows went through it; ``next``: rows that wait at layer + 1;
    ``restart``: rows that re-enter layer 0 (a caption's next token); ``finished``: (slot, result) of
    the rows that are done (the caller frees their slots)."""

    layer: int
    ran: int = 0
    next: list[int] = field(default_factory=list)
    restart: list[int] = field(default_factory=list)
    finished: list[tuple[int, Any]] = field(default_factory=list)


class Scheduler:
    """The per-layer queues of a model of ``num_layers`` layers and the policy (module doc)."""

    def __init__(self, num_layers: int, settings: SchedulerSettings = SchedulerSettings(),
                 choose: Optional[Chooser] = None) -> None:
        self.num_layers = int(num_layers)
        self.max_wait = 2 * num_layers if settings.max_wait is None else int(settings.max_wait)
        last = num_layers - 1
        # score weight of each layer's queue: restart_weight at layer 0, 1 + depth_bias at the last layer
        self.layer_weight = [1.0 + settings.depth_bias * index / max(1, last) for index in range(num_layers)]
        self.layer_weight[0] = float(settings.restart_weight)
        self.catch_up = float(settings.catch_up)
        self.max_call = settings.max_call
        self.admit_ahead = settings.admit_ahead if settings.admit_ahead is not None else settings.max_call
        self.choose = choose
        self.queues: list[deque[int]] = [deque() for _ in range(num_layers)]
        self.entered: dict[int, int] = {}  # slot -> the call count when it joined its queue
        self.calls = 0  # layer calls so far (the age unit)

    @property
    def busy(self) -> bool:
        """True while some row waits at some layer."""
        return any(self.queues)

    def add(self, layer: int, rows: list[int]) -> None:
        """``rows`` (slots) join the queue of ``layer``, now."""
        queue = self.queues[layer]
        for row in rows:
            self.entered[row] = self.calls
            queue.append(row)

    def pick(self, admissible: int = 0) -> Optional[int]:
        """The layer to run next, or None when nothing waits; ``admissible``: rows that would take free
        slots at a layer-0 call (they count in the layer-0 queue)."""
        best, best_key = None, None
        queues, calls, last = self.queues, self.calls, self.num_layers - 1
        for index, queue in enumerate(queues):
            size = len(queue) + (admissible if index == 0 else 0)
            if size == 0:
                continue
            if self.max_call is not None:  # a call takes at most max_call of them
                size = min(size, self.max_call)
            waited = calls - self.entered[queue[0]] if queue else 0
            if waited > self.max_wait:
                key = (True, waited, index)
            else:
                score = size * self.layer_weight[index]
                if index < last:
                    score += self.catch_up * len(queues[index + 1])
                key = (False, score, index)
            if best_key is None or key > best_key:
                best, best_key = index, key
        return best

    def schedule(self, admissible: int = 0, admit: Optional[Callable[[int], list[int]]] = None) -> Optional[Batch]:
        """The next call (``pick``, then its rows), or None when nothing waits. Before a layer-0 call
        ``admit(count)`` brings up to ``admit_ahead`` - queued rows (at most ``admissible``) into slots
        and returns their slots, which join the layer-0 queue."""
        layer = self.pick(admissible if admit is not None else 0)
        if layer is None:
            return None
        queue = self.queues[0]
        if layer == 0 and admit is not None and admissible:
            room = admissible if self.admit_ahead is None else min(admissible, self.admit_ahead - len(queue))
            if room > 0:
                self.add(0, admit(room))
        return Batch(layer, self.take(layer))

    def take(self, layer: int) -> list[int]:
        """Remove and return the rows of a call of ``layer``: its oldest ``max_call`` rows, or ``choose``'s."""
        queue = self.queues[layer]
        count = len(queue) if self.max_call is None else min(self.max_call, len(queue))
        if count < len(queue) and self.choose is not None:
            window = list(queue)
            chosen = self.choose(window, count)
            if len(chosen) != count or window[0] not in chosen:
                raise RuntimeError("choose must return count rows including the oldest")
            picked = set(chosen)
            queue.clear()
            queue.extend(row for row in window if row not in picked)
            rows = [row for row in window if row in picked]
        else:
            rows = [queue.popleft() for _ in range(count)]
        for row in rows:
            del self.entered[row]
        return rows

    def update(self, outcome: Outcome) -> None:
        """Count the call (when it ran rows) and queue its rows that go on (``Outcome``)."""
        if outcome.ran:
            self.calls += 1
        if outcome.next:
            self.add(outcome.layer + 1, outcome.next)
        if outcome.restart:
            self.add(0, outcome.restart)

    def clear(self) -> list[int]:
        """Empty every queue (after a failed call); the rows that were waiting."""
        rows = [row for queue in self.queues for row in queue]
        for queue in self.queues:
            queue.clear()
        self.entered.clear()
        return rows
