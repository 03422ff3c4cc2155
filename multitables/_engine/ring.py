"""A ring of equal slots in one shared arena, passed between workers and consumer by number.

Internal module. Layout of the arena (every part 64-byte aligned, slots page aligned)::

    stop | tickets | free queue | full queue | slot headers | error box | slot 0 | slot 1 ...

A slot circulates: ``free`` queue → a worker fills it and writes its header (ticket, rows) →
``full`` queue → the consumer hands out views → back to ``free``. Workers draw slot tickets from
the counter with one atomic add, so no process assigns work to another.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ._ringbuf import CLOSED, TIMEOUT, Counter, SlotQueue, Word
from .errbox import ErrorBox
from .shm import PAGE, SharedArena, round_up

ERROR_BOX_BYTES = 1 << 16


class RingLayout:
    """Offsets of each part of the arena for ``n_slots`` slots of ``slot_bytes`` each."""

    def __init__(self, n_slots: int, slot_bytes: int):
        self.n_slots = n_slots
        self.slot_bytes = slot_bytes
        self.stop = 0
        self.tickets = 64
        self.free = 128
        self.full = self.free + SlotQueue.nbytes(n_slots)
        self.headers = self.full + SlotQueue.nbytes(n_slots)
        self.errors = self.headers + round_up(16 * n_slots, 64)
        self.slot_stride = round_up(max(slot_bytes, 1), 64)
        self.slots = round_up(self.errors + ERROR_BOX_BYTES, PAGE)
        self.nbytes = self.slots + self.slot_stride * n_slots


class Ring:
    """The parts of a ring's arena, as seen from one process (consumer or worker)."""

    def __init__(self, arena: SharedArena, layout: RingLayout, *, create: bool = False):
        buf = arena.buffer
        self.arena = arena
        self.layout = layout
        self.stop_word = Word(buf, layout.stop)
        self.tickets = Counter(buf, layout.tickets)
        self.free = SlotQueue(buf, layout.free, layout.n_slots, create)
        self.full = SlotQueue(buf, layout.full, layout.n_slots, create)
        # Per slot: the ticket of the block it holds and its number of rows.
        self.headers = arena.ndarray((layout.n_slots, 2), np.int64, layout.headers)
        self.errors = ErrorBox(buf, layout.errors, ERROR_BOX_BYTES)
        if create:
            for slot in range(layout.n_slots):
                self.free.push(slot)

    @classmethod
    def create(cls, n_slots: int, slot_bytes: int) -> Ring:
        layout = RingLayout(n_slots, slot_bytes)
        return cls(SharedArena(layout.nbytes, name="multitables-ring"), layout, create=True)

    def slot_array(self, slot: int, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A numpy view of the start of ``slot``."""
        return self.arena.ndarray(shape, dtype, self.layout.slots + slot * self.layout.slot_stride)

    @property
    def stopped(self) -> bool:
        return self.stop_word.load() != 0

    def take_ticket(self, end: int | None, wait_slice: float,
                    parent_alive: Callable[[], bool]) -> tuple[int, int] | None:
        """A worker's next task: a free slot and the next ticket (what to read into it), or
        None once every ticket below ``end`` is taken (None: endless), the ring stops or the
        parent is gone. Waits in slices of ``wait_slice`` s, checking between them."""
        while True:
            if end is not None and self.tickets.load() >= end:
                return None  # every ticket is taken: exit now, while the consumer finishes
            slot = self.free.pop(wait_slice)
            if slot == TIMEOUT:
                if self.stopped or not parent_alive():
                    return None
                continue
            if slot == CLOSED or self.stopped:
                return None
            ticket = self.tickets.fetch_add(1)
            if end is not None and ticket >= end:
                self.free.push(slot)
                return None
            return slot, ticket

    def stop(self) -> None:
        """Tell every worker to finish and wake every waiter. See NOTE [ Worker shutdown logic ]."""
        self.stop_word.store(1)
        self.free.close()
        self.full.close()

    def close(self) -> None:
        """Drop the descriptor. The pages stay mapped until the last view of them is gone."""
        self.arena.close()


__all__ = ["CLOSED", "TIMEOUT", "Ring", "RingLayout"]
