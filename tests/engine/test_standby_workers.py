"""Workers standing by between the queues of a Streamer: replaced when killed while idle, an
error when killed in a later queue, untouched by copies closed in a forked child, still serving
after a read error."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal

import numpy as np
import pytest
from helpers import (
    alive_after,
    assert_worker_error,
    damage,
    drain_rows,
    drain_until_error,
    write_big,
)

import multitables

pytestmark = pytest.mark.timeout(60)


@pytest.mark.timeout(60)
def test_a_standby_worker_killed_while_idle_is_replaced(data_files):
    with multitables.Streamer(data_files[0]) as stream:
        with stream.get_queue("x", n_procs=2, ordered=True) as queue:
            pids = [p.pid for p in queue._pool.procs]
            drain_rows(queue)
        os.kill(pids[0], signal.SIGKILL)
        assert alive_after([pids[0]], 5) == []
        with stream.get_queue("x", n_procs=2, ordered=True, remainder=True) as queue:
            now = [p.pid for p in queue._pool.procs]
            got = np.concatenate(drain_rows(queue))
    assert pids[0] not in now and pids[1] in now
    np.testing.assert_array_equal(got, data_files[2]["x"])


@pytest.mark.timeout(60)
def test_a_standby_worker_killed_in_a_later_queue_raises(data_files):
    with multitables.Streamer(data_files[0]) as stream:
        with stream.get_queue("x", n_procs=2) as queue:
            drain_rows(queue)
        queue = stream.get_queue("x", n_procs=2, cyclic=True, block_size=64)
        with queue.get():
            pass
        victim = queue._pool.procs[1].pid
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(multitables.SubprocessException, match=f"pid {victim}"):
            for _ in range(100_000):
                with queue.get():
                    pass
        queue.close()
        with stream.get_queue("x", n_procs=2, ordered=True, remainder=True) as queue:
            got = np.concatenate(drain_rows(queue))
    np.testing.assert_array_equal(got, data_files[2]["x"])


def _close_copies(streamer, queue, reader) -> None:
    """In a forked child (a DataLoader worker, say): close the copies it inherited, as garbage
    collection or an exit hook there would."""
    queue.close()
    reader.close()
    streamer.close()


@pytest.mark.timeout(60)
def test_copies_closed_in_a_forked_child_leave_the_owners_workers_alone(data_files):
    path, _, truth = data_files
    streamer = multitables.Streamer(path)
    queue = streamer.get_queue("x", n_procs=2, ordered=True, remainder=True)
    pids = sorted(p.pid for p in queue._pool.procs)
    with queue.get() as block:
        head = block.copy()
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(10)
        child = multiprocessing.get_context("fork").Process(
            target=_close_copies, args=(streamer, queue, reader))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        np.testing.assert_array_equal(reader.request(ds[5:15], stage).get(), truth["x"][5:15])
    rest = drain_rows(queue)  # the stream went on: the child's copy did not stop it
    np.testing.assert_array_equal(np.concatenate([head, *rest]), truth["x"])
    queue.close()
    with streamer.get_queue("x", n_procs=2) as queue:
        assert sorted(p.pid for p in queue._pool.procs) == pids  # still standing by
    streamer.close()


@pytest.mark.timeout(30)
def test_a_queue_whose_workers_failed_to_start_leaves_nothing_to_close_at_exit(data_files,
                                                                              monkeypatch):
    def fail(self, job, n_procs):
        raise OSError(errno.EAGAIN, "fork: Resource temporarily unavailable")

    monkeypatch.setattr(multitables._engine.pool.StandbyWorkers, "run", fail)
    with pytest.raises(OSError, match="fork") as failure:
        multitables.Streamer(data_files[0]).get_queue("x", n_procs=2)
    assert failure.traceback  # keeps the half-made queue alive, as a logged traceback would
    multitables._engine.hooks.close_at_exit("queues")  # the interpreter's exit hook: no raise


@pytest.mark.timeout(60)
def test_workers_that_reported_a_read_error_serve_the_next_queue(tmp_path):
    path = tmp_path / "damaged.h5"
    truth = write_big(path)
    with multitables.Streamer(path, rdcc_nbytes=0) as stream:
        queue = stream.get_queue("x", n_procs=2, cyclic=True, block_size=64)
        pids = sorted(p.pid for p in queue._pool.procs)
        with queue.get():
            pass
        damage(path, "garbage")

        def consume():
            with queue.get():
                pass

        exc, _ = drain_until_error(consume, 5)
        assert_worker_error(exc)
        queue.close()
        os.remove(path)
        write_big(path)  # the same data again, in a new file
        with stream.get_queue("x", n_procs=2, ordered=True, remainder=True) as queue:
            assert sorted(p.pid for p in queue._pool.procs) == pids
            got = np.concatenate(drain_rows(queue))
    np.testing.assert_array_equal(got, truth)
