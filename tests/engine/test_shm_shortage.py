"""Shared memory that runs out: an error naming the size needed, raised at creation, never a
SIGBUS later and never a reservation that runs until the machine is out of memory."""

from __future__ import annotations

import contextlib
import errno
import re
import resource
import signal
import time

import h5py
import pytest
from helpers import BIG_COLS, Child

import multitables

pytestmark = pytest.mark.timeout(60)


_FSIZE_LIMITED = """
    import re, resource, signal, sys, multitables
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    path = sys.argv[1]
    try:
        multitables.Streamer(path).get_queue("x", n_procs=1, block_size=2000, read_ahead=4)
        print("queue: no error")
    except multitables.SharedMemoryError as exc:
        print("queue:", str(exc).replace("\\n", " "))
    with multitables.Reader(path, n_procs=1) as reader:
        ds = reader.get_dataset("x")
        try:
            ds.create_stage(2000)
            print("stage: no error")
        except multitables.SharedMemoryError as exc:
            print("stage:", str(exc).replace("\\n", " "))
        small = ds.create_stage(10)  # what fits still works
        print("small:", reader.request(ds[0:10], small).get().shape)
"""


def _bytes_named(message: str) -> int:
    numbers = [int(n) for n in re.findall(r"(\d+) bytes", message)]
    assert numbers, message
    return max(numbers)


@pytest.mark.timeout(40)
def test_shared_memory_shortage_is_an_error_not_sigbus(data_files):
    with Child(_FSIZE_LIMITED, data_files[0]) as child:
        out, err, _ = child.finish(30)
    assert child.returncode == 0, f"child died with {child.returncode}:\n{err[-3000:]}"
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    slot_bytes = 2000 * BIG_COLS * 4
    assert _bytes_named(lines["queue"]) >= 4 * slot_bytes, lines["queue"]
    assert _bytes_named(lines["stage"]) >= slot_bytes, lines["stage"]
    assert lines["small"] == "(10, 256)"


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """A safety net: no memfd of this process can grow beyond ``nbytes`` (ftruncate fails with
    EFBIG). Needed because fallocate on a memfd does not fail fast: asked for a terabyte it
    reserves pages at gigabytes a second until the machine runs out (tried on the test machine;
    only SIGKILL interrupts it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _refused_by_itself(exc: BaseException) -> bool:
    """False when only the safety net (EFBIG from ftruncate) stopped the reservation."""
    cause = exc.__cause__
    return not (isinstance(cause, OSError) and cause.errno == errno.EFBIG)


@pytest.mark.timeout(30)
def test_absurd_sizes_raise_shared_memory_error_quickly(tmp_path):
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:  # rows of 1 MiB, nothing stored
        f.create_dataset("x", shape=(4, 1 << 18), dtype="f4", chunks=(1, 1 << 18))
    t0 = time.monotonic()
    with _file_size_limit(4 << 30):
        with pytest.raises(multitables.SharedMemoryError, match=r"\d{13} bytes") as queue_error:
            multitables.Streamer(path).get_queue("x", n_procs=1, block_size=1,
                                                 read_ahead=10**6)
        with multitables.Reader(path, n_procs=1) as reader:
            ds = reader.get_dataset("x")
            with pytest.raises(multitables.SharedMemoryError, match=r"\d{13} bytes") as stage_error:
                ds.create_stage(10**6)
    assert time.monotonic() - t0 < 5
    assert _bytes_named(str(queue_error.value)) >= 10**6 * (1 << 20)
    assert _bytes_named(str(stage_error.value)) >= 10**6 * (1 << 20)
    for exc in (queue_error.value, stage_error.value):
        assert _refused_by_itself(exc), (
            "only the test's RLIMIT_FSIZE net stopped a 1 TB reservation; without it the "
            f"library would have fallocated until the machine ran out of memory: {exc}"
        )
