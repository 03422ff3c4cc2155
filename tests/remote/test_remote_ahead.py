"""Slots read ahead over a URL (``_hdf5/remoteahead.py``): a Loader's units and a Streamer's
slots equal the local file's, share their GETs, and fail with the local file's errors (a corrupt
chunk named, an object replaced, a server that stops answering), never a hang."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import multitables
from multitables.errors import ObjectChangedError, SourceTimeoutError

pytestmark = pytest.mark.timeout(60)

AHEAD_NAME = "ahead.h5"
N = 2000


@pytest.fixture
def served(http):
    """``(server, local path, truth)``: a file of ``N`` rows in the server's folder: ``a``
    uint8 gzip+shuffle in chunks of 70 rows, ``b`` int32 gzip+shuffle in chunks of 50 (a unit
    of ``b``'s chunks reads ``a``'s in part), ``c`` unfiltered in chunks of 64, ``d``
    contiguous."""
    rng = np.random.default_rng(5)
    truth = {"a": rng.integers(0, 9, (N, 40), dtype=np.uint8),
             "b": np.cumsum(rng.integers(-2, 3, (N, 16)), axis=1).astype(np.int32),
             "c": rng.random((N, 8), dtype=np.float32),
             "d": np.arange(N, dtype=np.int64) * 3}
    path = http.root / AHEAD_NAME
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=truth["a"], chunks=(70, 40), compression="gzip",
                         shuffle=True)  # of 1-byte elements: no byte moves
        f.create_dataset("b", data=truth["b"], chunks=(50, 16), compression="gzip",
                         shuffle=True)
        f.create_dataset("c", data=truth["c"], chunks=(64, 8))
        f.create_dataset("d", data=truth["d"])
    return http, str(path), truth


def _gets(server) -> int:
    return sum(1 for method, *_ in server.log if method == "GET")


def test_loader_units_equal_the_local_files_and_share_gets(served):
    server, path, truth = served
    columns = ["a", "b", "c", "d"]
    kw = dict(batch_size=128, shuffle=True, seed=2, n_procs=2)
    with multitables.Loader(path, columns, **kw) as here, \
            multitables.Loader(server.url(AHEAD_NAME), columns, **kw) as there:
        assert there.unit_rows == 50  # b's chunks: a's are read in part
        n_units = -(-N // there.unit_rows)
        for _ in range(2):  # the second epoch: the workers' jobs start again
            before = _gets(server)
            got = list(there)
            for a, b in zip(list(here), got, strict=True):
                for x, y in zip(a, b, strict=True):
                    np.testing.assert_array_equal(x, y)
            # Four datasets, 40 units: a GET per unit and dataset read one by one; read
            # ahead, the units a worker takes at once share their GETs.
            assert _gets(server) - before < n_units
    rows = np.concatenate([batch[3] for batch in got]) // 3
    np.testing.assert_array_equal(np.sort(rows), np.arange(N))


def test_streamer_slots_equal_the_local_files_cyclic_and_not(served):
    server, _, truth = served
    with multitables.Streamer(server.url(AHEAD_NAME)) as streamer:
        for path in ("a", "b", "c"):
            with streamer.get_queue(path, n_procs=2, block_size=33, ordered=True,
                                    remainder=True) as q:
                blocks = [g.__enter__().copy() for g in q.iter()]
            np.testing.assert_array_equal(np.concatenate(blocks), truth[path])
        # Cyclic: a slot that wraps is two pieces of rows.
        with streamer.get_queue("b", n_procs=2, block_size=300, cyclic=True,
                                ordered=True) as q:
            got = []
            for guard in q.iter():
                with guard as block:
                    got.append(block.copy())
                if len(got) == 9:
                    break
        np.testing.assert_array_equal(np.concatenate(got),
                                      np.take(truth["b"], np.arange(9 * 300), axis=0,
                                              mode="wrap"))


def test_a_corrupt_chunk_over_a_url_is_named_as_in_a_local_file(served):
    server, path, _ = served
    with h5py.File(path, "r") as f:
        info = f["a"].id.get_chunk_info(12)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)
    url = server.url(AHEAD_NAME)
    with multitables.Loader(url, ["d", "a"], 100, n_procs=1) as loader, \
            pytest.raises(OSError) as raised:
        list(loader)
    where = str(raised.value).split("the worker's traceback")[0]
    assert (f"reading rows 840:910 of /a in {url}: chunk 12 (rows 840:910, at byte offset "
            f"{info.byte_offset:,}, {info.size:,} bytes stored) cannot be read") in where


def test_an_object_replaced_between_epochs_raises_in_the_caller(served):
    server, path, truth = served
    with multitables.Loader(server.url(AHEAD_NAME), ["a", "d"], 100, n_procs=2) as loader, \
            multitables.Streamer(server.url(AHEAD_NAME)) as streamer:
        assert sum(len(d) for _, d in loader) == N
        with streamer.get_queue("b", n_procs=2) as q:
            for guard in q.iter():
                with guard:
                    pass
        with open(path, "rb") as f:
            server.replace(AHEAD_NAME, f.read())  # the same bytes, a new version (ETag)
        with pytest.raises(ObjectChangedError, match=AHEAD_NAME):
            list(loader)
        with pytest.raises(ObjectChangedError, match=AHEAD_NAME), \
                streamer.get_queue("b", n_procs=2) as q:
            for guard in q.iter():
                with guard:
                    pass


def test_a_server_that_stops_answering_raises_within_the_timeout(served):
    server, _, _ = served
    options = {"timeout": 1, "retries": 0}
    with multitables.Loader(server.url(AHEAD_NAME), ["a", "b"], 100, n_procs=2,
                            storage_options=options) as loader:
        server.knobs.stall = True  # after the open: every GET of the epoch stalls
        with pytest.raises(SourceTimeoutError, match=AHEAD_NAME):
            list(loader)


def test_a_workers_next_job_reuses_its_connections(served):
    # Each pass is a job; the second finds the first's connections (and threads) in the worker.
    server, _, truth = served
    with multitables.Streamer(server.url(AHEAD_NAME)) as streamer:
        opened = []
        for _ in range(3):
            before = server.counts["connections"]
            with streamer.get_queue("b", n_procs=1, block_size=100, ordered=True) as q:
                got = [g.__enter__().copy() for g in q.iter()]
            np.testing.assert_array_equal(np.concatenate(got), truth["b"])
            opened.append(server.counts["connections"] - before)
    assert opened[0] > 0 and opened[1:] == [0, 0], opened


def test_prefault_maps_pages_for_writing_and_keeps_their_bytes():
    import mmap
    import os
    import resource

    from multitables._hdf5 import remoteahead

    page, n = mmap.PAGESIZE, 256
    fd = os.memfd_create("prefault")
    try:
        os.posix_fallocate(fd, 0, n * page)  # as a ring's memory is made
        data = np.random.default_rng(1).integers(0, 255, n * page, dtype=np.uint8).tobytes()
        os.pwrite(fd, data, 0)
        m = mmap.mmap(fd, n * page)
        a = np.frombuffer(m, np.uint8)
        remoteahead.prefault([a[100 : n * page - 100], a[:0]])  # unaligned at both ends
        if not remoteahead._madvise:
            pytest.skip("madvise(MADV_POPULATE_WRITE) needs Linux 5.14")
        assert os.pread(fd, n * page, 0) == data  # not a byte changed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a[:] = 7  # a write of every page: a fault each, unless mapped already
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        assert faults < n // 8, faults
        del a
        m.close()
    finally:
        os.close(fd)
