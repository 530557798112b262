"""One encoder layer on some rows of a slot pool, then its exit (``ContinuousCore``'s runner for text).

A shrinking batch (``early_exit_forward``) runs its deep layers on the few rows that are left, and
a batch ends only when its slowest row does. Under ``ContinuousCore`` every row in flight owns a
slot and waits in the queue of the layer it runs next; each call runs one layer on rows of one
queue, whichever requests they came from, and a row that exits frees its slot at once.

Buffers (allocated at the first admission, on the model's device; S = ``slots``, T = ``max_length``,
H = hidden size):
  - ``hidden`` [S, T, H]: each row's hidden states (positions past its length are padding);
  - ``lengths`` [S]: tokens per row; the attention mask of a call is ``arange(T') < length``;
  - ``states``: the rule's state rows per slot (``SlotTensors``), so PABEE counters and BEEM scores
    move with their rows; ``rule.start`` creates new rows' state.
Admission embeds new rows in calls of at most ``max_call`` rows. A call's rows are padded to its
longest; with a padding mask, BERT-style attention gives each row the result it gets alone up to
float noise. ``choose`` (the scheduler's row choice when a queue holds more rows than a call takes)
runs the oldest row and the rows nearest to it in length: the block of ``count`` rows, in length
order, that wastes the fewest padded tokens.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, check_state
from mmexit.inference.continuous_core import Upcoming
from mmexit.inference.encoded_rows import EncodedRow, RowOutput, pad_rows
from mmexit.inference.exit_loop import decide_at_exit
from mmexit.inference.scheduler import Outcome
from mmexit.inference.slot_pool import SlotTensors
from mmexit.models.encoder import MultiExitEncoder

#: hook(layer, rows): a call of ``layer`` (1-based; 0 = the embedding) ran ``rows`` rows, or ``rows``
#: rows left at the exit after ``layer``
LayerHook = Callable[[int, int], None]


class EncoderLayerRunner:
    """Text rows (``EncodedRow``) of a ``MultiExitEncoder`` through its layers and exits; results:
    ``RowOutput``. on_call / on_exit: hooks called after each call / for the rows leaving at an exit;
    ``tokens``: [real, padded] tokens of the layer calls so far (padding efficiency)."""

    def __init__(self, model: MultiExitEncoder, rule: ExitRule, max_length: int, slots: int, max_call: int,
                 pad_id: int = 0, on_call: Optional[LayerHook] = None, on_exit: Optional[LayerHook] = None) -> None:
        self.model, self.rule = model, rule
        self.max_length, self.slots = int(max_length), int(slots)
        self.max_call, self.pad_id = int(max_call), int(pad_id)
        self.on_call, self.on_exit = on_call, on_exit
        self.num_layers = model.num_layers
        self.device = next(model.parameters()).device
        self.hidden: Optional[Tensor] = None  # [S, T, H], at the first admission
        self.lengths: Optional[Tensor] = None  # [S]
        self.positions = torch.arange(self.max_length, device=self.device)
        self.row_length = [0] * self.slots  # tokens per slot, on the host (for length grouping)
        self.states = SlotTensors(self.slots)
        self.tokens = [0, 0]

    def accept(self, items: Sequence[Any]) -> list[EncodedRow]:
        """Raise for rows this runner cannot take (not an ``EncodedRow``, empty or longer than max_length)."""
        for item in items:
            if not isinstance(item, EncodedRow):
                raise TypeError(f"the continuous engine takes EncodedRow items, got {type(item).__name__}")
            if not 0 < item.length <= self.max_length:
                raise ValueError(f"a row has {item.length} tokens; this engine takes 1 to {self.max_length}")
        return list(items)

    def admit(self, slots: list[int], items: list[EncodedRow], upcoming: Upcoming) -> None:
        """Rows take ``slots``: their embeddings (calls of at most ``max_call`` rows) and start state."""
        if self.hidden is None:
            parameter = next(self.model.parameters())
            width = self.model.backbone.config.hidden_size
            self.hidden = torch.zeros(self.slots, self.max_length, width, dtype=parameter.dtype, device=self.device)
            self.lengths = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        for start in range(0, len(slots), self.max_call):
            chunk, rows = slots[start:start + self.max_call], items[start:start + self.max_call]
            batch = {k: v.to(self.device) for k, v in pad_rows(rows, self.pad_id).items()}
            hidden, _ = self.model.embed(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            index = torch.tensor(chunk, device=self.device)
            self.hidden[index, :hidden.shape[1]] = hidden
            self.lengths[index] = batch["attention_mask"].sum(1)
            for slot, row in zip(chunk, rows):
                self.row_length[slot] = row.length
            state = self.rule.start(len(chunk), self.device)
            check_state(self.rule, state, len(chunk))
            self.states.write(chunk, index, state)
            if self.on_call:
                self.on_call(0, len(chunk))

    def run(self, layer: int, rows: list[int]) -> Outcome:
        """Layer ``layer`` (0-based) on ``rows``: gather, pad, run, exit, scatter back."""
        model = self.model
        index = torch.tensor(rows, device=self.device)
        lengths = self.lengths[index]
        longest = int(lengths.max())
        hidden = self.hidden[index, :longest]  # [rows, longest, hidden] (a copy)
        mask = (self.positions[:longest][None, :] < lengths[:, None]).long()  # [rows, longest]
        context = model.adapter.context(hidden, mask)
        context["attention_mask"] = mask
        hidden = model.run_layer(layer, hidden, context)
        self.tokens[0] += sum(self.row_length[slot] for slot in rows)
        self.tokens[1] += longest * len(rows)
        if self.on_call:
            self.on_call(layer + 1, len(rows))
        outcome = Outcome(layer, ran=len(rows))
        exit_now = model.exit_after.get(layer)
        if exit_now is None:
            self.hidden[index, :longest] = hidden
            outcome.next = rows
            return outcome
        head = model.heads[exit_now]
        pooled = head.pool(hidden, mask)  # [rows, hidden]
        logits = head.classify(pooled)  # [rows, labels]
        if exit_now == model.num_exits - 1:
            stop = [True] * len(rows)
        else:
            state = self.states.read(rows, index)
            stop = decide_at_exit(self.rule, exit_now, model.num_exits, logits, pooled, state).tolist()  # [rows]
            self.states.write(rows, index, state)
        keep = torch.tensor([not s for s in stop], device=self.device)
        if any(stop):
            stopped = [slot for slot, s in zip(rows, stop) if s]
            rows_logits = logits[~keep].float().cpu()
            exit_layer = int(model.exit_layers[exit_now])
            outcome.finished = [(slot, RowOutput(rows_logits[j], exit_now, exit_layer))
                                for j, slot in enumerate(stopped)]
            if self.on_exit:
                self.on_exit(exit_layer, len(stopped))
        if not all(stop):
            self.hidden[index[keep], :longest] = hidden[keep]
            outcome.next = [slot for slot, s in zip(rows, stop) if not s]
        return outcome

    def release(self, slot: int) -> None:
        """A dropped row: nothing to undo (its buffers are overwritten at the slot's next admission)."""

    def choose(self, queue: list[int], count: int) -> list[int]:
        """``count`` rows of ``queue`` (oldest first): the oldest and the rows closest to it in length."""
        lengths = [self.row_length[slot] for slot in queue]
        order = sorted(range(len(queue)), key=lambda i: (lengths[i], i))
        where = order.index(0)  # the oldest row is always in the call
        sums = [0]
        for i in order:
            sums.append(sums[-1] + lengths[i])

        def waste(first: int) -> int:  # padded tokens of the block order[first:first + count]
            return count * lengths[order[first + count - 1]] - (sums[first + count] - sums[first])

        first = min(range(max(0, where - count + 1), min(where, len(queue) - count) + 1), key=waste)
        chosen = set(order[first:first + count])
        return [slot for i, slot in enumerate(queue) if i in chosen]
