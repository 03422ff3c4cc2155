"""The Cython ring primitives, against a deque model and across real processes."""

from __future__ import annotations

import collections
import mmap
import multiprocessing
import threading
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from multitables._engine._ringbuf import CLOSED, TIMEOUT, Counter, SlotQueue, Word

pytestmark = pytest.mark.timeout(60)


def make_queue(n_items: int, offset: int = 64):
    buf = mmap.mmap(-1, offset + SlotQueue.nbytes(n_items))
    return buf, SlotQueue(buf, offset, n_items, True)


class QueueMachine(RuleBasedStateMachine):
    """A SlotQueue must behave as a bounded FIFO: a deque of the same capacity is the model."""

    capacity = 6

    def __init__(self):
        super().__init__()
        self.buf, self.queue = make_queue(self.capacity)
        self.model: collections.deque[int] = collections.deque()

    @precondition(lambda self: len(self.model) < self.capacity)
    @rule(value=st.integers(min_value=0, max_value=2**62))
    def push(self, value):
        self.queue.push(value)
        self.model.append(value)

    @rule()
    def try_pop(self):
        expected = self.model.popleft() if self.model else TIMEOUT
        assert self.queue.try_pop() == expected

    @rule()
    def pop_with_timeout(self):
        expected = self.model.popleft() if self.model else TIMEOUT
        assert self.queue.pop(0.001) == expected

    @invariant()
    def same_length(self):
        assert len(self.queue) == len(self.model)


QueueMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
test_queue_matches_deque = QueueMachine.TestCase


def test_nbytes_rounds_capacity_up_to_a_power_of_two():
    assert SlotQueue.nbytes(5) == SlotQueue.nbytes(8) < SlotQueue.nbytes(9)
    assert SlotQueue.nbytes(1) % 64 == 0


def test_close_drains_then_reports_closed():
    _, q = make_queue(4)
    q.push(7)
    q.close()
    assert q.pop(1.0) == 7
    assert q.pop(1.0) == CLOSED


def test_pop_times_out_when_empty():
    _, q = make_queue(2)
    start = time.monotonic()
    assert q.pop(0.05) == TIMEOUT
    assert 0.04 < time.monotonic() - start < 1.0


def test_push_rejects_negative_and_overflow():
    _, q = make_queue(1)
    with pytest.raises(ValueError, match="non-negative"):
        q.push(-3)
    for i in range(4):  # the smallest capacity
        q.push(i)
    with pytest.raises(OverflowError, match="full"):
        q.push(5)
    assert [q.pop(0.1) for _ in range(4)] == [0, 1, 2, 3]


def test_single_item_queue_keeps_fifo_semantics():
    """A queue sized for one item must not accept a second push over the first."""
    _, q = make_queue(1)
    q.push(1)
    q.push(2)
    assert q.pop(0.1) == 1
    assert q.pop(0.1) == 2
    assert q.pop(0.01) == TIMEOUT


def test_offset_must_fit_and_be_aligned():
    buf = mmap.mmap(-1, 4096)
    with pytest.raises(ValueError, match="aligned"):
        SlotQueue(buf, 8, 4, True)
    with pytest.raises(ValueError, match="do not fit"):
        SlotQueue(buf, 4096 - 64, 4, True)


def test_sleeping_pop_is_woken_by_push_from_another_thread():
    _, q = make_queue(2)
    got = []
    t = threading.Thread(target=lambda: got.append(q.pop(5.0)))
    t.start()
    time.sleep(0.05)
    q.push(42)
    t.join(5)
    assert got == [42]



def _pop_in_thread(q, timeout, want):
    got = []
    t = threading.Thread(target=lambda: got.append(q.pop(timeout, want)), daemon=True)
    t.start()
    return t, got


def test_pop_wanting_several_takes_a_queued_item_at_once():
    _, q = make_queue(4)
    q.push(5)
    start = time.monotonic()
    assert q.pop(5.0, 3) == 5
    assert time.monotonic() - start < 1.0


def test_pop_wanting_two_sleeps_until_the_second_push():
    _, q = make_queue(4)
    t, got = _pop_in_thread(q, 30.0, 2)
    time.sleep(0.05)
    q.push(1)
    t.join(0.2)
    assert t.is_alive() and got == []  # one item does not wake it
    q.push(2)
    t.join(5)
    assert got == [1] and q.pop(0.0) == 2


def test_pop_wanting_two_takes_what_is_queued_when_it_times_out():
    _, q = make_queue(4)
    t, got = _pop_in_thread(q, 0.3, 2)
    time.sleep(0.05)
    q.push(9)
    t.join(5)
    assert got == [9]


def test_close_wakes_a_pop_wanting_several():
    _, q = make_queue(4)
    t, got = _pop_in_thread(q, 30.0, 3)
    time.sleep(0.05)
    q.push(4)
    q.close()
    t.join(5)
    assert got == [4] and q.pop(1.0) == CLOSED
    with pytest.raises(ValueError, match="want"):
        q.pop(0.0, 0)


def test_word_wait_and_compare_exchange():
    buf = mmap.mmap(-1, 4096)
    w = Word(buf, 128)
    assert w.load() == 0
    assert not w.wait_while(0, 0.01)
    assert w.compare_exchange(0, 3)
    assert not w.compare_exchange(0, 4)
    assert w.wait_while(0, 0.01)
    threading.Timer(0.05, lambda: w.store(9)).start()
    assert w.wait_while(3, 5.0)
    assert w.load() == 9


def test_counter_hands_out_distinct_tickets_across_threads():
    buf = mmap.mmap(-1, 4096)
    c = Counter(buf, 64)
    seen = []

    def take():
        seen.extend(c.fetch_add() for _ in range(2000))

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == list(range(8000))
    assert c.load() == 8000


def _producer(buf, offset, n_items, first, count):
    q = SlotQueue(buf, offset, n_items)
    for i in range(first, first + count):
        while True:
            try:
                q.push(i)
                break
            except OverflowError:
                time.sleep(0)


def test_producers_and_consumers_across_fork():
    """Two forked producers, two consumer threads: every item arrives exactly once."""
    n_items, per_producer = 64, 20_000
    buf, q = make_queue(n_items)
    ctx = multiprocessing.get_context("fork")
    producers = [
        ctx.Process(target=_producer, args=(buf, 64, n_items, k * per_producer, per_producer))
        for k in range(2)
    ]
    got: list[list[int]] = [[], []]

    def consume(out):
        while True:
            item = q.pop(0.1)
            if item == CLOSED:
                return
            if item >= 0:
                out.append(item)

    consumers = [threading.Thread(target=consume, args=(got[k],)) for k in range(2)]
    for p in producers:
        p.start()
    for t in consumers:
        t.start()
    for p in producers:
        p.join(30)
        assert p.exitcode == 0
    deadline = time.monotonic() + 30
    while len(q) and time.monotonic() < deadline:
        time.sleep(0.01)
    q.close()
    for t in consumers:
        t.join(30)
    items = got[0] + got[1]
    assert sorted(items) == list(range(2 * per_producer))
    # Each producer's items leave the FIFO in the order they went in.
    for k in range(2):
        for out in got:
            mine = [i for i in out if k * per_producer <= i < (k + 1) * per_producer]
            assert mine == sorted(mine)
