"""The slots of a continuous-batching pool: which row holds each slot, and tensors kept per slot.

A row being decoded or classified owns one slot from admission until it finishes; its per-slot
data (a runner's hidden states, K/V cache rows, the exit rule's state) lives at that index of
the runner's buffers, so moving a row between layer queues moves only its slot number.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor


class SlotPool:
    """``size`` slots: the free ones (taken lowest first) and the owner of each taken one."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a pool needs at least one slot, got {size}")
        self.size = int(size)
        self.free: list[int] = list(range(self.size - 1, -1, -1))  # popped from the end: slot 0 first
        self.owner: list[Any] = [None] * self.size

    @property
    def free_count(self) -> int:
        return len(self.free)

    @property
    def in_flight(self) -> int:
        """Slots taken."""
        return self.size - len(self.free)

    def take(self, owners: list[Any]) -> list[int]:
        """One free slot per owner (owners must not be None); their slot numbers."""
        if len(owners) > len(self.free):
            raise RuntimeError(f"{len(owners)} rows for {len(self.free)} free slots")
        slots = [self.free.pop() for _ in owners]
        for slot, owner in zip(slots, owners):
            self.owner[slot] = owner
        return slots

    def release(self, slot: int) -> Any:
        """Free ``slot``; the owner it had."""
        owner = self.owner[slot]
        if owner is None:
            raise RuntimeError(f"slot {slot} is not taken")
        self.owner[slot] = None
        self.free.append(slot)
        return owner

    def taken(self) -> list[int]:
        """The slots taken, in slot order."""
        return [slot for slot, owner in enumerate(self.owner) if owner is not None]


class SlotTensors:
    """Named tensors with one row per slot, e.g. an exit rule's state rows ({key: [rows, ...]}).

    A key's row shape may change over a row's life (a rule's state grows at its first exit), but the
    rows read together always share it (they ran the same layers): rows are kept in one buffer
    [slots, ...] per (key, row shape, dtype), allocated at its first write, and each slot remembers
    which buffers hold its rows.
    """

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.buffers: dict[tuple, Tensor] = {}
        self.held: list[dict[str, tuple]] = [{} for _ in range(self.size)]  # per slot: key -> buffer name

    def write(self, slots: list[int], index: Tensor, values: dict[str, Tensor]) -> None:
        """Rows ``values[key]`` [n, ...] go to ``slots`` (host list; ``index``: the same as long [n])."""
        names = {}
        for key, value in values.items():
            name = names[key] = (key, tuple(value.shape[1:]), value.dtype)
            buffer: Optional[Tensor] = self.buffers.get(name)
            if buffer is None:
                buffer = self.buffers[name] = value.new_zeros((self.size, *value.shape[1:]))
            buffer.index_copy_(0, index.to(buffer.device), value)
        for slot in slots:
            self.held[slot] = names

    def read(self, slots: list[int], index: Tensor) -> dict[str, Tensor]:
        """{key: [n, ...]}: copies of the rows of ``slots`` (host list; ``index``: the same as long [n])."""
        if not slots:
            return {}
        return {key: self.buffers[name].index_select(0, index.to(self.buffers[name].device))
                for key, name in self.held[slots[0]].items()}
