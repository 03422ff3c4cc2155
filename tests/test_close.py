"""close(), garbage collection and use after close: idempotent, bounded when workers hang, and
leaving nothing behind over many cycles."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
from helpers import N_ROWS, Child, alive_after, gone, shm_entries

import multitables

pytestmark = pytest.mark.timeout(60)


@pytest.mark.timeout(30)
def test_close_with_hung_workers_takes_one_join_timeout_not_one_per_worker(data_files):
    """A hung pool (workers stopped) is killed after JOIN_TIMEOUT in all, whatever n_procs is."""
    queue = multitables.Streamer(data_files[0]).get_queue("x", n_procs=3, cyclic=True,
                                                          block_size=10)
    with queue.get():
        pass
    pids = [p.pid for p in queue._pool.procs]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    queue.close()
    took = time.monotonic() - t0
    assert alive_after(pids, 1) == []
    assert took < multitables._engine.timeouts.JOIN_TIMEOUT + 1, f"close() took {took:.1f} s"


# ---- close, garbage collection, interpreter exit, use after close --------------------------


def test_queue_close_is_idempotent_and_get_after_close_is_queue_closed(data_files):
    stream = multitables.Streamer(data_files[0])
    queue = stream.get_queue("x", n_procs=2, cyclic=True, block_size=10)
    guard = queue.get()
    pids = [p.pid for p in queue._pool.procs]
    queue.close()
    queue.close()
    stream.close()
    stream.close()
    assert alive_after(pids, 1) == []
    assert queue.get() is multitables.QueueClosed
    assert queue.get() is multitables.QueueClosed
    assert list(queue.iter()) == []
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        with guard:
            pass
    guard.release()  # harmless after close


def test_closing_a_queue_from_another_thread_wakes_a_blocked_get(data_files):
    queue = multitables.Streamer(data_files[0]).get_queue(
        "x", n_procs=1, cyclic=True, block_size=10, read_ahead=1)
    with queue.get():
        pass
    pid = queue._pool.procs[0].pid
    os.kill(pid, signal.SIGSTOP)  # nothing more will come
    got = []
    thread = threading.Thread(target=lambda: got.append(queue.get()))
    try:
        thread.start()
        time.sleep(0.3)
        threading.Timer(0.1, lambda: os.kill(pid, signal.SIGCONT)).start()
        queue.close()
        thread.join(5)
        assert not thread.is_alive()
        assert got and (got[0] is multitables.QueueClosed or isinstance(got[0], multitables.Guard))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        queue.close()


def test_reader_close_and_stop_are_idempotent_and_use_after_close_raises(data_files):
    path, _, _ = data_files
    reader = multitables.Reader(path, n_procs=2)
    ds = reader.get_dataset("small")
    stage = ds.create_stage(5)
    reader.request(ds[0:5], stage).get()
    pids = [p.pid for p in reader._pool.procs]
    reader.close()
    reader.close()
    reader.stop()
    assert alive_after(pids, 1) == []
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        reader.request(ds[0:5], stage)
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        reader.get_dataset("small")
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        ds.create_stage(5)
    # The stage died with its reader: another reader refuses it.
    with multitables.Reader(path, n_procs=1) as other:
        with pytest.raises(multitables.QueueClosedException, match="stage of /small is closed"):
            other.request(other.get_dataset("small")[0:5], stage)
    stopped = multitables.Reader(path, n_procs=1)
    stopped.request(stopped.get_dataset("small")[0], stopped.get_dataset("small").create_stage(1))
    stopped.stop()
    stopped.stop()
    stopped.close()


_PENDING_THEN_CLOSE = """
    import sys, multitables
    reader = multitables.Reader(sys.argv[1], n_procs=2)
    ds = reader.get_dataset("x")
    stage = ds.create_stage(4000)
    request = reader.request(ds[:], stage)
    reader.close()
    for name, call in [("done", request.done), ("get", request.get)]:
        try:
            call()
            print(name, "returned")
        except multitables.QueueClosedException as exc:
            print(name, "QueueClosedException", exc)
        except Exception as exc:
            print(name, type(exc).__name__, exc)
"""


def test_pending_request_of_a_closed_reader_raises_not_crashes(data_files):
    with Child(_PENDING_THEN_CLOSE, data_files[0]) as child:
        out, err, _ = child.finish(30)
    assert child.returncode == 0, f"child died with {child.returncode}:\n{err[-3000:]}"
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["get"].startswith("QueueClosedException"), out


def test_dropped_queue_and_reader_are_collected(data_files):
    path, _, _ = data_files
    queue = multitables.Streamer(path).get_queue("x", n_procs=2, cyclic=True, block_size=10)
    with queue.get():
        pass
    qpids = [p.pid for p in queue._pool.procs]
    del queue
    gc.collect()
    assert alive_after(qpids, 1) == []
    reader = multitables.Reader(path, n_procs=2)
    ds = reader.get_dataset("small")
    reader.request(ds[0:5], ds.create_stage(5)).get()
    rpids = [p.pid for p in reader._pool.procs]
    del reader, ds
    gc.collect()
    assert alive_after(rpids, 2) == []


# ---- no leaks over many cycles ------------------------------------------------------------


@pytest.mark.timeout(90)
def test_many_create_use_close_cycles_leak_nothing(data_files):
    path, _, truth = data_files
    me = psutil.Process()
    stream = multitables.Streamer(path)

    def cycle(i):
        n_procs = 1 + i % 2
        with stream.get_queue("small", n_procs=n_procs, block_size=10, ordered=True) as queue:
            with queue.get() as block:
                np.testing.assert_array_equal(block, truth["small"][:10])
        with multitables.Reader(path, n_procs=n_procs) as reader:
            ds = reader.get_dataset("small")
            np.testing.assert_array_equal(
                reader.request(ds[[i % N_ROWS, 3]], ds.create_stage(2)).get(),
                truth["small"][[i % N_ROWS, 3]],
            )

    def snapshot():
        gc.collect()
        children = [p for p in me.children(recursive=True) if not gone(p.pid)]
        return dict(children=len(children), threads=threading.active_count(),
                    fds=me.num_fds(), shm=len(shm_entries()), rss=me.memory_info().rss)

    for i in range(20):
        cycle(i)
    time.sleep(0.2)
    before = snapshot()
    t0 = time.monotonic()
    for i in range(200):
        cycle(i)
    took = time.monotonic() - t0
    time.sleep(0.2)
    after = snapshot()
    for key in ("children", "threads", "fds", "shm"):
        assert after[key] <= before[key], f"{key}: {before[key]} -> {after[key]}"
    growth = (after["rss"] - before["rss"]) / 2**20
    assert growth < 20, f"RSS grew by {growth:.1f} MiB over 200 cycles"
    assert took < 60
