"""A ring of equal slots in one shared arena, passed between workers and consumer by number.

Internal module. Layout of the arena (every part 64-byte aligned, slots page aligned)::

    stop | tickets | free queue | full queue | slot headers | error box | slot 0 | slot 1 ...

A slot circulates: ``free`` queue → a worker fills it and writes its header (ticket, rows) →
``full`` queue → the consumer hands out views → back to ``free``. Workers draw slot tickets from
the counter with one atomic add, so no process assigns work to another.
``FilledSlots`` is the consumer's wait for the ``full`` queue and ``RingJob`` the workers'
failure handling, shared by the Streamer's and the Loader's jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..errors import SubprocessException
from . import timeouts
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

    def renewed(self) -> Ring:
        """This ring's memory as a new ring: every slot free, no ticket drawn, not stopped, no
        error. Only between jobs: no worker may hold it. Its pages stay reserved and mapped, so
        the next job touches no new memory."""
        self.stop_word.store(0)
        self.arena.ndarray((1,), np.uint64, self.layout.tickets)[0] = 0
        self.errors.clear()
        return Ring(self.arena, self.layout, create=True)

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


def _never() -> bool:
    return False


def _nothing() -> None:
    pass


class FilledSlots:
    """The consumer's wait for the slots its workers fill: pop the full queue in slices, check
    the workers between them and every ``CHECK_INTERVAL`` even while slots keep coming (one dead
    worker among live ones would otherwise go unnoticed), and raise the workers' error.

    See NOTE [ Worker shutdown logic ] in multitables/_engine/pool.py.
    """

    def __init__(self, ring: Ring, check_workers: Callable[[], None]):
        self.ring = ring
        self._check_workers = check_workers  # raises SubprocessException naming dead workers
        self._next_check = time.monotonic() + timeouts.CHECK_INTERVAL

    def pop(self, want: int = 1, closed: Callable[[], bool] = _never,
            on_failure: Callable[[], None] = _nothing) -> int:
        """The next filled slot, or ``CLOSED`` once the ring is stopped or ``closed()`` (the
        consumer closed by another thread). Sleeps until ``want`` slots are filled when none is.
        Raises the exception of a failed read, or ``SubprocessException`` if a worker died,
        after ``on_failure()``. (The callbacks come with each call, not kept: kept, they would
        tie their owner into a cycle and delay its ``__del__``.)"""
        ring = self.ring
        while True:
            if closed():  # no slot after close()
                return CLOSED
            slot = ring.full.pop(timeouts.WAIT_SLICE, want)
            if slot >= 0 and time.monotonic() < self._next_check:
                return slot
            if ring.errors.full():
                exc = ring.errors.exception()
                on_failure()
                raise exc
            if slot == CLOSED or closed():
                return CLOSED
            self._next_check = time.monotonic() + timeouts.CHECK_INTERVAL
            try:
                self._check_workers()
            except SubprocessException:
                on_failure()
                raise
            if slot >= 0:
                return slot


class RingPlan(Protocol):
    """What a ``RingJob``'s plan tells about its ring: the arena and its layout (None only
    before the ring is made)."""

    @property
    def arena(self) -> SharedArena | None: ...

    @property
    def layout(self) -> RingLayout | None: ...


class RingJob:
    """The failure handling of a job whose workers fill one ring (mixed into the Streamer's and
    the Loader's jobs): the consumer takes tickets in order, so a ticket that cannot be read
    would leave a hole (a stream with a gap, an epoch short of rows). The first failure is put
    in the ring's error box, where the consumer's ``FilledSlots.pop`` raises it, and stops the
    ring. See NOTE [ Worker shutdown logic ] in multitables/_engine/pool.py."""

    plan: RingPlan

    def task_failed(self, task: Any, exc: BaseException, where: str) -> bool:
        self.fail(exc, where)
        return False  # stop: no later ticket may be delivered past the hole

    def fail(self, exc: BaseException, where: str) -> None:
        # A ring of its own: the job may fail before (or while) it attaches to one.
        arena, layout = self.plan.arena, self.plan.layout
        assert arena is not None and layout is not None
        ring = Ring(arena, layout)
        ring.errors.put(exc, where)
        ring.stop()


__all__ = ["CLOSED", "TIMEOUT", "FilledSlots", "Ring", "RingJob", "RingLayout", "RingPlan"]
