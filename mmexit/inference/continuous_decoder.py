"""Layer-level continuous caption decoding: every row advances on its own, rows of different steps share calls.

Step-synchronous decoding (``search.greedy_decode`` over ``CachedStepper``) runs one token step for
all rows at once: a step ends when its deepest row does, so at batch 16 the layers that early rows
skip save little wall-clock time. Here each image being captioned owns a *slot* of a pool
(``SlotCache``: its cross-attention K/V or image prefix, and its caption's K/V), and its current
token waits in the queue of the decoder layer it runs next. Each call runs ONE layer for every
token waiting at that layer, whatever caption position each is at (``adapter.step_rows``: K/V
written at each row's own cache position, attention over each row's positions 0..own position,
position embeddings / RoPE at each row's own position). After a layer with an exit the rule is
asked about those tokens (``rule.start`` once per token; the state rows travel with their tokens,
as ``ActiveRows`` subsets them). A token that stops takes the greedy argmax of its exit's logits
as the row's next token, the layers it skipped get K/V by state propagation (the K/V projection
of each skipped layer applied to the exit's hidden state, at the token's own position; the
``propagate`` policy, the only one supported), and the row re-enters the layer-0 queue at its next
position. Propagation is lazy and folded into the layer calls: a stopped token waits in the
``pending`` list of every layer it skipped; the first call of that layer that runs a token of the
same row (the only reader of those K/V) projects the K/V of every token pending there together
with its own rows' (one K/V projection, no separate call: ``SlotCache.fold``) before its attention
reads any of them; a row that finished drops what it still had pending (nothing reads its cache
again; its slot may be refilled first). An adapter whose ``step_rows`` does not take folded rows
(no ``step_rows.takes_folded``) gets them projected by ``project_kv`` just before the call instead.
A row finishes at EOS or after ``max_len`` tokens, exactly as ``greedy_decode`` decides; its slot
is freed and a waiting image takes it.

Each row's tokens and layers per token are those of ``greedy_decode`` on the image alone (batch 1,
``policy="propagate"``) up to float noise: a row only ever reads its own cache rows, and its tokens
run in order (token t+1 enters layer 0 after token t stopped; token t's K/V at a layer it skipped
are written by the first call of that layer after it stopped, before token t+1 can read them). The
full model (``rule=None``) runs every layer for every token; rows at different steps still share
calls.

Scheduler: before every call, ``LayerScheduler`` (``mmexit.inference.layer_scheduler``) picks the
layer whose queue runs: an age bound first, then a score of waiting tokens weighted by depth plus
the tokens they would join one layer deeper. Images waiting for a slot count in the layer-0 queue
when slots are free: they take the slots (``SlotCache.admit``: constants, or the LLaMA prefix's
prefill) just before a layer-0 call, so new rows join the rows re-entering layer 0 in one call.

What the scheduler can win is bounded: a row's tokens run one after another, so every token of
depth d needs d calls at layers 0..d-1 in order after its row's previous token; with 16 rows some
row usually needs the last layer, and a call order that serves every row cannot be much shorter
than step-synchronous sweeps when every caption has the same length. The gain is largest when
captions differ in length (a finished row's slot is refilled at once instead of the batch running
on for its longest caption) and when tokens' depths are far apart (a short token's row can run its
next token while a deep one is still going down).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, RuleState, check_state, subset_state
from mmexit.inference.exit_loop import decide_at_exit
from mmexit.models.kv_cache import DecoderCache, RowsPlan, SlotCache
from mmexit.inference.layer_scheduler import LayerScheduler, SchedulerSettings
from mmexit.inference.search import DecodeResult, _exit_positions

POLICIES = ("propagate",)


@dataclass
class Cohort:
    """Tokens waiting at one layer that ran their previous layer together.

    slot_ids: their slots (cache rows); positions: their cache positions (host lists); hidden
    [n, width]: their hidden states, or None at layer 0 (``tokens``: the token ids, embedded by the
    layer-0 call for all its rows at once); state: the rule's state rows ({key: [n, ...]}); entered:
    the call count when they joined the queue; plan: the cache's ``RowsPlan`` of these rows (index
    tensors, mask), built at their first call and kept while the cohort goes on whole.
    """

    slot_ids: list[int]
    positions: list[int]
    hidden: Optional[Tensor]
    state: RuleState
    entered: int
    plan: Optional[RowsPlan] = None
    tokens: Optional[list[int]] = None

    @property
    def size(self) -> int:
        return len(self.slot_ids)


def split_cohort(cohort: Cohort, count: int) -> tuple[Cohort, Cohort]:
    """The first ``count`` tokens of a cohort and the rest (both keep its ``entered``; plans subset)."""
    parts = []
    for rows in (range(0, count), range(count, cohort.size)):
        hidden = cohort.hidden
        device = hidden.device if hidden is not None else cohort.plan.rows.device if cohort.plan is not None else None
        index = torch.tensor(list(rows), dtype=torch.long, device=device)
        state = {key: value.index_select(0, index.to(value.device)) for key, value in cohort.state.items()}
        parts.append(Cohort(
            [cohort.slot_ids[j] for j in rows], [cohort.positions[j] for j in rows],
            None if hidden is None else hidden.index_select(0, index), state, cohort.entered,
            plan=cohort.plan.subset(index) if cohort.plan is not None else None,
            tokens=None if cohort.tokens is None else [cohort.tokens[j] for j in rows]))
    return parts[0], parts[1]


def merge_cohorts(cohorts: list[Cohort]) -> Cohort:
    """One cohort of every token of ``cohorts`` (in order); entered: the oldest's."""
    if len(cohorts) == 1:
        return cohorts[0]
    keys = cohorts[0].state.keys()
    if cohorts[0].hidden is None:  # layer 0: token ids, embedded by the call
        hidden, tokens = None, [token for c in cohorts for token in c.tokens]
    else:
        hidden, tokens = torch.cat([c.hidden for c in cohorts]), None
    return Cohort([s for c in cohorts for s in c.slot_ids], [p for c in cohorts for p in c.positions], hidden,
                  {key: torch.cat([c.state[key] for c in cohorts]) for key in keys},
                  min(c.entered for c in cohorts), tokens=tokens)


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


