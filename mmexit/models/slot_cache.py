"""The continuous decoder's KV cache: a pool of slots that images take and leave one by one.

Rows of one call may sit at different cache positions (the continuous decoder,
``mmexit.inference.continuous_decoder``). ``write_rows_and_read`` writes each row's K/V at its own
position and returns a mask over positions 0..own position; ``SlotCache`` is a pool of ``slots``
rows that images enter (``admit``: their features and prefix K/V) and leave one by one. On a small
decoder the work of a call around the layer's maths (indices, masks, K/V writes and gathers, state
propagation) is a large part of it, so ``SlotCache`` keeps it small: ``plan_rows`` builds once per
group of rows (reused while the group runs layer after layer) the rows, positions and flat K/V
write index (one host-to-tensor copy) and the additive mask (rows of a precomputed table; None when
every row sits at the same position); a layer's K and V share one buffer (one ``index_copy_``
writes them, one ``index_select`` gathers them), as do its constants; and state propagation is
folded into the layer calls (``fold``: the K/V of tokens that skipped a layer are projected by a
later ``step_rows`` of that layer together with its own rows, no separate projection call).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

from mmexit.models.kv_cache import DecoderCache


@dataclass
class RowsPlan:
    """What ``SlotCache.write_rows_and_read`` needs for one group of rows at their cache positions,
    built once by ``SlotCache.plan_rows`` and reused for every layer the group runs.

    rows [r] long (slots); positions [r] long (cache positions); length: max(positions) + 1 (positions
    read); flat [r * 2 * kv_heads] long: the rows of a layer's ``kv`` viewed as [slots * 2 * kv_heads *
    size, head_dim] that the group's K/V go to; mask: [r, 1, 1, length] additive (0 = may attend, -inf = a
    position after the row's own), None when every row sits at position length - 1 (it reads every
    position, as a batch-synchronous step does). memo: what an adapter derives from the positions
    alone (LLaMA: RoPE cos/sin), kept for the group's next layers. A plan's tensors are never
    changed in place (a plan is matched by the identity of its ``rows`` and ``positions``).
    """

    rows: Tensor
    positions: Tensor
    length: int
    flat: Tensor
    mask: Optional[Tensor]
    memo: dict = field(default_factory=dict)

    def matches(self, rows: Tensor, positions: Tensor, length: Optional[int] = None) -> bool:
        """True when ``rows`` and ``positions`` are this plan's own tensors (and ``length`` its own)."""
        return rows is self.rows and positions is self.positions and (length is None or length == self.length)

    def subset(self, index: Tensor) -> "RowsPlan":
        """The plan of rows ``index`` (long [k], 0-based into this plan's rows) at the same positions,
        taken from this plan's tensors (no host lists). ``length`` stays (a position past a row's own
        is masked or, without a mask, every row sits at length - 1); ``memo`` starts empty."""
        flat = self.flat.view(self.rows.shape[0], -1).index_select(0, index).view(-1)
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return RowsPlan(self.rows.index_select(0, index), self.positions.index_select(0, index), self.length,
                        flat, mask)


