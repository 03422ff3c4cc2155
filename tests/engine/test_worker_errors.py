"""Errors raised in workers come back to the caller with their type and text: a file damaged
under the readers, an ``OSError`` with its errno."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BIG_ROWS, assert_worker_error, damage, drain_until_error, write_big

import multitables

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_file_damaged_during_a_stream(tmp_path, how):
    """Several workers fail at once: the consumer must get the error, never a quiet end."""
    for attempt in range(5):
        path = tmp_path / f"damaged{attempt}.h5"
        write_big(path)
        queue = multitables.Streamer(path, rdcc_nbytes=0).get_queue(
            "x", n_procs=3, cyclic=True, block_size=64)
        try:
            for _ in range(100):  # every worker has opened the file and is reading
                with queue.get():
                    pass
            damage(path, how)

            def consume(queue=queue, attempt=attempt):
                guard = queue.get()
                assert guard is not multitables.QueueClosed, (
                    f"attempt {attempt}: the stream ended quietly instead of raising")
                with guard:
                    pass

            exc, took = drain_until_error(consume, 5)
            assert_worker_error(exc)
            assert took < 3
        finally:
            queue.close()


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_file_damaged_before_a_request(tmp_path, how):
    path = tmp_path / "damaged.h5"
    truth = write_big(path)
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(BIG_ROWS)
        np.testing.assert_array_equal(reader.request(ds[0:10], stage).get(), truth[0:10])
        damage(path, how)
        exc, _ = drain_until_error(lambda: reader.request(ds[:], stage).get(), 0.01)
        assert_worker_error(exc)
        # A failed read is the request's error: the reader and the stage go on serving. (A
        # worker that opens the file only now, its first request, finds it damaged too.)
        if not reader._closed:
            try:
                rows = reader.request(ds[0:10], stage).get()
            except (OSError, multitables.SubprocessException) as exc:
                assert_worker_error(exc)
            else:
                np.testing.assert_array_equal(rows, truth[0:10])


def test_worker_oserror_keeps_errno_and_filename(tmp_path):
    """An OSError from a worker comes back as one: its type and errno, the file in its text."""
    import errno as errno_codes

    from multitables._engine.errbox import ErrorBox

    box = ErrorBox(bytearray(1 << 14), 0, 1 << 14)
    box.put(FileNotFoundError(errno_codes.ENOENT, "No such file", "/x/y.h5"), "in worker 0")
    exc = box.exception()
    assert isinstance(exc, FileNotFoundError)
    assert exc.errno == errno_codes.ENOENT
    assert "No such file: '/x/y.h5'" in str(exc) and "in worker 0" in str(exc)