class ContinuousDecoder:
    """Greedy captions with per-token early exit, every row at its own step, over a pool of slots.

    model: a ``Captioner`` (GPT-2 or LLaMA decoder); rule: an exit rule, or None for the full model;
    slots: rows decoded at once; policy: the K/V policy of skipped layers (``propagate`` only);
    scheduler: the ``LayerScheduler``'s settings (age bound, score weights, ``max_call``: the most
    tokens a layer call takes; slots > max_call gives a pool deeper than a call); keep_logits: keep each
    token's exit logits in its ``Caption`` (tests).

    ``submit(features)`` queues images (any time, also between ``step`` calls); ``step()`` makes one
    scheduling decision and runs one layer call; ``run()`` steps until every submitted image is
    captioned and returns ``captions`` ({image id: Caption}).

    The work of a call around the layer's maths is kept small: slots, positions and the tokens
    entering layer 0 live on the host (the layer-0 call embeds its tokens at once); a cohort's index
    tensors and attention mask (``SlotCache.plan_rows``) are built once and reused while it runs
    layer after layer whole; the rule's stop mask is read once per exit (``tolist``) and rows are
    split with ``index_select``; state propagation is folded into later calls (module doc); the
    constants and prefix K/V of waiting images are computed for up to ``slots`` images at once
    (``staged``), not per admission.
    """

    def __init__(self, model, rule: Optional[ExitRule], max_len: int, slots: int = 16, bos_id: int = 1,
                 eos_id: int = 2, policy: str = "propagate", scheduler: SchedulerSettings = SchedulerSettings(),
                 keep_logits: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"the continuous decoder supports policy 'propagate' only (per-row K/V by state "
                             f"propagation); got {policy!r}: use greedy_decode for 'deferred' and 'oracle'")
        if slots < 1 or max_len < 1:
            raise ValueError(f"slots and max_len must be >= 1, got slots={slots}, max_len={max_len}")
        self.model, self.rule, self.adapter = model, rule, model.adapter
        self.max_len, self.num_slots = int(max_len), int(slots)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.num_layers = model.num_layers
        self.scheduler = LayerScheduler(self.num_layers, scheduler)
        self.max_call = self.num_slots if scheduler.max_call is None else min(int(scheduler.max_call), self.num_slots)
        self.exit_of_layer = {layer: index for index, layer in enumerate(model.exits)}
        self.needs_logits = rule is None or rule.needs_logits
        self.keep_logits = keep_logits
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cache: Optional[SlotCache] = None  # built at the first submit (prefix length of the features)
        self.feature_shape: tuple[int, ...] = ()  # [patches, width] of every image
        self.queues: list[list[Cohort]] = [[] for _ in range(self.num_layers)]
        self.queued = [0] * self.num_layers  # tokens waiting in each queue
        self.waiting: deque[tuple[int, Tensor]] = deque()  # (image id, features [patches, width])
        # constants + prefix K/V of the first waiting images (``SlotCache.stage``), the row of
        # the first waiting image in it, and how many waiting images it still holds
        self.staged: Optional[DecoderCache] = None
        self.staged_row = self.staged_left = 0
        self.free: list[int] = list(range(self.num_slots - 1, -1, -1))
        self.owner: list[Optional[int]] = [None] * self.num_slots  # image id per slot
        self.position: list[int] = [0] * self.num_slots  # cache position of each slot's current token
        self.captions: dict[int, Caption] = {}  # every admitted image's caption so far
        # per layer: stopped tokens that skipped it and have no K/V there yet, (slot ids, cache
        # positions, exit hidden [n, width]) per group of tokens (one group is pending at each layer
        # it skipped); the layer's first call that reads some of them projects them all
        self.pending: list[list[tuple[list[int], list[int], Tensor]]] = [[] for _ in range(self.num_layers)]
        self.pending_slots: list[set[int]] = [set() for _ in range(self.num_layers)]  # slots in each list
        self.next_id = 0
        self.calls = 0  # decoder-layer calls for caption tokens so far (an image prefix's prefill not counted)
        self.row_layers = 0  # token x layer computations so far (the rows of every call)

    # ------------------------------------------------------------------ the public API
    @torch.inference_mode()
    def submit(self, features: Tensor) -> list[int]:
        """Queue images, features [n, patches, width] (``model.encode``); returns their image ids."""
        if features.dim() != 3:
            raise ValueError(f"features must be [images, patches, width], got shape {tuple(features.shape)}")
        if self.cache is None:
            prefix = self.adapter.prefix_length(features)
            self.cache = SlotCache(self.adapter, self.num_slots, prefix, self.max_len, self.dtype, self.device)
            self.feature_shape = tuple(features.shape[1:])
        elif tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"features of shape {tuple(features.shape[1:])} per image; this decoder's images have "
                             f"{self.feature_shape} (every image must have the same patches)")
        ids = list(range(self.next_id, self.next_id + features.shape[0]))
        self.next_id += len(ids)
        for image, row in zip(ids, features):
            self.waiting.append((image, row))
        return ids

    @property
    def busy(self) -> bool:
        """True while an image waits or a token is in flight."""
        return bool(self.waiting) or any(self.queues)

    @property
    def unpropagated(self) -> list[tuple[list[int], list[int], Tensor]]:
        """Groups of stopped tokens with K/V still to propagate at some layer (each group once)."""
        return list({id(group): group for pending in self.pending for group in pending}.values())

    @property
    def in_flight(self) -> int:
        """Slots taken."""
        return self.num_slots - len(self.free)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling decision and one layer call; False when there was nothing to do."""
        return self._step()

    @torch.inference_mode()
    def run(self) -> dict[int, Caption]:
        """Step until every submitted image is captioned; {image id: Caption}."""
        while self._step():
            pass
        return self.captions

    def _step(self) -> bool:
        index = self._pick()
        if index is None:
            return False
        if index == 0:
            self._admit(min(len(self.free), len(self.waiting), max(0, self.max_call - self.queued[0])))
        queue = self.queues[index]
        cohort = merge_cohorts(queue)
        queue.clear()
        self.queued[index] = 0
        if cohort.size > self.max_call:  # the oldest max_call tokens run; the others wait at the front
            cohort, rest = split_cohort(cohort, self.max_call)
            queue.append(rest)
            self.queued[index] = rest.size
        self._run_layer(index, cohort)
        return True

    # ---------------------------------------------------------------------- scheduler
    def _pick(self) -> Optional[int]:
        """The layer to run next (``LayerScheduler.pick``), or None when nothing waits."""
        return self.scheduler.pick(self.queues, self.queued, min(len(self.free), len(self.waiting)), self.calls)

    def _admit(self, count: int) -> None:
        """``count`` waiting images take free slots; their BOS tokens join the layer-0 queue."""
        if count == 0:
            return
        slot_ids = [self.free.pop() for _ in range(count)]
        offset = self.cache.offset
        done = 0
        while done < count:  # the staged images are the first waiting ones (the queue is FIFO)
            if self.staged_left == 0:  # the next waiting images (up to ``slots``) in one batch
                ahead = min(self.num_slots, len(self.waiting))
                features = torch.stack([row for _, row in islice(self.waiting, ahead)]).to(self.device, self.dtype)
                self.staged, self.staged_row, self.staged_left = self.cache.stage(self.adapter, features), 0, ahead
            take = min(count - done, self.staged_left)
            taken = slot_ids[done:done + take]
            self.cache.admit_staged(torch.tensor(taken, dtype=torch.long, device=self.device), self.staged,
                                    self.staged_row)
            for slot in taken:
                image, _ = self.waiting.popleft()
                self.owner[slot], self.position[slot] = image, offset
                self.captions[image] = Caption(slot=slot)
            self.staged_row += take
            self.staged_left -= take
            done += take
        if self.staged_left == 0:
            self.staged = None
        self._enqueue(0, Cohort(slot_ids, [offset] * count, None, self._start_state(count), self.calls,
                                tokens=[self.bos_id] * count))

    def _start_state(self, count: int) -> RuleState:
        if self.rule is None:
            return {}
        state = self.rule.start(count, self.device)
        check_state(self.rule, state, count)
        return state

    def _enqueue(self, index: int, cohort: Cohort) -> None:
        cohort.entered = self.calls
        self.queues[index].append(cohort)
        self.queued[index] += cohort.size

    # ---------------------------------------------------------------------- one call
    def _run_layer(self, index: int, cohort: Cohort) -> None:
        """Layer ``index`` (0-based) for every token of ``cohort``, each at its own position; then the exit."""
        pending = self.pending[index]
        if pending and not self.pending_slots[index].isdisjoint(cohort.slot_ids):
            # K/V of tokens that skipped this layer, some of which this call reads: projected in it
            self.pending[index] = []
            self.pending_slots[index] = set()
            exit_hidden = pending[0][2] if len(pending) == 1 else torch.cat([group[2] for group in pending])
            self.cache.fold(index, [slot for group in pending for slot in group[0]],
                            [position for group in pending for position in group[1]], exit_hidden)
            if not getattr(self.adapter.step_rows, "takes_folded", False):  # projected before the call instead
                self.cache.propagate_folded(self.adapter)
        plan = cohort.plan
        if plan is None:
            plan = cohort.plan = self.cache.plan_rows(cohort.slot_ids, cohort.positions)
        else:
            self.cache.plan = plan
        hidden = cohort.hidden
        if hidden is None:  # layer 0: the embeddings of the tokens at their caption positions
            offset = self.cache.offset
            inputs = torch.tensor([cohort.tokens, [position - offset for position in cohort.positions]],
                                  dtype=torch.long, device=self.device)  # [2, n]
            hidden = self.model.embed(inputs[0], inputs[1])
        hidden = self.adapter.step_rows(index, hidden, self.cache, plan.rows, plan.positions, plan.length)
        if self.cache.folded is not None:
            raise RuntimeError("adapter.step_rows says it takes folded rows (takes_folded) but left them")
        self.calls += 1
        self.row_layers += cohort.size
        layer = index + 1
        model = self.model
        if layer == self.num_layers:
            self._stop(cohort.slot_ids, cohort.positions, hidden, model.exit_logits(model.num_exits - 1, hidden), layer)
            return
        if self.rule is None or layer not in self.exit_of_layer:
            cohort.hidden = hidden
            self._enqueue(layer, cohort)
            return
        exit_index = self.exit_of_layer[layer]
        logits = model.exit_logits(exit_index, hidden) if self.needs_logits else None
        stop = decide_at_exit(self.rule, exit_index, model.num_exits, logits, hidden, cohort.state).tolist()
        if not any(stop):
            cohort.hidden = hidden
            self._enqueue(layer, cohort)
            return
        if all(stop):
            self._stop(cohort.slot_ids, cohort.positions, hidden,
                       logits if logits is not None else model.exit_logits(exit_index, hidden), layer)
            return
        stopped = [j for j, s in enumerate(stop) if s]
        kept = [j for j, s in enumerate(stop) if not s]
        rows = torch.tensor(stopped, dtype=torch.long, device=self.device)
        stopped_hidden = hidden.index_select(0, rows)
        stopped_logits = (logits.index_select(0, rows) if logits is not None
                          else model.exit_logits(exit_index, stopped_hidden))
        self._stop([cohort.slot_ids[j] for j in stopped], [cohort.positions[j] for j in stopped], stopped_hidden,
                   stopped_logits, layer)
        rows = torch.tensor(kept, dtype=torch.long, device=self.device)
        self._enqueue(layer, Cohort([cohort.slot_ids[j] for j in kept], [cohort.positions[j] for j in kept],
                                    hidden.index_select(0, rows), subset_state(cohort.state, rows), self.calls,
                                    plan=plan.subset(rows)))

    def _stop(self, slot_ids: list[int], positions: list[int], hidden: Tensor, logits: Tensor, layer: int) -> None:
        """Tokens that stopped after ``layer`` (1-based): greedy next token; finished rows free their
        slots; the others queue K/V of their skipped layers and re-enter layer 0 at their next position.

        slot_ids, positions: the tokens' slots and cache positions; hidden [k, width] (the exit's
        hidden state); logits [k, vocab] of the exit.
        """
        next_tokens = logits.argmax(-1).tolist()  # [k]
        kept_logits = logits.float().cpu() if self.keep_logits else None
        going_on = []
        for j, (slot, token) in enumerate(zip(slot_ids, next_tokens)):
            caption = self.captions[self.owner[slot]]
            caption.tokens.append(token)
            caption.layers.append(layer)
            if kept_logits is not None:
                caption.logits.append(kept_logits[j])
            if token == self.eos_id or len(caption.tokens) == self.max_len:
                self._release(slot)
            else:
                going_on.append(j)
        if not going_on:
            return
        if len(going_on) < len(slot_ids):
            if layer < self.num_layers:  # the exit hidden states of the rows going on (state propagation)
                hidden = hidden.index_select(0, torch.tensor(going_on, dtype=torch.long, device=self.device))
            slot_ids = [slot_ids[j] for j in going_on]
            positions = [positions[j] for j in going_on]
            next_tokens = [next_tokens[j] for j in going_on]
        if layer < self.num_layers:  # 0-based layers layer..num_layers-1 were skipped
            group = (slot_ids, positions, hidden)
            for skipped in range(layer, self.num_layers):
                self.pending[skipped].append(group)
                self.pending_slots[skipped].update(slot_ids)
        after = [position + 1 for position in positions]
        for slot, position in zip(slot_ids, after):
            self.position[slot] = position
        self._enqueue(0, Cohort(slot_ids, after, None, self._start_state(len(slot_ids)), self.calls,
                                tokens=next_tokens))

    def _release(self, slot: int) -> None:
        """A finished row frees its slot; K/V it still had to propagate are dropped (never read)."""
        self.captions[self.owner[slot]].done = True
        self.owner[slot] = None
        self.free.append(slot)
        replaced: dict[int, Optional[tuple]] = {}  # a group pending at several layers is subset once
        for layer, pending in enumerate(self.pending):
            if slot not in self.pending_slots[layer]:
                continue
            self.pending_slots[layer].discard(slot)
            kept = []
            for group in pending:
                if slot in group[0]:
                    if id(group) not in replaced:
                        keep = [j for j, other in enumerate(group[0]) if other != slot]
                        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
                        replaced[id(group)] = ([group[0][j] for j in keep], [group[1][j] for j in keep],
                                               group[2].index_select(0, rows)) if keep else None
                    group = replaced[id(group)]
                if group is not None:
                    kept.append(group)
            self.pending[layer] = kept


def captions_to_result(model, captions: list[Caption]) -> DecodeResult:
    """``DecodeResult`` of captions in input order (``step_layers`` stays empty: there are no steps)."""
    layers = torch.tensor([layer for caption in captions for layer in caption.layers], dtype=torch.long)
    return DecodeResult([c.tokens for c in captions], layers, _exit_positions(model, layers),
                        [c.layers for c in captions])


def continuous_greedy_decode(model, features: Tensor, rule: Optional[ExitRule] = None, max_len: int = 20,
                             bos_id: int = 1, eos_id: int = 2, policy: str = "propagate", slots: int = 16,
                             scheduler: SchedulerSettings = SchedulerSettings()) -> DecodeResult:
    """Greedy captions for features [B, patches, width] by the continuous decoder (``slots`` rows at
    once; scheduler: its settings, see ``ContinuousDecoder``); the same return type as
    ``greedy_decode`` (``step_layers`` stays empty)."""
    decoder = ContinuousDecoder(model, rule, max_len, slots, bos_id, eos_id, policy, scheduler)
    ids = decoder.submit(features)
    captions = decoder.run()
    return captions_to_result(model, [captions[image] for image in ids])
