"""close() from another thread wakes a get() blocked on an empty queue at once, not at its next
check for a closed queue (a slice of workers.WAIT_SLICE): the ring's stop closes the queue the
consumer sleeps on."""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time

import psutil
import pytest

import multitables

pytestmark = pytest.mark.timeout(60)

TRIALS = 7


def _wake_delay(path: str) -> float:
    """Seconds from the start of close() in this thread to the end of a get() that another
    thread had been blocked in, on a queue whose only worker is stopped."""
    # Blocks of a MiB (1024 rows of 1 KiB): one block per slot, so the slot taken below is the
    # only block there is until the worker fills another.
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    queue = multitables.Streamer(path).get_queue("x", n_procs=1, cyclic=True, block_size=1024,
                                                 read_ahead=1)
    (pid,) = {p.pid for p in psutil.Process().children(recursive=True)} - before  # its worker
    with queue.get():  # the one slot is ours: the worker has none to fill
        os.kill(pid, signal.SIGSTOP)  # and when it has, it is stopped: the next get() sleeps
    returned: list[float] = []
    thread = threading.Thread(target=lambda: (queue.get(), returned.append(time.monotonic())))
    try:
        thread.start()
        time.sleep(0.25)  # asleep in the queue by now
        # Let the worker go on once close() has begun, so that close() need not wait out a
        # stopped worker (what the get() does in the meantime is what is measured).
        threading.Timer(0.05, _continue, (pid,)).start()
        t0 = time.monotonic()
        queue.close()
        thread.join(5)
        assert not thread.is_alive() and returned, "close() did not wake the blocked get()"
        assert returned[0] > t0, "the get() did not block: the test's premise failed"
        return returned[0] - t0
    finally:
        _continue(pid)
        queue.close()


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_close_wakes_a_blocked_get_at_once(data_files):
    slice_ = multitables._engine.timeouts.WAIT_SLICE
    delays = [_wake_delay(data_files[0]) for _ in range(TRIALS)]
    # At once: a few milliseconds. Woken by its own slice instead: slice_ / 2 on average.
    assert statistics.median(delays) < slice_ / 4, (
        f"median wake-up {statistics.median(delays) * 1e3:.1f} ms after close(); delays (ms) "
        f"{[round(d * 1e3, 1) for d in delays]}")
