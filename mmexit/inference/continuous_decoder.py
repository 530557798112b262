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
as the row's next token, the layers it skipped get K/V by state propagation (``kv_cache.propagate``
with per-row positions; the ``propagate`` policy, the only one supported), and the row re-enters
the layer-0 queue at its next position. Propagation is batched: the K/V of stopped tokens are
written together just before a call would read some of them (its layer is one that a row of the
call skipped at an earlier position); a row that finished needs none (nothing reads its cache
again; its slot may be refilled first). A row finishes at EOS or after ``max_len`` tokens, exactly
as ``greedy_decode`` decides; its slot is freed and a waiting image takes it.

Each row's tokens and layers per token are those of ``greedy_decode`` on the image alone (batch 1,
``policy="propagate"``) up to float noise: a row only ever reads its own cache rows, and its tokens
run in order (token t+1 enters layer 0 after token t stopped and its K/V were propagated). The
full model (``rule=None``) runs every layer for every token; rows at different steps still share
calls.

Scheduler (before every call; deterministic, ages are counted in layer calls):
  1. age bound: a queue whose oldest token has waited more than ``max_wait`` calls (default: twice
     the decoder's layers) runs (the one waited on longest, the deeper one on ties): no token starves;
  2. else the queue with the highest score runs: its waiting tokens x (1 + ``depth_bias`` x
     layer / (layers - 1)), the deeper one on ties. ``depth_bias=0``: the fullest queue (a call
     serves the most tokens); a huge one: the deepest queue (every token in flight runs to its exit
     before layer 0 runs again: step-synchronous sweeps, with finished rows' slots refilled at once).
     The default 2.5 sits between: a full queue wins, deep tokens (whose rows wait longest) win ties
     of a few tokens. Images waiting for a slot count in the layer-0 queue when slots are free: they
     take the slots (``SlotCache.admit``: constants, or the LLaMA prefix's prefill) just before a
     layer-0 call, so new rows join the rows re-entering layer 0 in one call.

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
from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule, RuleState, check_state, subset_state
from mmexit.inference.exit_loop import decide_at_exit
from mmexit.inference.kv_cache import SlotCache, propagate
from mmexit.inference.search import DecodeResult, _exit_positions

POLICIES = ("propagate",)


@dataclass
class Cohort:
    """Tokens waiting at one layer that ran their previous layer together.

    slots [n] long (cache rows); slot_ids: the same on the host; hidden [n, width]: their hidden
    states; state: the rule's state rows ({key: [n, ...]}); entered: the call count when they joined
    the queue.
    """

    slots: Tensor
    slot_ids: list[int]
    hidden: Tensor
    state: RuleState
    entered: int

    @property
    def size(self) -> int:
        return len(self.slot_ids)


def merge_cohorts(cohorts: list[Cohort]) -> Cohort:
    """One cohort of every token of ``cohorts`` (in order); entered: the oldest's."""
    if len(cohorts) == 1:
        return cohorts[0]
    keys = cohorts[0].state.keys()
    return Cohort(torch.cat([c.slots for c in cohorts]), [s for c in cohorts for s in c.slot_ids],
                  torch.cat([c.hidden for c in cohorts]),
                  {key: torch.cat([c.state[key] for c in cohorts]) for key in keys},
                  min(c.entered for c in cohorts))


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
    slots: rows decoded at once; max_wait: the age bound of a queue in layer calls (None: twice the
    decoder's layers; a huge value: no bound); depth_bias: how much deeper queues are preferred
    (module doc);
    policy: the K/V policy of skipped layers (``propagate`` only); keep_logits: keep each token's exit
    logits in its ``Caption`` (tests).

    ``submit(features)`` queues images (any time, also between ``step`` calls); ``step()`` makes one
    scheduling decision and runs one layer call; ``run()`` steps until every submitted image is
    captioned and returns ``captions`` ({image id: Caption}).
    """

    def __init__(self, model, rule: Optional[ExitRule], max_len: int, slots: int = 16, bos_id: int = 1,
                 eos_id: int = 2, policy: str = "propagate", max_wait: Optional[int] = None,
                 depth_bias: float = 2.5, keep_logits: bool = False) -> None:
        if policy not in POLICIES:
            raise ValueError(f"the continuous decoder supports policy 'propagate' only (per-row K/V by state "
                             f"propagation); got {policy!r}: use greedy_decode for 'deferred' and 'oracle'")
        if slots < 1 or max_len < 1:
            raise ValueError(f"slots and max_len must be >= 1, got slots={slots}, max_len={max_len}")
        self.model, self.rule, self.adapter = model, rule, model.adapter
        self.max_len, self.num_slots = int(max_len), int(slots)
        self.bos_id, self.eos_id = int(bos_id), int(eos_id)
        self.num_layers = model.num_layers
        self.max_wait = 2 * self.num_layers if max_wait is None else int(max_wait)
        if self.max_wait < 0 or depth_bias < 0:
            raise ValueError(f"max_wait and depth_bias must be >= 0, got {max_wait}, {depth_bias}")
        # score weight of each layer's queue: 1 at layer 0, 1 + depth_bias at the last layer
        self.layer_weight = [1.0 + depth_bias * index / max(1, self.num_layers - 1) for index in range(self.num_layers)]
        self.exit_of_layer = {layer: index for index, layer in enumerate(model.exits)}
        self.needs_logits = rule is None or rule.needs_logits
        self.keep_logits = keep_logits
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.cache: Optional[SlotCache] = None  # built at the first submit (prefix length of the features)
        self.feature_shape: tuple[int, ...] = ()  # [patches, width] of every image
        self.queues: list[list[Cohort]] = [[] for _ in range(self.num_layers)]
        self.waiting: deque[tuple[int, Tensor]] = deque()  # (image id, features [patches, width])
        self.free: list[int] = list(range(self.num_slots - 1, -1, -1))
        self.owner: list[Optional[int]] = [None] * self.num_slots  # image id per slot
        self.position: list[int] = [0] * self.num_slots  # cache position of each slot's current token
        self.positions = torch.zeros(self.num_slots, dtype=torch.long, device=self.device)  # the same, on device
        self.captions: dict[int, Caption] = {}  # every admitted image's caption so far
        # stopped tokens whose skipped layers have no K/V yet: (slots [n], exit hidden [n, width],
        # exit layer number, cache positions [n], slot ids)
        self.unpropagated: list[tuple[Tensor, Tensor, int, Tensor, list[int]]] = []
        self.unpropagated_from: dict[int, int] = {}  # slot -> the first layer it has K/V to propagate for
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
    def in_flight(self) -> int:
        """Slots taken."""
        return self.num_slots - len(self.free)

    @torch.inference_mode()
    def step(self) -> bool:
        """One scheduling decision and one layer call; False when there was nothing to do."""
        index = self._pick()
        if index is None:
            return False
        if index == 0:
            self._admit(min(len(self.free), len(self.waiting)))
        queue = self.queues[index]
        cohort = merge_cohorts(queue)
        queue.clear()
        self._run_layer(index, cohort)
        return True

    def run(self) -> dict[int, Caption]:
        """Step until every submitted image is captioned; {image id: Caption}."""
        while self.step():
            pass
        return self.captions

    # ---------------------------------------------------------------------- scheduler
    def _pick(self) -> Optional[int]:
        """The layer to run next (see the module doc), or None when nothing waits."""
        admissible = min(len(self.free), len(self.waiting))
        best, best_key = None, None
        for index, queue in enumerate(self.queues):
            size = sum(cohort.size for cohort in queue) + (admissible if index == 0 else 0)
            if size == 0:
                continue
            waited = self.calls - min(c.entered for c in queue) if queue else 0
            late = waited > self.max_wait
            key = (late, waited if late else size * self.layer_weight[index], index)
            if best_key is None or key > best_key:
                best, best_key = index, key
        return best

    def _admit(self, count: int) -> None:
        """``count`` waiting images take free slots; their BOS tokens join the layer-0 queue."""
        if count == 0:
            return
        taken = [self.waiting.popleft() for _ in range(count)]
        slot_ids = [self.free.pop() for _ in taken]
        slots = torch.tensor(slot_ids, device=self.device)
        features = torch.stack([row for _, row in taken]).to(self.device, self.dtype)
        self.cache.admit(self.adapter, slots, features)
        offset = self.cache.offset
        for slot, (image, _) in zip(slot_ids, taken):
            self.owner[slot], self.position[slot] = image, offset
            self.captions[image] = Caption(slot=slot)
        self.positions[slots] = offset
        bos = torch.full((count,), self.bos_id, dtype=torch.long, device=self.device)
        hidden = self.model.embed(bos, torch.zeros(count, dtype=torch.long, device=self.device))
        self._enqueue(0, slots, slot_ids, hidden, self._start_state(count))

    def _start_state(self, count: int) -> RuleState:
        if self.rule is None:
            return {}
        state = self.rule.start(count, self.device)
        check_state(self.rule, state, count)
        return state

    def _enqueue(self, index: int, slots: Tensor, slot_ids: list[int], hidden: Tensor, state: RuleState) -> None:
        self.queues[index].append(Cohort(slots, slot_ids, hidden, state, self.calls))

    # ---------------------------------------------------------------------- one call
    def _run_layer(self, index: int, cohort: Cohort) -> None:
        """Layer ``index`` (0-based) for every token of ``cohort``, each at its own position; then the exit."""
        if self.unpropagated and any(self.unpropagated_from.get(slot, self.num_layers) <= index
                                     for slot in cohort.slot_ids):
            self._propagate()
        length = max(self.position[slot] for slot in cohort.slot_ids) + 1
        hidden = self.adapter.step_rows(index, cohort.hidden, self.cache, cohort.slots,
                                        self.positions[cohort.slots], length)
        self.calls += 1
        self.row_layers += cohort.size
        layer = index + 1
        model = self.model
        if layer == self.num_layers:
            self._stop(cohort.slots, cohort.slot_ids, hidden, model.exit_logits(model.num_exits - 1, hidden), layer)
            return
        if self.rule is None or layer not in self.exit_of_layer:
            self._enqueue(layer, cohort.slots, cohort.slot_ids, hidden, cohort.state)
            return
        stop, logits = self._ask(self.exit_of_layer[layer], hidden, cohort.state)
        if stop is None:
            self._enqueue(layer, cohort.slots, cohort.slot_ids, hidden, cohort.state)
            return
        stop_list = stop.tolist()
        stopped_ids = [slot for slot, s in zip(cohort.slot_ids, stop_list) if s]
        self._stop(cohort.slots[stop], stopped_ids, hidden[stop], logits, layer)
        keep = ~stop
        kept_ids = [slot for slot, s in zip(cohort.slot_ids, stop_list) if not s]
        if kept_ids:
            self._enqueue(layer, cohort.slots[keep], kept_ids, hidden[keep], subset_state(cohort.state, keep))

    def _ask(self, exit_index: int, hidden: Tensor, state: RuleState) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Ask the rule at internal exit ``exit_index`` (as ``ActiveRows.ask``); hidden [n, width].

        Returns (stop [n] bool, logits [stopped, vocab] of the rows that stop), or (None, None) when
        no row stops. ``state`` is updated in place by the rule.
        """
        model = self.model
        logits = model.exit_logits(exit_index, hidden) if self.needs_logits else None
        stop = decide_at_exit(self.rule, exit_index, model.num_exits, logits, hidden, state)
        if not bool(stop.any()):
            return None, None
        return stop, logits[stop] if logits is not None else model.exit_logits(exit_index, hidden[stop])

    def _stop(self, slots: Tensor, slot_ids: list[int], hidden: Tensor, logits: Tensor, layer: int) -> None:
        """Tokens that stopped after ``layer`` (1-based): greedy next token; finished rows free their
        slots; the others queue K/V of their skipped layers and re-enter layer 0 at their next position.

        slots [k]; hidden [k, width] (the exit's hidden state); logits [k, vocab] of the exit.
        """
        next_tokens = logits.argmax(-1)  # [k]
        kept_logits = logits.float().cpu() if self.keep_logits else None
        going_on = []
        for j, (slot, token) in enumerate(zip(slot_ids, next_tokens.tolist())):
            caption = self.captions[self.owner[slot]]
            caption.tokens.append(token)
            caption.layers.append(layer)
            if kept_logits is not None:
                caption.logits.append(kept_logits[j])
            if token == self.eos_id or len(caption.tokens) == self.max_len:
                self._release(slot)
            else:
                self.position[slot] += 1
                going_on.append(j)
        if not going_on:
            return
        rows = torch.tensor(going_on, device=self.device) if len(going_on) < len(slot_ids) else None
        slots = slots if rows is None else slots[rows]
        tokens = next_tokens if rows is None else next_tokens[rows]
        going_ids = [slot_ids[j] for j in going_on]
        if layer < self.num_layers:  # 0-based layers layer..num_layers-1 were skipped
            self.unpropagated.append((slots, hidden if rows is None else hidden[rows], layer,
                                      self.positions[slots], going_ids))
            for slot in going_ids:
                self.unpropagated_from[slot] = min(layer, self.unpropagated_from.get(slot, layer))
        self.positions[slots] += 1
        hidden = self.model.embed(tokens, self.positions[slots] - self.cache.offset)
        self._enqueue(0, slots, going_ids, hidden, self._start_state(len(going_on)))

    def _propagate(self) -> None:
        """Write the K/V of every stopped token's skipped layers (state propagation), in one batch per layer."""
        propagate(self.adapter, self.cache, [entry[:4] for entry in self.unpropagated])
        self.unpropagated.clear()
        self.unpropagated_from.clear()

    def _release(self, slot: int) -> None:
        """A finished row frees its slot; K/V it still had to propagate are dropped (never read)."""
        self.captions[self.owner[slot]].done = True
        self.owner[slot] = None
        self.free.append(slot)
        if self.unpropagated_from.pop(slot, None) is None:
            return
        for number, (slots, hidden, layer, positions, slot_ids) in enumerate(self.unpropagated):
            if slot in slot_ids:
                keep = [j for j, other in enumerate(slot_ids) if other != slot]
                rows = torch.tensor(keep, dtype=torch.long, device=self.device)
                self.unpropagated[number] = (slots[rows], hidden[rows], layer, positions[rows],
                                             [slot_ids[j] for j in keep])
        self.unpropagated = [entry for entry in self.unpropagated if entry[4]]


def captions_to_result(model, captions: list[Caption]) -> DecodeResult:
    """``DecodeResult`` of captions in input order (``step_layers`` stays empty: there are no steps)."""
    layers = torch.tensor([layer for caption in captions for layer in caption.layers], dtype=torch.long)
    return DecodeResult([c.tokens for c in captions], layers, _exit_positions(model, layers),
                        [c.layers for c in captions])


def continuous_greedy_decode(model, features: Tensor, rule: Optional[ExitRule] = None, max_len: int = 20,
                             bos_id: int = 1, eos_id: int = 2, policy: str = "propagate", slots: int = 16,
                             max_wait: Optional[int] = None, depth_bias: float = 2.5) -> DecodeResult:
    """Greedy captions for features [B, patches, width] by the continuous decoder (``slots`` rows at
    once; max_wait, depth_bias: the scheduler's, see ``ContinuousDecoder``); the same return type as
    ``greedy_decode`` (``step_layers`` stays empty)."""
    decoder = ContinuousDecoder(model, rule, max_len, slots, bos_id, eos_id, policy, max_wait, depth_bias)
    ids = decoder.submit(features)
    captions = decoder.run()
    return captions_to_result(model, [captions[image] for image in ids])
