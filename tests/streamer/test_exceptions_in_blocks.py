"""An exception inside the blocks that hold shared memory (a queue's guard, a request's result)
releases what it holds: the queue and the stage keep working."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import multitables

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt, GeneratorExit])
def test_exception_in_guard_releases_the_only_slot(data_files, monkeypatch, exc_type):
    monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)  # one block per slot
    path, _, truth = data_files
    data = truth["x"]
    with multitables.Streamer(path).get_queue(
        "x", n_procs=2, read_ahead=1, block_size=10, ordered=True, cyclic=True
    ) as queue:
        for i in range(5):
            with pytest.raises(exc_type):
                with queue.get() as block:
                    np.testing.assert_array_equal(block, data[10 * i : 10 * i + 10])
                    raise exc_type("inside the guard")
        guard = queue.get()  # taken, never entered, dropped: released too
        del guard
        gc.collect()
        for i in range(6, 9):
            with queue.get() as block:
                np.testing.assert_array_equal(block, data[10 * i : 10 * i + 10])


@pytest.mark.parametrize("method", ["get_unsafe", "get_proxy", "get_direct"])
@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt])
def test_exception_in_result_block_frees_the_stage(data_files, method, exc_type):
    path, _, truth = data_files
    with multitables.Reader(path, n_procs=1) as reader:
        ds = reader.get_dataset("small")
        pool = ds.create_stage_pool(10, 1)  # one stage: a leak would block the next request

        def boom(result):
            raise exc_type("inside the block")

        for i in range(3):
            request = reader.request(ds[i : i + 10], pool)
            with pytest.raises(exc_type):
                if method == "get_direct":
                    request.get_direct(boom)
                else:
                    with getattr(request, method)() as result:
                        boom(result)
        got = reader.request(ds[[5, 1]], pool).get()
        np.testing.assert_array_equal(got, truth["small"][[5, 1]])
