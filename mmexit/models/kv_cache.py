"""The KV cache mmexit manages for per-token early-exit decoding, for any decoder adapter.

Self-attention K/V are preallocated per layer as [rows, kv_heads, offset + max_len, head_dim];
per-layer constants (a captioner's cross-attention K/V of the image) are computed once by the
adapter's ``init_cache_layer`` (None for decoders that have none), when a layer first reads them: a
layer that no token runs (early exit) never pays for them.

A decoder that reads the image as a *prefix* of tokens (LLaMA: projected image tokens, no
cross-attention) occupies cache positions ``0..offset-1`` with it: ``offset =
adapter.prefix_length(features)`` (0 for GPT-2) and ``adapter.prefill(cache, features)`` writes the
prefix's K/V at every layer once. Caption position ``t`` lives at cache position ``offset + t``;
the adapters' ``step``/``span``/``chunk``/``project_kv`` always take cache positions.

The K/V policies (``KV_POLICIES``, defined here once; ``mmexit.inference.stepper`` runs them) say
how a token's skipped layers get their K/V. Under the ``deferred`` policy the cache also holds
``depth`` [rows, offset + max_len] (layers whose K/V are true at each position; the prefix is
complete) and ``waiting`` [rows, offset + max_len, width] (the hidden state of a position still
waiting for deeper layers).

Rows are a batch of sequences (or beams); ``select`` keeps or reorders them.

Per-row positions (the continuous decoder): ``mmexit.models.slot_cache``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

#: THE K/V policies (recipe ``evaluate.policy``): name -> what a token's skipped layers leave in the
#: cache; the first is the default. Every list of policy names derives from this one.
KV_POLICIES: dict[str, str] = {
    "propagate": "state propagation (CALM: K/V projected from the exit's hidden state)",
    "deferred": "deferred compute (FREE: caught up in a chunk when a later token goes deeper; exact K/V)",
    "oracle": "all layers run (true K/V; the exits' savings are simulated)",
}
PROPAGATE, DEFERRED, ORACLE = KV_POLICIES
KV_POLICY_DOC = "K/V of skipped layers: " + "; ".join(f"{name}: {doc}" for name, doc in KV_POLICIES.items())


class DecoderCache:
    """Per-layer K/V for ``rows`` sequences of at most ``max_len`` positions."""

    def __init__(self, adapter, features: Tensor, max_len: int, deferred: bool = False,
                 constants: bool = True) -> None:
        rows = features.shape[0]
        self.offset: int = adapter.prefix_length(features)  # cache positions taken by an image prefix
        self.size = self.offset + max_len
        shape = (rows, adapter.num_kv_heads, self.size, adapter.head_dim)
        self.keys = [features.new_zeros(shape) for _ in range(adapter.num_layers)]
        self.values = [features.new_zeros(shape) for _ in range(adapter.num_layers)]
        self.constants: list = [None] * adapter.num_layers
        # layers whose constants are still to compute from ``features`` (at the layer's first read)
        self.lazy_constants: set[int] = set(range(adapter.num_layers)) if constants else set()
        self.features: Optional[Tensor] = features if constants else None
        self.init_cache_layer = adapter.init_cache_layer
        self.depth: Optional[Tensor] = None
        self.waiting: Optional[Tensor] = None
        if deferred:
            self.depth = torch.full((rows, self.size), adapter.num_layers, dtype=torch.long, device=features.device)
            self.waiting = features.new_zeros(rows, self.size, adapter.width)
        if self.offset:
            adapter.prefill(self, features)

    def select(self, index: Tensor) -> None:
        """Keep / reorder the cache rows ``index`` (bool mask or long index [rows])."""
        for store in (self.keys, self.values):
            for layer, tensor in enumerate(store):
                store[layer] = tensor[index]
        self.constants = [None if c is None else tuple(part[index] for part in c) for c in self.constants]
        if self.lazy_constants:
            self.features = self.features[index]
        if self.depth is not None:
            self.depth, self.waiting = self.depth[index], self.waiting[index]

    def write_and_read(self, layer: int, rows: Optional[Tensor], t: int, key: Tensor,
                       value: Tensor) -> tuple[Tensor, Tensor]:
        """Write K/V [r, kv_heads, hd] at position t of ``rows`` (None = all), return K/V [r, kv_heads, t+1, hd]."""
        if rows is None:
            self.keys[layer][:, :, t] = key
            self.values[layer][:, :, t] = value
            return self.keys[layer][:, :, : t + 1], self.values[layer][:, :, : t + 1]
        self.keys[layer][rows, :, t] = key
        self.values[layer][rows, :, t] = value
        return self.keys[layer][rows, :, : t + 1], self.values[layer][rows, :, : t + 1]

    def write_span_and_read(self, layer: int, rows: Optional[Tensor], start: int, key: Tensor,
                            value: Tensor) -> tuple[Tensor, Tensor]:
        """Write K/V [r, kv_heads, n, hd] at positions start..start+n-1 of ``rows`` (None = all);
        return K/V [r, kv_heads, start+n, hd] (everything a causal query of the span may read)."""
        end = start + key.shape[2]
        if rows is None:
            self.keys[layer][:, :, start:end] = key
            self.values[layer][:, :, start:end] = value
            return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]
        self.keys[layer][rows, :, start:end] = key
        self.values[layer][rows, :, start:end] = value
        return self.keys[layer][rows, :, :end], self.values[layer][rows, :, :end]

    def write(self, layer: int, rows: Tensor, positions: Tensor | int, key: Tensor, value: Tensor) -> None:
        """Write K/V [n, kv_heads, hd] at (rows[n], positions[n])."""
        self.keys[layer][rows, :, positions] = key
        self.values[layer][rows, :, positions] = value

    def write_rows_and_read(self, layer: int, rows: Tensor, positions: Tensor, key: Tensor, value: Tensor,
                            length: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        """Write K/V [r, kv_heads, hd] at (rows[r], positions[r]), each row at its own cache position.

        Returns K/V [r, kv_heads, length, hd] of ``rows`` and the mask [r, 1, 1, length] (True = may
        attend: positions 0..own position). length: positions to read, max(positions) + 1 when None.
        """
        self.write(layer, rows, positions, key, value)
        length = int(positions.max()) + 1 if length is None else length
        mask = torch.arange(length, device=positions.device)[None, :] <= positions[:, None]  # [r, length]
        keys = self.keys[layer][:, :, :length].index_select(0, rows)
        return keys, self.values[layer][:, :, :length].index_select(0, rows), mask[:, None, None, :]

    def constant(self, layer: int, rows: Optional[Tensor]):
        """The layer's constant K/V (e.g. cross-attention) for ``rows`` (None = all), or None; computed
        for every row at the layer's first read."""
        if layer in self.lazy_constants:
            self.lazy_constants.discard(layer)
            self.constants[layer] = self.init_cache_layer(layer, self.features)
            if not self.lazy_constants:
                self.features = None
        stored = self.constants[layer]
        if stored is None or rows is None:
            return stored
        return tuple(part[rows] for part in stored)


