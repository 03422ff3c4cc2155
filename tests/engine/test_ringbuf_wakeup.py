"""A consumer asleep in ``SlotQueue.pop`` is woken by the push it waits for, however close to its
falling asleep the push comes: no wake-up is lost between its look at the queue and its sleep."""

from __future__ import annotations

import mmap
import os
import time

import pytest
from helpers import forked_results

from multitables._engine._ringbuf import SlotQueue, Word

PLAY_S = 1.5  # rounds (one push each, timed to land as the consumer goes to sleep) for so long
POP_TIMEOUT = 5.0  # what a lost wake-up costs: the consumer sleeps until its timeout
WOKEN_WITHIN = 1.0  # a liveness bound, far above any wake-up, far below the timeout
STOP = 0xFFFFFFFF


def _consumer(buf, cpu, results) -> None:
    """Pop items for PLAY_S s, each after telling the producer to push it; stop at the first
    pop that took WOKEN_WITHIN or more. Reports (rounds done, the slowest round, its seconds).
    A lost wake-up needs the push to land in a window of a few instructions: about one round
    in a thousand or ten thousand, so the rounds are many (some 100,000 a second)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    turn, queue = Word(buf, 0), SlotQueue(buf, 64, 4)
    slowest, slowest_s, done = -1, 0.0, 0
    end = time.monotonic() + PLAY_S
    try:
        for i in range(1, STOP):
            turn.set(i)  # no futex call: the producer spins on the word
            for _ in range(i % 7):  # shifts the pop against the push, a few ns a step
                pass
            t0 = time.monotonic()
            got = queue.pop(POP_TIMEOUT)
            took = time.monotonic() - t0
            if took > slowest_s:
                slowest, slowest_s = i, took
            if got != i or took >= WOKEN_WITHIN:
                break
            done = i
            if t0 > end:
                break
    finally:
        turn.set(STOP)
        results.put((done, slowest, slowest_s))


def _producer(buf, cpu, results) -> None:
    """Push item i as soon as the consumer says it is about to pop it."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    turn, queue = Word(buf, 0), SlotQueue(buf, 64, 4)
    pushed = 0
    try:
        for i in range(1, STOP):
            while (seen := turn.load()) != i:
                if seen == STOP:
                    return
            for _ in range(i // 7 % 3):  # and the push against the pop
                pass
            queue.push(i)
            pushed = i
    finally:
        results.put(pushed)


@pytest.mark.timeout(60)
def test_a_push_as_the_consumer_falls_asleep_wakes_it():
    """Bug guarded: the queue's pop reads the wake-up counter (the epoch it sleeps on) after it
    has checked the queue, so a push in between bumps the counter before it is read: the push's
    wake-up finds no sleeper and the consumer then sleeps on the new value until its wait slice
    ends (a latency spike of a whole slice on every such race). A producer on another CPU
    pushes each item just as the consumer pops it, at shifting offsets, for many rounds; every
    pop must return soon after its push, never near its timeout."""
    cpus = sorted(os.sched_getaffinity(0))
    # Two CPUs make the race real: on one, the producer runs only once the consumer sleeps.
    consumer_cpu, producer_cpu = (cpus[0], cpus[1]) if len(cpus) > 1 else (None, None)
    buf = mmap.mmap(-1, 64 + SlotQueue.nbytes(4))
    Word(buf, 0).set(0)
    SlotQueue(buf, 64, 4, True)
    t0 = time.monotonic()
    results = forked_results(lambda role, *a: role(buf, *a),
                             [(_consumer, consumer_cpu), (_producer, producer_cpu)],
                             timeout=POP_TIMEOUT + 40)
    took = time.monotonic() - t0
    (done, slowest, slowest_s), = [r for r in results if isinstance(r, tuple)]
    assert slowest_s < WOKEN_WITHIN, (
        f"pop {slowest} took {slowest_s:.2f} s (timeout {POP_TIMEOUT} s) although its item was "
        f"pushed at once: a lost wake-up ({done} rounds before it, {took:.1f} s in all)")
    # How many rounds fit in PLAY_S depends on the machine's load (some 100,000 when idle): no
    # bound on it, a busy machine must not fail the test.
    assert done >= 1
