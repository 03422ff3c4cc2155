"""What a Loader holds in one process: its workers, the ring kept between epochs and the epochs
being read (internal)."""

from __future__ import annotations

import os
import weakref
from typing import Protocol

from .._engine.pool import StandbyWorkers
from .._engine.ring import Ring


class _Closable(Protocol):
    def close(self) -> None: ...


class Local:
    """What a Loader holds in one process: its workers, the last epoch's ring (kept for the
    next, its memory reserved and mapped already) and the epochs being read. Made anew in a
    forked copy: the parent's belong to the parent."""

    def __init__(self, start_method: str | None):
        self.pid = os.getpid()
        self.start_method = start_method
        self.workers: StandbyWorkers | None = None
        self.idle_ring: Ring | None = None
        self.slot_bytes = 0  # batches made sample by sample: the slots the largest needed
        self.reads: weakref.WeakSet[_Closable] = weakref.WeakSet()
        self.closed = False

    def pool(self) -> StandbyWorkers:
        if self.workers is None:
            self.workers = StandbyWorkers(self.start_method, "Loader")
        return self.workers

    def take_ring(self) -> Ring | None:
        ring, self.idle_ring = self.idle_ring, None
        return ring

    def keep_ring(self, ring: Ring) -> bool:
        """Keep ``ring`` for the next epoch; False once closed or if one is kept already (close
        it then)."""
        if self.closed or self.idle_ring is not None:
            return False
        self.idle_ring = ring
        return True

    def close(self) -> None:
        """Stop the epochs being read, end the workers, free the kept ring; in a forked copy
        only refuse to keep rings (what it holds is the parent's). Idempotent."""
        self.closed = True
        if self.pid != os.getpid():
            return
        for reads in list(self.reads):
            reads.close()
        if self.workers is not None:
            self.workers.close()
        if self.idle_ring is not None:
            self.idle_ring.close()
        self.workers = self.idle_ring = None
