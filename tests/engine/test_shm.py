"""Shared arenas: reserved at creation, passed to workers as descriptors, never named."""

from __future__ import annotations

import os

import pytest

from multitables._engine.shm import SharedArena
from multitables.errors import SharedMemoryError


@pytest.mark.parametrize("nbytes", [1, 4096, 3 * 4096 + 1, 8 << 20])
def test_a_new_arena_has_every_page_reserved(nbytes):
    """fallocate reserves the pages now: a shortage fails at creation, not as SIGBUS later."""
    arena = SharedArena(nbytes)
    try:
        allocated = os.fstat(arena.fd).st_blocks * 512
        assert allocated >= nbytes, f"{allocated} of {nbytes} bytes reserved"
        assert bytes(arena.buffer[:1]) == b"\0" and bytes(arena.buffer[-1:]) == b"\0"
    finally:
        arena.close()


def test_an_arena_larger_than_memory_is_refused_naming_the_size():
    with pytest.raises(SharedMemoryError, match=r"cannot reserve 1152921504606846976 bytes"):
        SharedArena(1 << 60)


def test_an_arena_has_no_name_in_dev_shm():
    before = set(os.listdir("/dev/shm"))
    arena = SharedArena(4096, name="multitables-test-name")
    try:
        assert not any("multitables-test-name" in n for n in set(os.listdir("/dev/shm")) - before)
        assert os.readlink(f"/proc/self/fd/{arena.fd}").startswith("/memfd:multitables-test-name")
    finally:
        arena.close()
