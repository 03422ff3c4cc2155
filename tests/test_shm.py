"""``shm.SharedArena``: memfd shared memory whose pages are reserved when it is made, that has no
name in /dev/shm, and that goes with its last user."""

from __future__ import annotations

import mmap
import os
import pickle

import numpy as np
import pytest
from helpers import Child

from multitables.shm import SharedArena

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("nbytes", [1, mmap.PAGESIZE - 1, mmap.PAGESIZE, 5 * mmap.PAGESIZE + 3,
                                    8 << 20])
def test_a_new_arenas_pages_are_allocated_before_anything_is_written(nbytes):
    """Reserved at creation (fallocate): a shortage is an error now, not a SIGBUS at the first
    write of a worker later. A memfd only sized (ftruncate) holds no blocks at all."""
    arena = SharedArena(nbytes)
    try:
        st = os.fstat(arena.fd)
        assert st.st_size == nbytes
        assert st.st_blocks * 512 >= nbytes, (
            f"{st.st_blocks * 512} of {nbytes} bytes allocated: the pages were not reserved")
    finally:
        arena.close()


def test_an_arena_is_a_zeroed_memfd_with_no_name_in_dev_shm():
    before = set(os.listdir("/dev/shm"))
    arena = SharedArena(3 * mmap.PAGESIZE, name="multitables-test")
    try:
        assert os.readlink(f"/proc/self/fd/{arena.fd}") == "/memfd:multitables-test (deleted)"
        view = arena.ndarray((3 * mmap.PAGESIZE,), np.uint8)
        assert not view.any()
        view[-1] = 7
        assert arena.buffer[-1] == 7
        assert not {n for n in set(os.listdir("/dev/shm")) - before if "multitables" in n}
    finally:
        del view
        arena.close()


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
    from multitables.shm import SharedArena
    arena = SharedArena(4096)
    view = arena.ndarray((16,), np.int64)
    view[:] = np.arange(16)
    arena.close()
    print(view.sum())
"""


def test_close_with_views_alive_keeps_their_pages():
    """``close`` while numpy views of the arena live: the pages stay mapped until the views go
    (in a child Python: an unmapped view is a segmentation fault)."""
    with Child(_VIEW_AFTER_CLOSE) as child:
        out, err, _ = child.finish(30)
    assert child.returncode == 0, f"exit status {child.returncode}: {err[-2000:]}"
    assert out.strip() == str(sum(range(16)))