class SlotCache(DecoderCache):
    """A ``DecoderCache`` of ``slots`` rows (slots) that images take and free one by one.

    Every image has the same prefix length (``offset``; 0 for GPT-2, the patches for LLaMA) and at
    most ``max_len`` caption positions. ``admit`` writes a new image's features and prefix K/V into
    its slot (``admit_staged``: from rows of a ``DecoderCache`` built for several waiting images at
    once); whatever a slot's earlier image left at later positions is never read (reads are masked to
    0..own position, written first).

    A layer's constants (cross-attention K/V of the image) are computed lazily: for the slots of a
    call whose image has not reached that layer yet (``ensure_constants``, called before the layer
    runs; ``constant`` reads them). An early-exit caption whose tokens never go past layer 3 never
    pays for the cross-attention K/V of layers 4-6; the full model computes every layer's once per
    image, as before (prefix K/V of a LLaMA-style decoder are still written at admission: they
    depend on the layers below).

    A layer's K and V share one buffer ``kv[layer]`` [slots, 2, kv_heads, size, head_dim]
    (``keys[layer]`` and ``values[layer]`` are its two halves), and a layer's constants one buffer
    [slots, parts, ...] when its parts have one shape: a call writes its rows' K/V with one
    ``index_copy_`` and gathers them (and the constants) with one ``index_select``.
    """

    def __init__(self, adapter, slots: int, prefix_length: int, max_len: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.offset = int(prefix_length)
        self.size = self.offset + max_len
        shape = (slots, 2, adapter.num_kv_heads, self.size, adapter.head_dim)
        self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(adapter.num_layers)]
        self.keys = [kv[:, 0] for kv in self.kv]
        self.values = [kv[:, 1] for kv in self.kv]
        self.constants: list = [None] * adapter.num_layers  # allocated when first computed
        self.constant_pools: list[Optional[Tensor]] = [None] * adapter.num_layers  # [slots, parts, ...] or None
        self.features: Optional[Tensor] = None  # [slots, patches, width]: each slot's image (lazy constants)
        self.lazy_constants: set[int] = set()  # (per slot instead: ``missing``)
        # per layer: slots whose image has no constants there yet; has_constants[layer]: False once the
        # adapter said the layer has none (LLaMA), None until the first image reached it
        self.missing: list[set[int]] = [set() for _ in range(adapter.num_layers)]
        self.has_constants: list[Optional[bool]] = [None] * adapter.num_layers
        self.slots = slots
        self.depth = self.waiting = None
        self.kv_heads, self.head_dim = adapter.num_kv_heads, adapter.head_dim
        self.head_offsets = [head * self.size for head in range(2 * self.kv_heads)]  # K heads, then V heads
        # mask_table[p, j]: 0 where position j may be read by a query at position p (j <= p), else -inf
        self.mask_table = torch.full((self.size, self.size), float("-inf"), dtype=dtype, device=device).triu_(1)
        self.plan: Optional[RowsPlan] = None  # the plan write_rows_and_read uses when handed its rows
        self.folded: Optional[FoldedRows] = None  # tokens whose K/V the next call of their layer projects

    # ------------------------------------------------------------------ admission
    def admit(self, adapter, slots: Tensor, features: Tensor) -> None:
        """Images features [n, patches, width] take the slots [n]: their features and prefix K/V."""
        self.admit_staged(slots, self.stage(adapter, features), 0)

    def stage(self, adapter, features: Tensor) -> DecoderCache:
        """Prefix K/V of images features [n, patches, width], computed in one batch (a ``DecoderCache``
        with ``max_len`` 0 and no constants: those are computed lazily) for ``admit_staged``."""
        staged = DecoderCache(adapter, features, 0, constants=False)  # prefix K/V (positions 0..offset-1) only
        if staged.offset != self.offset:
            raise ValueError(f"an image has a prefix of {staged.offset} positions, this cache holds {self.offset}")
        staged.features = features
        return staged

    def admit_staged(self, slots: Tensor, staged: DecoderCache, start: int) -> None:
        """Slots [n] take rows start..start+n-1 of ``staged`` (``stage``): their features (constants are
        computed from them lazily, ``ensure_constants``) and prefix K/V (copied straight into place)."""
        end = start + slots.shape[0]
        features = staged.features[start:end]
        if self.features is None:
            self.features = features.new_zeros(self.slots, *features.shape[1:])
        elif self.features.shape[1:] != features.shape[1:]:
            raise ValueError(f"image features of shape {tuple(features.shape[1:])} do not fit this cache's "
                             f"{tuple(self.features.shape[1:])} (every image must have the same patches)")
        self.features.index_copy_(0, slots, features)
        taken = slots.tolist()
        for layer in range(len(self.kv)):
            if self.offset:
                self.keys[layer][:, :, :self.offset].index_copy_(0, slots, staged.keys[layer][start:end])
                self.values[layer][:, :, :self.offset].index_copy_(0, slots, staged.values[layer][start:end])
            if self.has_constants[layer] is not False:
                self.missing[layer].update(taken)

    def ensure_constants(self, adapter, layer: int, slots: Sequence[int]) -> None:
        """The constants of ``layer`` for those of ``slots`` (host list) whose image has none there yet,
        computed in one batch by ``adapter.init_cache_layer`` from the slots' features."""
        missing = self.missing[layer]
        if not missing:
            return
        need = [slot for slot in slots if slot in missing]
        if not need:
            return
        missing.difference_update(need)
        index = torch.tensor(need, dtype=torch.long, device=self.features.device)
        constant = adapter.init_cache_layer(layer, self.features.index_select(0, index))
        self.has_constants[layer] = constant is not None
        if constant is None:
            missing.clear()
            return
        self._write_constants(layer, index, constant)

    def _write_constants(self, layer: int, slots: Tensor, constant: tuple) -> None:
        """Constant parts [n, ...] of ``layer`` into their slots [n] (buffers allocated at the first)."""
        if self.constants[layer] is None:
            if len({part.shape for part in constant}) == 1:  # one buffer, one gather per call
                pool = constant[0].new_zeros(self.slots, len(constant), *constant[0].shape[1:])
                self.constant_pools[layer] = pool
                self.constants[layer] = tuple(pool[:, i] for i in range(len(constant)))
            else:
                self.constants[layer] = tuple(part.new_zeros(self.slots, *part.shape[1:]) for part in constant)
        for pool, part in zip(self.constants[layer], constant):  # (feature shapes were checked at admission)
            pool.index_copy_(0, slots, part)

    # ------------------------------------------------------------------ rows at their own positions
    def _flat(self, slots: Sequence[int], positions: Sequence[int]) -> list[int]:
        """Rows of the [slots * 2 * kv_heads * size, head_dim] view of a layer's ``kv`` at (slot, K then
        V, every head, position), in the order of K/V [n, 2, kv_heads, head_dim]."""
        stride, offsets = 2 * self.kv_heads * self.size, self.head_offsets
        return [base + offset for base in [slot * stride + position for slot, position in zip(slots, positions)]
                for offset in offsets]

    def plan_rows(self, slots: Sequence[int], positions: Sequence[int]) -> RowsPlan:
        """The plan of rows ``slots`` at cache ``positions`` (host lists); ``write_rows_and_read`` uses it
        when handed its ``rows`` and ``positions`` tensors."""
        r = len(slots)
        indices = torch.tensor([*slots, *positions, *self._flat(slots, positions)], dtype=torch.long,
                               device=self.mask_table.device)  # one host-to-tensor copy: rows, positions, flat
        rows, at, flat = indices[:r], indices[r:2 * r], indices[2 * r:]
        last, first = max(positions), min(positions)
        mask = None if last == first else self.mask_table[:, :last + 1].index_select(0, at)[:, None, None, :]
        self.plan = RowsPlan(rows, at, last + 1, flat, mask)
        return self.plan

    def write_rows_and_read(self, layer: int, rows: Tensor, positions: Tensor, key: Tensor, value: Tensor,
                            length: Optional[int] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """As ``DecoderCache.write_rows_and_read``; with the rows and positions of ``plan`` (``plan_rows``)
        the write index and mask are the plan's and the mask is additive, or None when every row sits
        at position length - 1."""
        plan = self.plan
        if plan is None or not plan.matches(rows, positions, length):
            return super().write_rows_and_read(layer, rows, positions, key, value, length)
        return self.write_kv_rows_and_read(layer, rows, positions, torch.stack([key, value], 1), length)

    def write_kv_rows_and_read(self, layer: int, rows: Tensor, positions: Tensor, kv: Tensor,
                               length: Optional[int] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``write_rows_and_read`` with K and V as one tensor kv [r, 2, kv_heads, hd] (K then V)."""
        plan = self.plan
        if plan is None or not plan.matches(rows, positions, length):
            return super().write_rows_and_read(layer, rows, positions, kv[:, 0], kv[:, 1], length)
        store = self.kv[layer]
        store.view(-1, store.shape[-1]).index_copy_(0, plan.flat, kv.reshape(-1, store.shape[-1]))
        read = store[:, :, :, :plan.length].index_select(0, rows)  # [r, 2, kv_heads, length, hd]
        return read[:, 0], read[:, 1], plan.mask

    def constant(self, layer: int, rows: Optional[Tensor]):
        """The layer's constant K/V for ``rows`` (long [r], or None = all), or None (``index_select``);
        ``ensure_constants`` of these rows' slots at this layer must have run."""
        stored = self.constants[layer]
        if stored is None or rows is None:
            return stored
        pool = self.constant_pools[layer]
        if pool is None:
            return tuple(part.index_select(0, rows) for part in stored)
        read = pool.index_select(0, rows)
        return tuple(read[:, i] for i in range(read.shape[1]))

    # ------------------------------------------------------------------ state propagation folded into calls
    def fold(self, layer: int, slots: Sequence[int], positions: Sequence[int], hidden: Tensor) -> None:
        """Tokens (slots, cache positions; exit hidden states [m, width]) that skipped ``layer``: the next
        ``step_rows`` of that layer projects their K/V along with its own rows (``take_folded``)."""
        m = len(slots)
        indices = torch.tensor([*positions, *self._flat(slots, positions)], dtype=torch.long,
                               device=self.mask_table.device)
        self.folded = FoldedRows(layer, hidden, indices[:m], indices[m:])

    def take_folded(self, layer: int) -> Optional["FoldedRows"]:
        """For ``step_rows`` of ``layer``: the folded tokens whose K/V it must project and write
        (``write_folded``) before its attention, or None."""
        folded = self.folded
        if folded is None or folded.layer != layer:
            return None
        self.folded = None
        return folded

    def write_folded(self, layer: int, folded: "FoldedRows", kv: Tensor) -> None:
        """K/V kv [m, 2, kv_heads, head_dim] (K then V) of the folded tokens at their slots and positions."""
        store = self.kv[layer]
        store.view(-1, store.shape[-1]).index_copy_(0, folded.flat, kv.reshape(-1, store.shape[-1]))

    def propagate_folded(self, adapter) -> None:
        """The folded tokens' K/V by the adapter's ``project_kv`` (for an adapter whose ``step_rows`` does
        not take folded rows; called before that call)."""
        folded, self.folded = self.folded, None
        key, value = adapter.project_kv(folded.layer, folded.hidden, folded.positions)
        self.write_folded(folded.layer, folded, torch.stack([key, value], 1))


@dataclass
class FoldedRows:
    """Tokens whose K/V at ``layer`` come from state propagation (they skipped it), projected in the
    layer's next call: hidden [m, width] (their exit's hidden states), positions [m] (cache
    positions), flat [m * 2 * kv_heads] (the rows of the layer's ``kv`` viewed as [slots * 2 *
    kv_heads * size, head_dim] their K/V go to)."""

    layer: int
    hidden: Tensor
    positions: Tensor
    flat: Tensor
