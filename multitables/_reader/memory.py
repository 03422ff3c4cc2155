"""A Reader's stage memory in the caller (internal): numbered for the workers, freed in them
when it goes, and kept for reuse when a lent result gives it back (see ``lending``)."""

from __future__ import annotations

import collections
import functools
import itertools
import weakref
from collections.abc import Iterable

from .stages import IDLE, Stage, StageMemory

# Memory that came back from results, kept for stages of its size (see MemoryKeeper.keep).
MAX_SPARES = 8
MAX_SPARE_BYTES = 256 << 20


class MemoryKeeper:
    """The stage memory of one Reader in this process.

    ``dropped`` lists the memories freed here that workers still map, for the dispatcher to
    tell them; ``take_back`` is what a lent result calls (in whatever thread drops its last
    view) to give its memory back. ``spare`` and ``keep`` run under the Reader's lock.
    """

    def __init__(self) -> None:
        self._ids = itertools.count()
        self.closed = False
        self.dropped: list[tuple[int, tuple[int, ...]]] = []
        self.spares: dict[int, list[StageMemory]] = {}
        self.spare_bytes = 0
        self.returned: collections.deque[StageMemory] = collections.deque()
        self.take_back = functools.partial(_take_back, weakref.ref(self))

    def adopt(self, memory: StageMemory) -> StageMemory:
        """Number a stage's memory for the workers, and free it everywhere when it goes."""
        memory.id = next(self._ids)
        memory.forget = weakref.finalize(memory, _forget_memory, weakref.ref(self), memory.id,
                                         memory.sent_to, memory.arena)
        return memory

    def spare(self, capacity: int) -> StageMemory:
        """Memory for a stage of ``capacity`` bytes: spare when there is some, else new."""
        while self.returned:
            memory = self.returned.popleft()
            if memory.capacity == capacity and not memory.arena.closed:  # a training loop's
                memory.state.set(IDLE)
                return memory
            self.keep(memory)
        spares = self.spares.get(capacity)
        if spares:
            self.spare_bytes -= capacity
            memory = spares.pop()
            memory.state.set(IDLE)
            return memory
        return self.adopt(StageMemory.create(capacity))

    def keep(self, memory: StageMemory) -> None:
        """Keep memory that came back from a result for the next stage of its size, up to
        MAX_SPARES of a size and MAX_SPARE_BYTES in all (one of each size always); free it
        otherwise."""
        capacity = memory.capacity
        spares = self.spares.setdefault(capacity, [])
        if self.closed or memory.arena.closed or len(spares) >= MAX_SPARES or (
                spares and self.spare_bytes + capacity > MAX_SPARE_BYTES):
            memory.discard()
            return
        spares.append(memory)
        self.spare_bytes += capacity

    def forget_inherited(self, stages: Iterable[Stage]) -> None:
        """In a forked child: the parent's pages are shared with the process they were made in
        (and with every other child forked from it), so this copy gets pages of its own for
        ``stages``, or two processes would read into the same ones; the parent's are the
        parent's to free, and so are its spares."""
        old_spares = [m for spares in self.spares.values() for m in spares]
        old_spares += self.returned
        self.dropped = []
        self.spares = {}
        self.spare_bytes = 0
        self.returned = collections.deque()
        for memory in old_spares:
            _disown(memory)
        for stage in stages:
            _disown(stage.memory)
            stage.memory = self.adopt(StageMemory.create(stage.nbytes))

    def close(self) -> None:
        """Free the spare memory; memory given back later is freed as it comes."""
        self.closed = True
        self.dropped.clear()
        for spares in self.spares.values():
            for memory in spares:
                memory.discard()
        self.spares.clear()
        while self.returned:
            self.returned.popleft().discard()


def _forget_memory(keeper_ref, memory_id: int, sent_to: set[int], arena) -> None:
    """A stage's memory was discarded or collected: free it here, and in the workers that mapped
    it."""
    arena.close()
    keeper = keeper_ref()
    if keeper is not None and not keeper.closed and sent_to:
        keeper.dropped.append((memory_id, tuple(sent_to)))


def _take_back(keeper_ref, memory: StageMemory) -> None:
    """A result handed over with ``memory`` went (in any thread): the Reader may reuse it."""
    keeper = keeper_ref()
    if keeper is None or keeper.closed or len(keeper.returned) >= MAX_SPARES:
        memory.discard()  # an idle Reader keeps no more than it would keep spare
    else:
        keeper.returned.append(memory)  # taken in hand under the Reader's lock


def _disown(memory: StageMemory) -> None:
    """In a forked child: unmap the parent's stage memory here only (the parent frees it)."""
    if isinstance(memory.forget, weakref.finalize):
        memory.forget.detach()
    memory.forget = None
    memory.close()
