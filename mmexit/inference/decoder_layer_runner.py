"""One decoder layer on the caption tokens of some slots, each at its own position (``ContinuousCore``'s runner).

Each image being captioned owns a slot of ``SlotCache`` (its features, the cross-attention K/V of the
layers its tokens reached so far (computed when the first of them reaches a layer) or its image
prefix, and its caption's K/V); its current token is one row of the core's queues. A call runs ONE layer
for the tokens of ``rows``, whatever caption position each is at (``adapter.step_rows``: K/V written
at each row's own cache position, attention over each row's positions 0..own position, position
embeddings / RoPE at each row's own position). After a layer with an exit the rule is asked about
those tokens (``rule.start`` once per token; the state rows live per slot in ``SlotTensors``). A
token that stops takes the greedy argmax of its exit's logits as the row's next token, the layers
it skipped get K/V by state propagation (the K/V projection of each skipped layer applied to the
exit's hidden state, at the token's own position; the ``propagate`` policy), and the row re-enters
layer 0 at its next position (``Outcome.restart``). Propagation is lazy and folded into the layer
calls: a stopped token waits in the ``pending`` list of every layer it skipped; the first call of
that layer that runs a token of the same row (the only reader of those K/V) projects the K/V of
every token pending there together with its own rows' (``SlotCache.fold``) before its attention
reads any of them; a row that finished drops what it still had pending (nothing reads its cache
again; its slot may be refilled first). An adapter whose ``step_rows`` does not take folded rows
(no ``step_rows.takes_folded``) gets them projected by ``project_kv`` just before the call instead.
A row finishes at EOS or after ``max_len`` tokens, exactly as ``greedy_decode`` decides.

Each row's tokens and layers per token are those of ``greedy_decode`` on the image alone (batch 1,
``propagate``) up to float noise: a row only ever reads its own cache rows, and its tokens run in
order (token t+1 enters layer 0 after token t stopped; token t's K/V at a layer it skipped are
written by the first call of that layer after it stopped, before token t+1 can read them).

The work of a call around the layer's maths is kept small: slots, positions and the tokens entering
layer 0 live on the host (the layer-0 call embeds its tokens at once); the index tensors and mask
of a group of rows (``SlotCache.plan_rows``) are kept while the group runs layer after layer whole;
the stop mask is read once per exit (``tolist``); the prefix K/V of waiting images are computed for
up to ``slots`` images at once (``staged``), not per admission; a layer's cross-attention K/V are
computed for the rows of a call that reach it first (never for a layer no token of the image runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, check_state
from mmexit.inference.continuous_core import Upcoming
from mmexit.inference.exit_loop import decide_at_exit
from mmexit.inference.scheduler import Outcome
from mmexit.inference.slot_pool import SlotTensors
from mmexit.models.kv_cache import DecoderCache
from mmexit.models.slot_cache import RowsPlan, SlotCache

#: (slot ids, cache positions, exit hidden [n, width]) of stopped tokens with K/V still to propagate
Pending = tuple[list[int], list[int], Tensor]
#: the slot id of a pending token whose row finished since (its K/V are never read)
RELEASED = -1


@dataclass
class Caption:
    """One image's caption: tokens (EOS included when produced, BOS excluded), layers run per token,
    the slot it was decoded in, whether it is finished, and (``keep_logits``) the exit logits
    [vocab] (float32, CPU) each token was chosen from."""

    tokens: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    slot: int = -1
    done: bool = False
    logits: list[Tensor] = field(default_factory=list)


class DecoderLayerRunner:
    """Greedy caption tokens with per-token early exit over ``slots`` cache rows (module doc).

    model: a ``Captioner`` (GPT-2 or LLaMA decoder); rule: an exit rule, or None for the full model;
    items: image features [patches, width] (``model.encode``); results: ``Caption``; keep_logits:
    keep each token's exit logits in its ``Caption`` (tests).
    """

    def __init__(self, model, rule: Optional[ExitRule], max_len: int, slots: int, bos_id: int = 1,
                 eos_id: int = 2, keep_logits: bool = False) -> None:
        if slots < 1 or max_len < 1:
            raise ValueError(f"slots and max_len must be >= 1, got slots={slots}, max_len={max_len}")
        self.model, self.rule, self.adapter = model, rule, model.adapter
        self.max_len, self.num_slots = int(max_len), int(slots)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.num_layers = model.num_layers
        self.exit_of_layer = {layer: index for index, layer in enumerate(model.exits)}
        self.needs_logits = rule is None or rule.needs_logits
        self.keep_logits = keep_logits
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cache: Optional[SlotCache] = None  # built at the first accept (prefix length of the features)
        self.feature_shape: tuple[int, ...] = ()  # [patches, width] of every image
        # features + prefix K/V of the first waiting images (``SlotCache.stage``), the row of the
        # next image to admit in it, and how many waiting images it still holds
        self.staged: Optional[DecoderCache] = None
        self.staged_row = self.staged_left = 0
        self.position = [0] * self.num_slots  # cache position of each slot's current token
        self.token = [self.bos_id] * self.num_slots  # each slot's current token (embedded at layer 0)
        self.hidden: Optional[Tensor] = None  # [slots, width]: each slot's hidden state between layers
        # groups that went on whole -> (their slot index [n], hidden [n, width]) not yet written to
        # ``hidden``: the group's next call reads them as they are; any other call writes them all first
        self.carried: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
        self.states = SlotTensors(self.num_slots)  # the rule's state rows of each slot's current token
        self.captions: list[Optional[Caption]] = [None] * self.num_slots
        # per layer: groups of stopped tokens that skipped it and have no K/V there yet (one group is
        # pending at each layer it skipped); the layer's first call that reads some of them projects them all
        self.pending: list[list[Pending]] = [[] for _ in range(self.num_layers)]
        self.pending_slots: list[set[int]] = [set() for _ in range(self.num_layers)]  # slots in each list
        self.slot_groups: list[list[Pending]] = [[] for _ in range(self.num_slots)]  # groups holding each slot's row
        # a layer's list is cleared of groups whose rows all finished when it grows past this length
        self.compact_at = [4 * self.num_slots] * self.num_layers
        # rows of a group that went on whole -> (their positions, their plan), reused by its next call
        self.plans: dict[tuple[int, ...], tuple[tuple[int, ...], RowsPlan]] = {}

    @property
    def unpropagated(self) -> list[Pending]:
        """Groups of stopped tokens with K/V still to propagate at some layer (each group once)."""
        return list({id(group): group for pending in self.pending for group in pending if _live(group)}.values())

    # ------------------------------------------------------------------ admission
    def accept(self, items: Sequence[Tensor] | Tensor) -> list[Tensor]:
        """Images, features [n, patches, width]; builds the cache at the first ones."""
        features = items if isinstance(items, Tensor) else torch.stack(list(items))
        if features.dim() != 3:
            raise ValueError(f"features must be [images, patches, width], got shape {tuple(features.shape)}")
        if self.cache is None:
            prefix = self.adapter.prefix_length(features)
            self.cache = SlotCache(self.adapter, self.num_slots, prefix, self.max_len, self.dtype, self.device)
            self.feature_shape = tuple(features.shape[1:])
        elif tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"features of shape {tuple(features.shape[1:])} per image; this decoder's images have "
                             f"{self.feature_shape} (every image must have the same patches)")
        return list(features.unbind(0))

    def admit(self, slots: list[int], items: list[Tensor], upcoming: Upcoming) -> None:
        """Images ``items`` take ``slots``: features and prefix K/V (staged for up to ``slots`` waiting
        images at once), BOS at the first caption position, the rule's start state."""
        count, offset, done = len(slots), self.cache.offset, 0
        while done < count:  # the staged images are the first waiting ones (admission is FIFO)
            if self.staged_left == 0:  # the next waiting images (up to ``slots``) in one batch
                ahead = items[done:] + upcoming(max(0, self.num_slots - (count - done)))
                ahead = ahead[:self.num_slots]
                features = torch.stack(ahead).to(self.device, self.dtype)
                self.staged, self.staged_row, self.staged_left = self.cache.stage(self.adapter, features), 0, len(ahead)
            take = min(count - done, self.staged_left)
            taken = torch.tensor(slots[done:done + take], dtype=torch.long, device=self.device)
            self.cache.admit_staged(taken, self.staged, self.staged_row)
            self.staged_row += take
            self.staged_left -= take
            done += take
        if self.staged_left == 0:
            self.staged = None
        for slot in slots:
            self.position[slot], self.token[slot] = offset, self.bos_id
            self.captions[slot] = Caption(slot=slot)
        self._start(slots)

    def _start(self, slots: list[int]) -> None:
        """The rule's start state for the new tokens of ``slots``."""
        if self.rule is None:
            return
        state = self.rule.start(len(slots), self.device)
        check_state(self.rule, state, len(slots))
        self.states.write(slots, torch.tensor(slots, dtype=torch.long, device=self.device), state)

    # ------------------------------------------------------------------ one call
    def run(self, layer: int, rows: list[int]) -> Outcome:
        """Layer ``layer`` (0-based) for the current token of each slot of ``rows``; then the exit."""
        cache, model = self.cache, self.model
        positions = [self.position[slot] for slot in rows]
        self._fold_pending(layer, rows)
        plan = self._plan(rows, positions)
        if layer == 0:  # the embeddings of the tokens at their caption positions
            offset = cache.offset
            inputs = torch.tensor([[self.token[slot] for slot in rows], [position - offset for position in positions]],
                                  dtype=torch.long, device=self.device)  # [2, n]
            hidden = model.embed(inputs[0], inputs[1])
        else:
            hidden = self._hidden_of(rows, plan)
        cache.ensure_constants(self.adapter, layer, rows)  # cross-attention K/V of images new to this layer
        hidden = self.adapter.step_rows(layer, hidden, cache, plan.rows, plan.positions, plan.length)
        if cache.folded is not None:
            raise RuntimeError("adapter.step_rows says it takes folded rows (takes_folded) but left them")
        outcome = Outcome(layer, ran=len(rows))
        done = layer + 1  # layers run by these tokens
        if done == self.num_layers:
            self._stop(outcome, rows, positions, hidden, model.exit_logits(model.num_exits - 1, hidden), done)
            return outcome
        if self.rule is None or done not in self.exit_of_layer:
            self._go_on(outcome, rows, positions, plan, hidden)
            return outcome
        exit_index = self.exit_of_layer[done]
        logits = model.exit_logits(exit_index, hidden) if self.needs_logits else None
        state = self.states.read(rows, plan.rows)
        stop = decide_at_exit(self.rule, exit_index, model.num_exits, logits, hidden, state)
        self.states.write(rows, plan.rows, state)
        stop = stop.tolist()
        if not any(stop):
            self._go_on(outcome, rows, positions, plan, hidden)
            return outcome
        if all(stop):
            self._stop(outcome, rows, positions, hidden,
                       logits if logits is not None else model.exit_logits(exit_index, hidden), done)
            return outcome
        stopped = [j for j, s in enumerate(stop) if s]
        kept = [j for j, s in enumerate(stop) if not s]
        index = torch.tensor(stopped, dtype=torch.long, device=self.device)
        stopped_hidden = hidden.index_select(0, index)
        stopped_logits = (logits.index_select(0, index) if logits is not None
                          else model.exit_logits(exit_index, stopped_hidden))
        self._stop(outcome, [rows[j] for j in stopped], [positions[j] for j in stopped], stopped_hidden,
                   stopped_logits, done)
        index = torch.tensor(kept, dtype=torch.long, device=self.device)
        self._go_on(outcome, [rows[j] for j in kept], [positions[j] for j in kept], plan.subset(index),
                    hidden.index_select(0, index))
        return outcome

    def _fold_pending(self, layer: int, rows: list[int]) -> None:
        """K/V of tokens that skipped ``layer``, some of which this call reads: projected in it."""
        pending = self.pending[layer]
        if not pending or self.pending_slots[layer].isdisjoint(rows):
            return
        self.pending[layer] = []
        self.pending_slots[layer] = set()
        exit_hidden = pending[0][2] if len(pending) == 1 else torch.cat([group[2] for group in pending])
        slots = [slot for group in pending for slot in group[0]]
        positions = [position for group in pending for position in group[1]]
        if RELEASED in slots:  # tokens of rows that finished since they stopped (``release``): never read
            live = [j for j, slot in enumerate(slots) if slot != RELEASED]
            exit_hidden = exit_hidden.index_select(0, torch.tensor(live, dtype=torch.long, device=self.device))
            slots, positions = [slots[j] for j in live], [positions[j] for j in live]
        self.cache.fold(layer, slots, positions, exit_hidden)
        if not getattr(self.adapter.step_rows, "takes_folded", False):  # projected before the call instead
            self.cache.propagate_folded(self.adapter)

    def _plan(self, rows: list[int], positions: list[int]) -> RowsPlan:
        """The cache's plan of these rows: the one kept when they went on whole, else a new one."""
        kept = self.plans.pop(tuple(rows), None)
        if kept is not None and kept[0] == tuple(positions):
            self.cache.plan = kept[1]
            return kept[1]
        return self.cache.plan_rows(rows, positions)

    def _hidden_of(self, rows: list[int], plan: RowsPlan) -> Tensor:
        """The hidden states [n, width] of ``rows`` before their next layer: a group that went on whole
        hands its own on; otherwise every carried group is written into the slots (oldest first, so a
        slot's latest state wins) and the rows are read from there."""
        carried = self.carried.pop(tuple(rows), None)
        if carried is not None:
            return carried[1]
        for index, hidden in self.carried.values():
            if self.hidden is None:
                self.hidden = hidden.new_zeros(self.num_slots, hidden.shape[-1])
            self.hidden.index_copy_(0, index, hidden)
        self.carried.clear()
        return self.hidden.index_select(0, plan.rows)

    def _go_on(self, outcome: Outcome, rows: list[int], positions: list[int], plan: RowsPlan, hidden: Tensor) -> None:
        """Tokens that run the next layer: their hidden states [n, width] are carried to it (``_hidden_of``)."""
        self.carried[tuple(rows)] = (plan.rows, hidden)
        if len(self.plans) > 4 * self.num_layers:  # plans of groups that were merged or split since
            self.plans.clear()
        self.plans[tuple(rows)] = (tuple(positions), plan)
        outcome.next = rows

    def _stop(self, outcome: Outcome, rows: list[int], positions: list[int], hidden: Tensor, logits: Tensor,
              layer: int) -> None:
        """Tokens that stopped after ``layer`` (1-based): greedy next token; finished captions go to
        ``outcome.finished``; the other rows queue K/V of their skipped layers and re-enter layer 0 at
        their next position. hidden [k, width] (the exit's hidden state); logits [k, vocab]."""
        next_tokens = logits.argmax(-1).tolist()  # [k]
        kept_logits = logits.float().cpu() if self.keep_logits else None
        going_on = []
        for j, (slot, token) in enumerate(zip(rows, next_tokens)):
            caption = self.captions[slot]
            caption.tokens.append(token)
            caption.layers.append(layer)
            if kept_logits is not None:
                caption.logits.append(kept_logits[j])
            if token == self.eos_id or len(caption.tokens) == self.max_len:
                caption.done = True
                outcome.finished.append((slot, caption))
                self.release(slot)
            else:
                going_on.append(j)
        if not going_on:
            return
        if len(going_on) < len(rows):
            if layer < self.num_layers:  # the exit hidden states of the rows going on (state propagation)
                hidden = hidden.index_select(0, torch.tensor(going_on, dtype=torch.long, device=self.device))
            rows = [rows[j] for j in going_on]
            positions = [positions[j] for j in going_on]
            next_tokens = [next_tokens[j] for j in going_on]
        if layer < self.num_layers:  # 0-based layers layer..num_layers-1 were skipped
            group = (list(rows), positions, hidden)  # its own slot list: ``release`` marks finished rows in it
            for skipped in range(layer, self.num_layers):
                self.pending[skipped].append(group)
                self.pending_slots[skipped].update(rows)
                if len(self.pending[skipped]) > self.compact_at[skipped]:
                    self._compact(skipped)
            for slot in rows:
                self.slot_groups[slot].append(group)
        for slot, position, token in zip(rows, positions, next_tokens):
            self.position[slot], self.token[slot] = position + 1, token
        self._start(rows)
        outcome.restart = rows

    def release(self, slot: int) -> None:
        """A finished (or dropped) row: K/V it still had to propagate are dropped (never read). Its
        entry in each group it is pending in is marked ``RELEASED`` (a group is shared by every layer
        it skipped; ``_fold_pending`` leaves marked entries out, ``_compact`` drops dead groups)."""
        self.captions[slot] = None
        for group in self.slot_groups[slot]:
            slots = group[0]
            if slot in slots:
                slots[slots.index(slot)] = RELEASED
        self.slot_groups[slot] = []
        for pending_slots in self.pending_slots:
            pending_slots.discard(slot)

    def _compact(self, layer: int) -> None:
        """Drop the groups of ``layer`` whose rows all finished (a layer no row reaches is never folded)."""
        self.pending[layer] = [group for group in self.pending[layer] if _live(group)]
        self.compact_at[layer] = max(4 * self.num_slots, 2 * len(self.pending[layer]))


def _live(group: Pending) -> bool:
    """True while some token of the group belongs to a row still decoding."""
    return any(slot != RELEASED for slot in group[0])
