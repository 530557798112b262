"""One decoding step with per-row early exit, over a KV cache mmexit manages (any decoder adapter).

At every step each row (a sequence, or one beam of one) runs decoder layers until its exit rule
fires (``ActiveRows``, the one exit loop). Rows that stopped are gathered out before the next
layer runs; the survivors' cache rows are read with an index. The rule sees the rows still
active (``ExitRule.start`` once per token). The last exit always stops.

Layers a row skipped have no key/value entry for that position, which later tokens attend to.
Policies (``policy``; their names: ``mmexit.models.kv_cache.KV_POLICIES``):
- ``propagate`` (default, CALM's state propagation): for every skipped layer, K/V at this
  position are computed from the exit's hidden state with that layer's own norm and K/V
  projection (no attention, no MLP). This cost is not counted in the layer speed-up (about 2/16
  of a GPT-2 layer); the wall-clock efficiency shows it.
- ``deferred`` (FREE-style deferred compute): a row that exits at layer k keeps the position's
  hidden state; when a later token of that row runs layer j, every position still waiting at
  layer j runs it *together with* that token (one causal chunk), which writes their true K/V.
  The cache is therefore exact (the K/V the full model would have), so the tokens equal those of
  ``oracle``; the catch-up work is real and counted (``catchup_layers``).
- ``oracle``: every row runs every layer (true K/V everywhere), the rule is applied to the
  exits afterwards and the token comes from the exit where it fired. Costs are *simulated*.

The full-model path (``rule=None``) evaluates no internal exit head and reads the cache with
plain slices.

Positions: ``step(tokens, t)`` takes the caption position t (embeddings); the adapter is called
with the cache position ``cache.offset + t`` (after an image prefix, for prefix decoders).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mmexit.exits.base import ExitRule
from mmexit.inference.exit_loop import ActiveRows
from mmexit.models.kv_cache import DEFERRED, KV_POLICIES, ORACLE, PROPAGATE, DecoderCache, propagate


class CachedStepper:
    """Advances every row of its cache by one token with per-row early exit.

    model: a multi-exit decoder model (``Captioner``) exposing ``adapter``, ``exits`` (1-based exit
    layers), ``num_layers``, ``num_exits``, ``embed`` and ``exit_logits``.
    """

    def __init__(self, model, features: Tensor, rule: Optional[ExitRule], max_len: int,
                 policy: str = PROPAGATE) -> None:
        if policy not in KV_POLICIES:
            raise ValueError(f"policy must be one of {tuple(KV_POLICIES)}, got {policy!r}")
        self.model, self.rule, self.policy = model, rule, policy
        self.adapter = model.adapter
        self.cache = DecoderCache(self.adapter, features, max_len, deferred=policy == DEFERRED)
        self.exit_of_layer = {layer: index for index, layer in enumerate(model.exits)}
        self.layer_of_exit = torch.tensor(model.exits, device=features.device)
        self.catchup_layers = 0  # deferred: positions x layers caught up so far
        self.needs_logits = rule is None or rule.needs_logits
        self._maybe_waiting = False  # deferred: some position may still wait for deeper layers

    def select(self, index: Tensor) -> None:
        """Keep / reorder cache rows (finished sequences leave, beams are reordered)."""
        self.cache.select(index)

    def _deferred_depth(self, t: int) -> Optional[Tensor]:
        """[R, t] depth of earlier caption positions when some still wait for deeper layers, else None."""
        if self.policy != DEFERRED or not self._maybe_waiting or t == 0:
            return None
        offset = self.cache.offset
        depth = self.cache.depth[:, offset:offset + t].clone()
        self._maybe_waiting = bool((depth < self.model.num_layers).any())
        return depth if self._maybe_waiting else None

    def step(self, tokens: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """tokens [R] at position t -> (logits [R, vocab] of each row's exit, layers run [R] long)."""
        model, rule, adapter = self.model, self.rule, self.adapter
        num_layers = model.num_layers
        total, device = tokens.shape[0], tokens.device
        hidden = model.embed(tokens, torch.tensor(t, device=device))  # [R, width]
        position = self.cache.offset + t  # cache position of this token
        oracle = self.policy == ORACLE
        active = ActiveRows(rule, total, model.num_exits, device, keep_all=oracle)
        rows: Optional[Tensor] = None  # cache rows of `hidden`'s rows (None: all, in order)
        exited: list[tuple[Tensor, Tensor, int]] = []
        depth = self._deferred_depth(t)
        for index in range(num_layers):
            waiting = None
            if depth is not None:
                # rows still running have run layers 0..index-1 in this step: every position that
                # started this step at depth <= index is now waiting at layer `index`
                waiting = (depth if rows is None else depth[rows]) <= index  # [r, t]
                waiting = waiting if bool(waiting.any()) else None
            if waiting is None:
                hidden = adapter.step(index, hidden, self.cache, rows, position)
            else:
                row_ids = torch.arange(total, device=device) if rows is None else rows
                hidden, caught_up = adapter.chunk(index, hidden, self.cache, row_ids, position, waiting)
                self.catchup_layers += caught_up
            layer = index + 1
            if layer == num_layers or rule is None or layer not in self.exit_of_layer:
                continue
            exit_index = self.exit_of_layer[layer]
            logits = model.exit_logits(exit_index, hidden) if self.needs_logits else None
            current = hidden
            keep = active.ask(exit_index, logits, current,
                              logits_of=lambda mask: model.exit_logits(exit_index, current[mask]))
            if keep is None:
                continue
            stopped_hidden = hidden[~keep]
            if self.policy == PROPAGATE:
                exited.append((active.stopped, stopped_hidden, layer))
            elif self.policy == DEFERRED:
                self.cache.waiting[active.stopped, position] = stopped_hidden
                self.cache.depth[active.stopped, position] = layer
                self._maybe_waiting = True
            if active.done:
                hidden = None
                break
            hidden, rows = hidden[keep], active.rows
        if hidden is not None:
            active.finish(model.exit_logits(model.num_exits - 1, hidden))
        if exited:
            propagate(adapter, self.cache, exited, position)
        return active.outputs, self.layer_of_exit[active.exit_index]
