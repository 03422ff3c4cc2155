"""The pool of buffers for fetched bytes (``_sources/scratch.py``): best fit, a bound on what it
keeps, a countdown that gives a buffer back after its last use, nothing kept across a fork."""

from __future__ import annotations

import threading

import numpy as np

from multitables._sources import fetch, scratch
from multitables._sources.scratch import Countdown, Scratch

MIB = 1 << 20


def test_take_rounds_up_and_gives_back_the_smallest_that_fits():
    pool = Scratch(keep_bytes=16 * MIB, granule=MIB)
    small, big = pool.take(10), pool.take(3 * MIB + 1)
    assert (small.nbytes, big.nbytes) == (MIB, 4 * MIB)
    assert small.dtype == np.uint8
    pool.give(big)
    pool.give(small)
    assert pool.kept == 5 * MIB
    assert pool.take(MIB) is small  # the smallest kept that fits
    assert pool.take(2 * MIB) is big  # the only one left, bigger than asked
    assert pool.kept == 0
    fresh = pool.take(MIB)
    assert fresh is not small and fresh is not big


def test_a_small_read_leaves_a_big_buffer_alone():
    # A Loader's unit (90 KB stored) must not hold a buffer made for a Streamer's slot.
    pool = Scratch(keep_bytes=16 * MIB, granule=64 << 10)
    big = pool.take(3 * MIB)
    pool.give(big)
    small = pool.take(90_000)
    assert small is not big and small.nbytes == 128 << 10
    assert pool.kept == big.nbytes
    assert pool.take(int(1.6 * MIB)) is big  # about half its size or more: taken


def test_keeps_no_more_than_its_bound():
    pool = Scratch(keep_bytes=3 * MIB, granule=MIB)
    bufs = [pool.take(MIB) for _ in range(4)]
    for b in bufs:
        pool.give(b)
    assert pool.kept == 3 * MIB  # the fourth was left to the garbage collector
    taken = [pool.take(MIB) for _ in range(3)]
    assert {id(b) for b in taken} == {id(b) for b in bufs[:3]} and pool.kept == 0
    pool.give(bufs[0])
    pool.clear()
    assert pool.kept == 0 and pool.take(1) is not bufs[0]


def test_countdown_gives_the_buffer_back_after_its_last_use_only():
    pool = Scratch()
    buf = pool.take(100)
    done = Countdown(pool, buf, 40)
    threads = [threading.Thread(target=lambda: [done.one_done() for _ in range(10)])
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pool.kept == 0  # 30 of 40 uses over
    for _ in range(9):
        done.one_done()
    assert pool.kept == 0
    done.one_done()
    assert pool.kept == buf.nbytes and pool.take(1) is buf


def test_a_forked_child_keeps_none_of_the_parents_buffers(monkeypatch):
    pool = Scratch()
    monkeypatch.setattr(scratch, "SCRATCH", pool)
    pool.give(pool.take(MIB))
    assert pool.kept == MIB
    fetch._after_fork_in_child()  # the fork hook of the fetchers, as a forked worker runs it
    assert pool.kept == 0
