"""A Reader closed while its workers hang (stopped with SIGSTOP) returns within one timeout for
all of them, not one per worker, and leaves none behind. The workers are found from outside, as
this process's new children."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import time

import numpy as np
import psutil
import pytest
from helpers import alive_after, drain_rows

import multitables

pytestmark = pytest.mark.timeout(60)

N_PROCS = 3
WAIT = 2.0  # Reader.close(wait=True): "workers may finish the read they are doing (up to 2 s)"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def _small_split(monkeypatch):
    """Reads of a few rows split over the workers: a split read starts every worker it needs
    (a Reader starts its second worker only once the first falls behind)."""
    monkeypatch.setattr(multitables._reader.proxies, "SPLIT_BYTES", 64)


def _hung_reader(path: str, truth: np.ndarray):
    """A Reader whose N_PROCS workers have served a request and are now stopped."""
    before = _children()
    reader = multitables.Reader(path, n_procs=N_PROCS)
    ds = reader.get_dataset("x")
    stage = ds.create_stage(N_PROCS * 64)
    # A read split over the workers (``_small_split``): every worker has a part to read, so
    # every worker is running.
    np.testing.assert_array_equal(reader.request(ds[: N_PROCS * 64], stage).get(),
                                  truth[: N_PROCS * 64])
    pids = sorted(_children() - before)
    assert len(pids) >= N_PROCS, f"found workers {pids}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return reader, pids


@pytest.mark.parametrize("wait, bound", [(True, 1.5 * WAIT), (False, WAIT)])
def test_reader_close_with_hung_workers_takes_one_timeout_not_one_per_worker(data_files, wait,
                                                                             bound):
    """With ``wait`` the workers are given WAIT s in all, then killed: under 1.5 x WAIT for 3
    hung workers (one WAIT each would be 3 x WAIT). Without it, well under WAIT."""
    path, _, truth = data_files
    reader, pids = _hung_reader(path, truth["x"])
    try:
        t0 = time.monotonic()
        reader.close(wait=wait)
        took = time.monotonic() - t0
        assert alive_after(pids, 1) == [], "hung workers outlived close()"
        assert took < bound, f"close(wait={wait}) took {took:.2f} s for {len(pids)} hung workers"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reader.close()


def test_a_hung_reader_dropped_without_close_is_collected(data_files):
    """The same through garbage collection: no hang, no worker left."""
    path, _, truth = data_files
    reader, pids = _hung_reader(path, truth["x"])
    t0 = time.monotonic()
    del reader
    gc.collect()
    assert alive_after(pids, 1.5 * WAIT) == []
    assert time.monotonic() - t0 < 1.5 * WAIT + 1


def test_streamer_close_with_hung_standby_workers_takes_one_timeout(data_files):
    """Workers standing by between queues, then hung: closing the Streamer gives them
    JOIN_TIMEOUT in all before killing them, not JOIN_TIMEOUT each."""
    path, _, truth = data_files
    join_timeout = multitables._engine.timeouts.JOIN_TIMEOUT
    before = _children()
    stream = multitables.Streamer(path)
    try:
        with stream.get_queue("x", n_procs=N_PROCS, ordered=True, remainder=True) as queue:
            np.testing.assert_array_equal(np.concatenate(drain_rows(queue)), truth["x"])
        pids = sorted(_children() - before)  # standing by now, the queue closed
        assert len(pids) == N_PROCS, pids
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        stream.close()
        took = time.monotonic() - t0
        assert alive_after(pids, 1) == [], "hung workers outlived close()"
        assert took < 1.5 * join_timeout, (
            f"Streamer.close() took {took:.2f} s for {len(pids)} hung standby workers")
    finally:
        for pid in _children() - before:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stream.close()