@dataclass
class ChunkLayout:
    """Where the positions of one deferred catch-up chunk come from and go to.

    chunk [r, c+1, width]: the waiting positions' hidden states (ascending), then position t;
    positions [r, c+1]; write [r, c+1] bool (padding slots are not written); mask [r, 1, c+1, t+1]
    causal mask over the cache; valid [r, c]; past [r, c].
    """

    cache: DecoderCache
    row_ids: Tensor
    t: int
    chunk: Tensor
    positions: Tensor
    write: Tensor
    valid: Tensor
    past: Tensor
    mask: Tensor
    size: int
    caught_up: int

    def write_and_read(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Write the chunk's K/V ([written, kv_heads, hd]), return K/V [r, kv_heads, t+1, hd] of its rows."""
        r = self.row_ids.shape[0]
        write_rows = self.row_ids[:, None].expand(r, self.size + 1)[self.write]
        self.cache.write(layer, write_rows, self.positions[self.write], key, value)
        return self.cache.keys[layer][self.row_ids, :, : self.t + 1], self.cache.values[layer][self.row_ids, :, : self.t + 1]

    def finish(self, layer: int, chunk: Tensor) -> Tensor:
        """Store the caught-up positions' new hidden states and depth; return position t's hidden [r, width]."""
        r, c = self.row_ids.shape[0], self.size
        done_rows, done_positions = self.row_ids[:, None].expand(r, c)[self.valid], self.past[self.valid]
        self.cache.waiting[done_rows, done_positions] = chunk[:, :c][self.valid]
        self.cache.depth[done_rows, done_positions] = layer + 1
        return chunk[:, c]


def span_mask(start: int, n: int, device: torch.device) -> Optional[Tensor]:
    """Causal mask [n, start+n] (True = may attend) of n consecutive new positions after ``start``
    cached ones; None for one position (it reads everything)."""
    if n == 1:
        return None
    return torch.arange(start + n, device=device)[None, :] <= torch.arange(start, start + n, device=device)[:, None]


def chunk_layout(cache: DecoderCache, hidden: Tensor, row_ids: Tensor, t: int, waiting: Tensor) -> ChunkLayout:
    """Gather cache position t (hidden [r, width]) and the caption positions waiting at this layer
    (waiting [r, t - cache.offset]: positions offset..t-1; a prefix never waits)."""
    r, span = hidden.shape[0], waiting.shape[1]
    device = hidden.device
    counts = waiting.sum(1)  # [r]
    c = int(counts.max())
    order = torch.arange(t - span, t, device=device).expand(r, span)
    order = torch.where(waiting, order, order + t).sort(dim=1).values[:, :c]  # waiting positions first, ascending
    valid = torch.arange(c, device=device)[None, :] < counts[:, None]  # [r, c]
    past = torch.where(valid, order, torch.full_like(order, t))  # padding points at t (outputs discarded)
    positions = torch.cat([past, torch.full((r, 1), t, dtype=torch.long, device=device)], dim=1)  # [r, c+1]
    chunk = torch.cat([cache.waiting[row_ids[:, None], past], hidden[:, None]], dim=1)  # [r, c+1, width]
    write = torch.cat([valid, torch.ones(r, 1, dtype=torch.bool, device=device)], dim=1)
    mask = torch.arange(t + 1, device=device)[None, None, None, :] <= positions[:, None, :, None]
    return ChunkLayout(cache, row_ids, t, chunk, positions, write, valid, past, mask, c, int(counts.sum()))


def propagate(adapter, cache: DecoderCache, exited: list[tuple], t: Optional[int] = None) -> None:
    """CALM's state propagation: K/V of the layers each exited row skipped at its cache position, from
    its exit hidden state. exited: (cache rows [n], hidden [n, width], exit layer number) per exit, all
    at cache position t; or, with t None, (cache rows [n], hidden [n, width], exit layer number, cache
    positions [n]) per exit, each row at its own position (the continuous decoder)."""
    first = min(entry[2] for entry in exited)
    for layer in range(first, adapter.num_layers):  # 0-based layer `layer` was skipped by rows with exit <= layer
        parts = [entry for entry in exited if entry[2] <= layer]
        rows = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])
        hidden = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        if t is not None:
            positions = t
        else:
            positions = parts[0][3] if len(parts) == 1 else torch.cat([p[3] for p in parts])
        key, value = adapter.project_kv(layer, hidden, positions)
        cache.write(layer, rows, positions, key, value)
