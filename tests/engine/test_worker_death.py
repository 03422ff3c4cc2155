"""A worker that dies (signal, OOM kill) during a stream or a request is noticed within about a
second and raised as ``SubprocessException`` naming the worker, its pid and its signal, never a
hang (DESIGN.md, failure model)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import numpy as np
import pytest
from helpers import BIG_ROWS, alive_after, drain_until_error

import multitables

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("victim", [0, 1])
def test_worker_killed_during_cyclic_stream(data_files, victim):
    path, _, _ = data_files
    queue = multitables.Streamer(path).get_queue("x", n_procs=2, cyclic=True, block_size=10)
    for _ in range(20):
        with queue.get():
            pass
    pids = [p.pid for p in queue._pool.procs]
    os.kill(pids[victim], signal.SIGKILL)

    def consume():
        with queue.get():
            pass

    exc, took = drain_until_error(consume, 5)
    assert isinstance(exc, multitables.SubprocessException), exc
    assert took < 2, f"noticed after {took:.2f} s"
    msg = str(exc)
    assert f"worker {victim}" in msg and f"pid {pids[victim]}" in msg and "signal 9" in msg, msg
    assert alive_after(pids, 1) == []
    assert queue.get() is multitables.QueueClosed  # closed by the failure
    queue.close()


def test_worker_killed_during_finite_stream(data_files, monkeypatch):
    monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)  # 400 slots of 10 rows
    path, _, truth = data_files
    queue = multitables.Streamer(path).get_queue("x", n_procs=2, block_size=10, ordered=True)
    for i in range(20):
        with queue.get() as block:
            np.testing.assert_array_equal(block, truth["x"][10 * i : 10 * i + 10])
    pids = [p.pid for p in queue._pool.procs]
    os.kill(pids[0], signal.SIGKILL)

    def consume_slowly():  # 400 blocks at 10 ms: the stream outlasts the detection
        guard = queue.get()
        assert guard is not multitables.QueueClosed, "the stream ended without an error"
        with guard:
            time.sleep(0.01)

    exc, took = drain_until_error(consume_slowly, 5)
    assert isinstance(exc, multitables.SubprocessException), exc
    assert took < 2, f"noticed after {took:.2f} s"
    assert f"pid {pids[0]}" in str(exc) and "signal 9" in str(exc)
    assert alive_after(pids, 1) == []


@pytest.mark.parametrize("victim", [0, 1])
def test_worker_killed_then_requests(data_files, victim, monkeypatch):
    """Either worker, the first or the one started later (by a read split over both)."""
    monkeypatch.setattr(multitables._reader.proxies, "SPLIT_BYTES", 64)
    path, _, truth = data_files
    reader = multitables.Reader(path, n_procs=2)
    try:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(100)
        np.testing.assert_array_equal(reader.request(ds[0:5], stage).get(), truth["x"][0:5])
        np.testing.assert_array_equal(reader.request(ds[0:100], stage).get(),
                                      truth["x"][0:100])
        assert len(reader._pool.procs) == 2
        pids = [p.pid for p in reader._pool.procs]
        os.kill(pids[victim], signal.SIGKILL)
        assert alive_after([pids[victim]], 2) == []
        exc, took = drain_until_error(lambda: reader.request(ds[0:50], stage).get(), 5)
        assert isinstance(exc, multitables.SubprocessException), (
            f"requests kept being served for {took:.1f} s by a pool with a dead worker"
        )
        assert took < 2, f"noticed after {took:.2f} s"
        msg = str(exc)
        assert f"worker {victim}" in msg and f"pid {pids[victim]}" in msg and "signal 9" in msg
        assert alive_after(pids, 1) == []
    finally:
        reader.close()


def test_worker_killed_during_a_pending_request(data_files):
    path, _, truth = data_files
    reader = multitables.Reader(path, n_procs=2)
    try:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(BIG_ROWS)
        reader.request(ds[0:5], stage).get()
        pids = [p.pid for p in reader._pool.procs]
        for pid in pids:  # freeze the read half-way: the request stays pending
            os.kill(pid, signal.SIGSTOP)
        request = reader.request(ds[:], stage)
        time.sleep(0.3)
        assert not request.done()
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(multitables.SubprocessException,
                           match=rf"worker 0 \(pid {pids[0]}\).*signal 9"):
            request.get()
        assert time.monotonic() - t0 < 2
        assert alive_after(pids, 2) == []
        with pytest.raises(multitables.QueueClosedException):
            reader.request(ds[0:5], stage)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        reader.close()
