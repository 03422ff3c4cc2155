"""Streams and requests under every start method (fork, forkserver, spawn): what a worker needs
pickles, and idle workers wait for work."""

from __future__ import annotations

import time

import numpy as np
import pytest
from helpers import BIG_ROWS, N_ROWS

import multitables

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def mp_helpers():
    """multiprocessing's own long-lived helpers (the fork server, the resource tracker), started
    before the no-leak fixture looks, since they outlive every test by design."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()


def _take(queue, n: int) -> list[np.ndarray]:
    blocks = []
    for _ in range(n):
        guard = queue.get()
        assert guard is not multitables.QueueClosed, f"the stream ended after {len(blocks)} blocks"
        with guard as block:
            blocks.append(block.copy())
    return blocks


def _assert_workers_wait(pool, idle: float = 0.5) -> None:
    """Idle workers must wait for work, not leave (a stream would then stall for ever)."""
    time.sleep(idle)
    gone = [(p.pid, p.exitcode) for p in pool.procs if not p.is_alive()]
    assert not gone, f"workers (pid, exit code) {gone} left after {idle} s idle"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_start_methods(data_files, method, mp_helpers, monkeypatch):
    monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)  # many small slots
    path, tables_path, truth = data_files
    with multitables.Streamer(path, start_method=method) as stream:
        with stream.get_queue("x", n_procs=2, block_size=100, ordered=True, read_ahead=2,
                              remainder=True) as queue:
            blocks = _take(queue, 5)
            _assert_workers_wait(queue._pool)
            blocks += _take(queue, BIG_ROWS // 100 - 5)
            assert queue.get() is multitables.QueueClosed
    np.testing.assert_array_equal(np.concatenate(blocks), truth["x"])
    with multitables.Streamer(tables_path, start_method=method) as stream:
        with stream.get_queue("/table", n_procs=2, block_size=13, ordered=True, field="vec",
                              remainder=True) as queue:
            blocks = _take(queue, -(-N_ROWS // 13))
    np.testing.assert_array_equal(np.concatenate(blocks), truth["table"]["vec"])
    with multitables.Reader(tables_path, n_procs=2, start_method=method) as reader:
        table = reader.get_dataset("/table")
        stage = table.create_stage(N_ROWS)
        key = [50, 3, 50, 96]
        np.testing.assert_array_equal(reader.request(table[key], stage).get(), truth["table"][key])
        _assert_workers_wait(reader._pool)
        np.testing.assert_array_equal(reader.request(table[10:40:3], stage).get(),
                                      truth["table"][10:40:3])
        image = table["image"]
        np.testing.assert_array_equal(reader.request(image[[7, 1], 2], stage).get(),
                                      truth["table"]["image"][[7, 1], 2])
        carray = reader.get_dataset("/carray")
        np.testing.assert_array_equal(
            reader.request(carray[::-7], carray.create_stage(N_ROWS)).get(),
            truth["carray"][::-7])
