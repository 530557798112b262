"""The layer-level continuous-batching engine: rows of many requests share one pool of slots.

A shrinking batch (``early_exit_forward``) runs its deep layers on the few rows that are left,
and a batch ends only when its slowest row does. Here every row in flight owns a *slot* of a pool
and waits in the queue of the layer it runs next; each call runs one layer on up to ``max_batch``
rows of that layer's queue, whichever requests they came from. A row that exits frees its slot at
once and a waiting request's row takes it.

Pool (allocated in the model thread, on the model's device; S = ``slots``, T = the run's
``max_length``, H = hidden size):
  - ``hidden`` [S, T, H]: each row's hidden states (positions past its length are padding);
  - ``lengths`` [S]: tokens per row; the attention mask of a call is ``arange(T') < length``;
  - per slot, the rule state rows ({key: tensor[...]}; stacked per call, split back after it),
    so PABEE counters and BEEM scores move with their rows; ``rule.start`` creates new rows' state.

Scheduler, before every call:
  1. admission: rows of waiting requests (FIFO) take free slots while the layer-0 queue holds fewer
     than ``max_batch`` rows (4 x ``max_batch`` with ``group_lengths``); they are embedded in calls
     of at most ``max_batch`` rows and join the layer-0 queue;
  2. age bound: when the oldest row of some queue has waited there over ``max_wait_ms``, the queue
     with the oldest such row runs (no row starves behind full queues);
  3. else the deepest queue holding ``max_batch`` rows or more runs (a full call: under load the
     pool moves rows in full calls, and the deepest rows free their slots first);
  4. else the queue holding the earliest-submitted row runs (deeper on ties): under light load rows
     already in flight finish first while new arrivals gather at layer 0 and then run together,
     instead of every row taking its own small call at its own layer. The engine is
     work-conserving: it never idles while a row waits.
A call takes its queue's oldest ``max_batch`` rows, or with ``group_lengths`` (the default) and more
rows waiting, the oldest row and the rows nearest to it in length (the block of ``max_batch``
rows, in length order, that wastes the fewest padded tokens). Rows are padded to the call's
longest; with a padding mask, BERT-style attention gives each row the result it gets alone up to
float noise (tests/serve/test_engine.py checks labels, exit layers and probabilities against
``early_exit_forward`` on the row alone).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, check_state
from mmexit.inference.exit_loop import decide_at_exit
from mmexit.models.encoder import MultiExitEncoder
from mmexit.serve.engine_base import BaseEngine, EngineFull, EngineStopped, Request
from mmexit.serve.text_rows import EncodedRow, RowOutput, pad_rows

__all__ = ["ContinuousEngine", "EngineFull", "EngineStopped"]


class ContinuousEngine(BaseEngine):
    """Continuous batching at layer granularity for a ``MultiExitEncoder`` and an exit rule.

    max_batch: rows per layer call; slots: rows in flight (default 8 x max_batch); max_length:
    tokens per row (the run's ``model.max_length``); max_wait_ms: the age bound of a queue;
    group_lengths: let calls group rows of similar length (see the module doc); max_queue_wait:
    refuse requests past this many seconds of queued work (``BaseEngine``).
    """

    kind = "continuous"

    def __init__(self, model: MultiExitEncoder, rule: ExitRule, max_length: int, max_batch: int = 32,
                 max_queue: int = 1024, slots: Optional[int] = None, max_wait_ms: float = 100.0,
                 pad_id: int = 0, group_lengths: bool = True, max_queue_wait: Optional[float] = None) -> None:
        super().__init__(max_batch, max_queue, max_queue_wait)
        self.model, self.rule = model, rule
        self.max_length, self.pad_id = int(max_length), int(pad_id)
        self.slots = int(slots or 8 * max_batch)
        if self.slots < self.max_batch:
            raise ValueError(f"slots ({self.slots}) must be >= max_batch ({self.max_batch})")
        self.max_wait = float(max_wait_ms) / 1000.0
        self.group_lengths = bool(group_lengths)
        # rows admitted ahead at layer 0: more candidates let a call group rows of similar length
        self.admit_limit = min(4 * self.max_batch, self.slots) if self.group_lengths else self.max_batch
        self.device = next(model.parameters()).device
        self.num_layers = model.num_layers
        # queues[l]: slots waiting to run layer l (0-based); entered[slot]: when it joined its queue
        self.queues: list[deque[int]] = [deque() for _ in range(self.num_layers)]
        self.entered = [0.0] * self.slots
        self.born = [0.0] * self.slots  # when the slot's request was submitted
        self.owner: list[Optional[tuple[Request, int]]] = [None] * self.slots
        self.row_length = [0] * self.slots  # tokens per slot, on the host (for length grouping)
        self.state: list[dict[str, Tensor]] = [{} for _ in range(self.slots)]
        self.free: list[int] = list(range(self.slots - 1, -1, -1))
        self.calls = 0
        self.tokens = [0, 0]  # [real, padded] tokens of the layer calls so far (padding efficiency)

    def describe(self) -> dict:
        return super().describe() | {"slots": self.slots, "max_wait_ms": self.max_wait * 1000.0,
                                     "group_lengths": self.group_lengths}

    # ---------------------------------------------------------------- setup
    def _check_items(self, items: Sequence[Any]) -> None:
        for item in items:
            if not isinstance(item, EncodedRow):
                raise TypeError(f"ContinuousEngine takes EncodedRow items, got {type(item).__name__}")
            if not 0 < item.length <= self.max_length:
                raise ValueError(f"a row has {item.length} tokens; this engine takes 1 to {self.max_length}")

    def _setup(self) -> None:
        hidden_size = self.model.backbone.config.hidden_size
        dtype = next(self.model.parameters()).dtype
        self.hidden = torch.zeros(self.slots, self.max_length, hidden_size, dtype=dtype, device=self.device)
        self.lengths = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.positions = torch.arange(self.max_length, device=self.device)

    def _busy(self) -> bool:
        return any(self.queues)

    @property
    def in_flight(self) -> int:
        return self.slots - len(self.free)

    # ------------------------------------------------------------- scheduler
    def _step(self) -> None:
        start, done = time.perf_counter(), self.rows_done
        self._admit()
        layer = self._pick()
        if layer is not None:
            slots = self._live(self._select(layer))
            if slots:
                self._run_layer(layer, slots)
        self._account(time.perf_counter() - start, self.rows_done - done)

    def _admit(self) -> None:
        """Waiting rows take free slots (up to a call's worth at layer 0); one embedding call."""
        room = min(len(self.free), self.admit_limit - len(self.queues[0]), self.max_batch)
        if room <= 0:
            return
        with self.cond:
            taken = self._take(room)
        if not taken:
            return
        slots = [self.free.pop() for _ in taken]
        rows: list[EncodedRow] = [request.items[row] for request, row in taken]
        batch = {k: v.to(self.device) for k, v in pad_rows(rows, self.pad_id).items()}
        hidden, _ = self.model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
        index = torch.tensor(slots, device=self.device)
        self.hidden[index, :hidden.shape[1]] = hidden
        self.lengths[index] = batch["attention_mask"].sum(1)
        state = self.rule.start(len(slots), self.device)
        check_state(self.rule, state, len(slots))
        now = time.monotonic()
        for position, (slot, owner) in enumerate(zip(slots, taken)):
            self.owner[slot] = owner
            self.born[slot] = owner[0].submitted
            self.row_length[slot] = rows[position].length
            self.state[slot] = {key: value[position] for key, value in state.items()}
            self.entered[slot] = now
            self.queues[0].append(slot)
        if self.on_call:
            self.on_call(0, len(slots))

    def _pick(self) -> Optional[int]:
        """The layer to run next: an over-age queue (the one waited on longest), else the deepest
        full queue, else the queue holding the earliest-submitted row (deeper on ties)."""
        now = time.monotonic()
        late, late_age, full, first, first_key = None, self.max_wait, None, None, None
        for layer, queue in enumerate(self.queues):
            if not queue:
                continue
            age = now - self.entered[queue[0]]
            if age > late_age:
                late, late_age = layer, age
            if len(queue) >= self.max_batch:
                full = layer
            key = (min(self.born[slot] for slot in queue), -layer)
            if first_key is None or key < first_key:
                first, first_key = layer, key
        if late is not None:
            return late
        return full if full is not None else first

    def _select(self, layer: int) -> list[int]:
        """The rows of a call: the queue's oldest ``max_batch`` rows, or with ``group_lengths`` and a
        longer queue, the oldest row plus the rows closest to it in length (least padding)."""
        queue, size = self.queues[layer], self.max_batch
        if len(queue) <= size or not self.group_lengths:
            return [queue.popleft() for _ in range(min(size, len(queue)))]
        window = list(queue)
        lengths = [self.row_length[slot] for slot in window]
        order = sorted(range(len(window)), key=lambda i: (lengths[i], i))
        where = order.index(0)  # the oldest row is always in the call
        sums = [0]
        for i in order:
            sums.append(sums[-1] + lengths[i])

        def waste(first: int) -> int:  # padded tokens of the block order[first:first + size]
            return size * lengths[order[first + size - 1]] - (sums[first + size] - sums[first])

        first = min(range(max(0, where - size + 1), min(where, len(window) - size) + 1), key=waste)
        chosen = set(order[first:first + size])
        queue.clear()
        queue.extend(slot for i, slot in enumerate(window) if i not in chosen)
        return [slot for i, slot in enumerate(window) if i in chosen]

    def _live(self, slots: list[int]) -> list[int]:
        """Drop (and free) the rows of requests that were cancelled or failed."""
        live = []
        for slot in slots:
            request, _ = self.owner[slot]
            if request.dead or request.future.cancelled():
                self._drop(request)
                self._release(slot)
            else:
                live.append(slot)
        return live

    def _release(self, slot: int) -> None:
        self.owner[slot] = None
        self.state[slot] = {}
        self.free.append(slot)

    # --------------------------------------------------------------- one call
    def _run_layer(self, layer: int, slots: list[int]) -> None:
        """Run layer ``layer`` (0-based) on ``slots``: gather, pad, run, exit, scatter back."""
        model = self.model
        index = torch.tensor(slots, device=self.device)
        lengths = self.lengths[index]
        longest = int(lengths.max())
        hidden = self.hidden[index, :longest]  # [rows, longest, hidden] (a copy)
        mask = (self.positions[:longest][None, :] < lengths[:, None]).long()  # [rows, longest]
        context = model.adapter.context(hidden, mask)
        context["attention_mask"] = mask
        hidden = model.run_layer(layer, hidden, context)
        self.calls += 1
        self.tokens[0] += sum(self.row_length[slot] for slot in slots)
        self.tokens[1] += longest * len(slots)
        if self.on_call:
            self.on_call(layer + 1, len(slots))
        exit_now = model.exit_after.get(layer)
        if exit_now is None:
            self._advance(layer, slots, index, hidden)
            return
        head = model.heads[exit_now]
        pooled = head.pool(hidden, mask)  # [rows, hidden]
        logits = head.classify(pooled)  # [rows, labels]
        if exit_now == model.num_exits - 1:
            stop = torch.ones(len(slots), dtype=torch.bool, device=self.device)
        else:
            state = self._gather_state(slots)
            stop = decide_at_exit(self.rule, exit_now, model.num_exits, logits, pooled, state)  # [rows] bool
            self._scatter_state(slots, state)
        self._finish(slots, stop, logits, exit_now)
        keep = ~stop
        if bool(keep.any()):
            kept = [slot for slot, k in zip(slots, keep.tolist()) if k]
            self._advance(layer, kept, index[keep], hidden[keep])

    def _advance(self, layer: int, slots: list[int], index: Tensor, hidden: Tensor) -> None:
        """Write the rows' new hidden states back and queue them for the next layer."""
        self.hidden[index, :hidden.shape[1]] = hidden
        now = time.monotonic()
        queue = self.queues[layer + 1]
        for slot in slots:
            self.entered[slot] = now
            queue.append(slot)

    def _finish(self, slots: list[int], stop: Tensor, logits: Tensor, exit_index: int) -> None:
        """Answer the rows that stopped at ``exit_index`` and free their slots."""
        if not bool(stop.any()):
            return
        stopped = [slot for slot, s in zip(slots, stop.tolist()) if s]
        rows_logits = logits[stop].float().cpu()
        layer = int(self.model.exit_layers[exit_index])
        for position, slot in enumerate(stopped):
            request, row = self.owner[slot]
            self._release(slot)
            self._answer(request, row, RowOutput(rows_logits[position], exit_index, layer))
        if self.on_exit:
            self.on_exit(layer, len(stopped))

    def _gather_state(self, slots: list[int]) -> dict[str, Tensor]:
        """Stack the slots' rule state rows: {key: [rows, ...]}."""
        first = self.state[slots[0]]
        return {key: torch.stack([self.state[slot][key] for slot in slots]) for key in first}

    def _scatter_state(self, slots: list[int], state: dict[str, Tensor]) -> None:
        for position, slot in enumerate(slots):
            self.state[slot] = {key: value[position] for key, value in state.items()}

    def _fail_in_flight(self, error: BaseException) -> None:
        """Fail every request with a row in flight and empty the pool."""
        for queue in self.queues:
            for slot in queue:
                owner = self.owner[slot]
                if owner is not None:
                    self._fail(owner[0], error)
                    self._release(slot)
            queue.clear()
        for slot in range(self.slots):  # rows popped for the call that raised
            owner = self.owner[slot]
            if owner is not None:
                self._fail(owner[0], error)
                self._release(slot)
