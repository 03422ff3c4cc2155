"""The ring's queue under stress: a producer in a forked process, stopped (SIGSTOP) at whatever
instruction it is running tens of thousands of times a second while the consumer drains the queue;
every item must arrive once, in order.

A push that published its sequence number before its value would, stopped between the two stores,
hand the consumer the value of the cell's previous lap. Interruptions land in that two-instruction
window rarely (3 runs of this test against that bug found it 0 times, another run once):
test_ring_ordering.py catches that bug every time by single-stepping the push; this test keeps the
ring honest under interruption as a whole.

Marked ``stress`` (CI runs it; ``pytest -m stress`` alone); about ten seconds.
"""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import time

import pytest

from multitables._engine._ringbuf import TIMEOUT, SlotQueue

pytestmark = [pytest.mark.stress, pytest.mark.timeout(60)]

SECONDS = 8.0
N_ITEMS = 64  # a lap of the queue between a cell's two values: the stale one is easy to tell


def _produce(buf) -> None:
    q = SlotQueue(buf, 64, N_ITEMS)
    push = q.push
    value = 0
    while True:  # until killed: pushes 1, 2, 3, ...
        value += 1
        while True:
            try:
                push(value)
                break
            except OverflowError:  # full: the consumer is behind
                time.sleep(0)


def test_consumer_never_sees_a_value_before_it_is_written():
    """Every value popped is the one after the last: none from a cell's previous lap."""
    buf = mmap.mmap(-1, 64 + SlotQueue.nbytes(N_ITEMS))
    q = SlotQueue(buf, 64, N_ITEMS, True)
    producer = multiprocessing.get_context("fork").Process(target=_produce, args=(buf,))
    producer.start()
    last = stops = 0
    wrong: list[tuple[int, int]] = []  # (expected, got)
    try:
        # Let it start (a new process stopped every few microseconds may never get through its
        # start-up), then stop it again and again.
        started = time.monotonic()
        while len(q) == 0 and time.monotonic() - started < 10:
            time.sleep(0.001)
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline and len(wrong) < 10:
            # Stop it where it is (a signal interrupts it between any two instructions), take
            # what it has published, let it go on.
            os.kill(producer.pid, signal.SIGSTOP)
            os.waitpid(producer.pid, os.WUNTRACED)  # stopped now (a SIGCONT would cancel it)
            stops += 1
            while (item := q.try_pop()) != TIMEOUT:
                if item != last + 1:
                    wrong.append((last + 1, item))
                last = item
            os.kill(producer.pid, signal.SIGCONT)
            resumed = time.perf_counter()
            while time.perf_counter() - resumed < 20e-6:  # a few pushes before the next stop
                pass
    finally:
        producer.kill()
        producer.join(10)
    assert not wrong, (
        f"{len(wrong)} items out of sequence after {last} items and {stops} stops, e.g. "
        f"(expected, got) {wrong[:5]}: a pop read a cell's value before its push wrote it"
    )
    assert last > 100_000 and stops > 10_000, f"too little stress: {last} items, {stops} stops"
