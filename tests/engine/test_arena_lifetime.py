"""A shared arena's life (``shm.SharedArena``): refused when the machine lacks the memory, closed
once, never sent to a worker after close, and its pages kept for numpy views that outlive close.
(Reservation and naming: test_shm.py.)"""

from __future__ import annotations

import mmap
import os
import pickle

import pytest
from helpers import Child

import multitables
import multitables._engine.shm as shm
from multitables._engine.shm import SharedArena

pytestmark = pytest.mark.timeout(60)


def test_more_than_the_memory_available_is_refused_before_any_is_reserved(monkeypatch):
    """Exactly what is available is reserved; one page more is a ``SharedMemoryError`` naming
    both sizes, raised before fallocate could push the machine into the OOM killer."""
    available = 64 * mmap.PAGESIZE
    monkeypatch.setattr(shm, "available_memory", lambda: available)
    SharedArena(available).close()
    nbytes = available + mmap.PAGESIZE
    with pytest.raises(multitables.SharedMemoryError,
                       match=rf"cannot reserve {nbytes} bytes .*only {available} bytes are "
                             "available"):
        SharedArena(nbytes)


def test_close_is_idempotent_and_a_closed_arena_is_not_sent():
    arena = SharedArena(100)
    fd = arena.fd
    arena.close()
    arena.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # the descriptor went with it
    with pytest.raises(ValueError, match="closed"):
        _ = arena.fd
    with pytest.raises(ValueError, match="closed SharedArena"):
        pickle.dumps(arena)


_VIEW_AFTER_CLOSE = """
    import numpy as np
    from multitables._engine.shm import SharedArena
    arena = SharedArena(4096)
    view = arena.ndarray((16,), np.int64)
    view[:] = np.arange(16)
    arena.close()
    print(view.sum())
"""


def test_close_with_views_alive_keeps_their_pages():
    """``close`` while numpy views of the arena live: the pages stay mapped until the views go,
    as ``close`` promises (in a child Python: a view of unmapped pages is a segmentation
    fault)."""
    with Child(_VIEW_AFTER_CLOSE) as child:
        out, err, _ = child.finish(30)
    assert child.returncode == 0, f"exit status {child.returncode}: {err[-2000:]}"
    assert out.strip() == str(sum(range(16)))
