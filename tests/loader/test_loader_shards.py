"""Loader over many files: rows concatenated in order, shuffled and sharded as one dataset,
resumable, checked, with a bounded number of files open in each worker."""

from __future__ import annotations

import json
import os
import resource

import h5py
import numpy as np
import psutil
import pytest

import multitables
from multitables._loader import files as files_module
from multitables._loader.job import ShardsJob

# Rows per shard: they differ, and no batch size divides them.
COUNTS = [37, 100, 1, 64, 90, 23, 51]


def write_shard(path, start, n, chunks=16, compression="gzip", **kw):
    idx = np.arange(start, start + n, dtype=np.int64)
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=idx, chunks=(min(chunks, n),), compression=compression,
                         **kw)
        f.create_dataset("x", data=np.stack([idx, -idx], axis=1).astype("f4"),
                         chunks=(min(chunks * 2, n), 2), compression=compression, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards of differing row counts, chunk shapes and filters (gzip, lzf, none, contiguous),
    named so that name order is row order."""
    folder = tmp_path_factory.mktemp("shards")
    paths, start = [], 0
    layouts = [(16, "gzip"), (7, "lzf"), (1, None), (32, "gzip"), (10, None), (5, "lzf"),
               (50, "gzip")]
    for i, (n, (chunks, compression)) in enumerate(zip(COUNTS, layouts, strict=True)):
        path = str(folder / f"part-{i:03d}.h5")
        if i == 4:  # contiguous
            idx = np.arange(start, start + n, dtype=np.int64)
            with h5py.File(path, "w") as f:
                f.create_dataset("idx", data=idx)
                f.create_dataset("x", data=np.stack([idx, -idx], axis=1).astype("f4"))
        else:
            write_shard(path, start, n, chunks, compression)
        paths.append(path)
        start += n
    return paths, start


def rows_of(batches, column="idx"):
    parts = [np.asarray(b[column] if isinstance(b, dict) else b) for b in batches]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def make(files, batch_size=8, **kw):
    kw.setdefault("n_procs", 2)
    return multitables.Loader(files, {"idx": "idx", "x": "x"}, batch_size, **kw)


def test_rows_concatenated_in_order_list_and_glob(shards):
    paths, total = shards
    pattern = os.path.join(os.path.dirname(paths[0]), "part-*.h5")
    for files in (paths, pattern):
        with make(files) as loader:
            assert loader.n_rows == total and loader.filename == paths
            batches = list(loader)
            assert len(batches) == len(loader) == -(-total // 8)
            np.testing.assert_array_equal(rows_of(batches), np.arange(total))
            for b in batches:  # the columns stay aligned, row for row
                np.testing.assert_array_equal(b["x"][:, 0], b["idx"].astype("f4"))


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_every_row_once_per_epoch_across_ranks(shards, world_size, drop_last):
    paths, total = shards
    seen = []
    for rank in range(world_size):
        with make(paths, shuffle=True, seed=3, window=40, rank=rank, world_size=world_size,
                  drop_last=drop_last, n_procs=1) as loader:
            loader.set_epoch(2)
            batches = list(loader)
            assert len(batches) == len(loader)
            seen.append(rows_of(batches))
    rows = np.concatenate(seen)
    if drop_last:
        assert len(np.unique(rows)) == len(rows)
        assert total - len(rows) < world_size * 8
    else:
        assert set(rows.tolist()) == set(range(total))
        assert len(rows) - total < world_size
    # One permutation over all files: not file order, and it differs by epoch.
    assert not np.array_equal(np.sort(seen[0]), seen[0])


def test_units_never_cross_a_file_and_windows_mix_files(shards):
    paths, total = shards
    with make(paths, shuffle=True, seed=1, window=120) as loader:
        starts = loader._shards.unit_starts
        file_starts = loader._shards.starts
        assert set(file_starts.tolist()) <= set(starts.tolist())  # each file starts a unit
        order = loader.order(0)
        assert sorted(order.rows(0, total).tolist()) == list(range(total))
        window = order.rows(*order.window_bounds(0))
        files_in_window = np.unique(np.searchsorted(file_starts, window, side="right") - 1)
        assert len(files_in_window) > 1


def test_resume_across_a_file_boundary(shards):
    paths, total = shards
    with make(paths, batch_size=10) as loader:  # unshuffled: batch 3 spans files 0 and 1
        it = iter(loader)
        first = [next(it)["idx"].copy() for _ in range(3)]
        state = json.loads(json.dumps(loader.state_dict()))
    assert first[-1][-1] == 29 and COUNTS[0] == 37
    with make(paths, batch_size=10) as resumed:
        resumed.load_state_dict(state)
        rest = rows_of(list(resumed))
    np.testing.assert_array_equal(np.concatenate([*first, rest]), np.arange(total))
    # Shuffled, and elastic: two ranks' resume from rank 0 of one.
    with make(paths, batch_size=10, shuffle=True, seed=9, window=30) as loader:
        it = iter(loader)
        done = np.concatenate([next(it)["idx"].copy() for _ in range(5)])
        state = loader.state_dict()
    rest = []
    for rank in range(2):
        with make(paths, batch_size=10, shuffle=True, seed=9, window=30, rank=rank,
                  world_size=2) as other:
            other.load_state_dict(state)
            rest.append(rows_of(list(other)))
    rows = np.concatenate([done, *rest])
    assert set(rows.tolist()) == set(range(total)) and len(rows) - total < 2


def test_state_records_the_files_and_refuses_others(shards, tmp_path):
    paths, _ = shards
    with make(paths) as loader:
        state = loader.state_dict()
    assert state["files"][0] == [paths[0], os.path.getsize(paths[0])]
    with make(paths[:-1]) as fewer, pytest.raises(ValueError, match="7 files, this one reads 6"):
        fewer.load_state_dict(state)
    swapped = list(paths)
    swapped[2] = str(tmp_path / "other.h5")
    write_shard(swapped[2], 0, COUNTS[2])
    with make(swapped) as other, pytest.raises(ValueError, match="file 2: .*part-002.h5"):
        other.load_state_dict(state)
    with make(paths[0]) as single, pytest.raises(ValueError, match="of 7 files"):
        single.load_state_dict(state)


def test_a_changed_file_is_refused_at_the_next_epoch(tmp_path):
    paths = [str(tmp_path / f"s{i}.h5") for i in range(3)]
    for i, path in enumerate(paths):
        write_shard(path, 10 * i, 10)
    with make(paths) as loader:
        assert len(rows_of(list(loader))) == 30
        write_shard(paths[1], 10, 12)
        with pytest.raises(ValueError, match=r"changed since .*s1\.h5"):
            list(loader)


def test_bad_file_lists(shards, tmp_path):
    paths, _ = shards
    with pytest.raises(ValueError, match="list of files is empty"):
        make([])
    with pytest.raises(ValueError, match="no file matches"):
        make(str(tmp_path / "nothing-*.h5"))
    missing = str(tmp_path / "missing.h5")
    with h5py.File(missing, "w") as f:
        f.create_dataset("idx", data=np.arange(5))
    with pytest.raises(ValueError, match=r"missing\.h5: .*'/x'.*every file must hold"):
        make([paths[0], missing])
    unequal = str(tmp_path / "unequal.h5")
    with h5py.File(unequal, "w") as f:
        f.create_dataset("idx", data=np.arange(5))
        f.create_dataset("x", data=np.zeros((4, 2), "f4"))
    with pytest.raises(ValueError, match=r"unequal\.h5: .*same number of rows.*'/idx': 5.*"
                                         r"'/x': 4"):
        make([paths[0], unequal])
    other_dtype = str(tmp_path / "dtype.h5")
    with h5py.File(other_dtype, "w") as f:
        f.create_dataset("idx", data=np.arange(5))
        f.create_dataset("x", data=np.zeros((5, 3), "f4"))
    with pytest.raises(ValueError, match=r"dtype\.h5: /x holds rows of \(3,\)"):
        make([paths[0], other_dtype])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("read_by", ["chunk map", "hdf5", "both"])
def test_workers_keep_a_bounded_number_of_files_open(tmp_path, monkeypatch, read_by):
    n_files, limit = 120, 5
    folder = tmp_path / "shards"
    folder.mkdir()
    paths = [str(folder / f"s{i:03d}.h5") for i in range(n_files)]
    for i, path in enumerate(paths):
        # A checksum: no chunk map, HDF5 reads the file.
        checksum = read_by == "hdf5" or (read_by == "both" and i % 2)
        write_shard(path, 4 * i, 4, chunks=2, fletcher32=checksum)
    monkeypatch.setattr(files_module, "MAX_OPEN_FILES", limit)
    # Each worker (forked after this patch) notes the most shard descriptors it held at once,
    # after each unit: those HDF5 opened and those of the reads by chunk map together.
    run = ShardsJob.run

    def counted(self, task):
        run(self, task)
        held = 0
        for fd in os.listdir("/proc/self/fd"):
            try:  # the listing's own descriptor is gone by now
                held += os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
            except FileNotFoundError:
                pass
        note = tmp_path / f"held-{os.getpid()}"
        before = int(note.read_text()) if note.exists() else 0
        note.write_text(str(max(before, held)))

    monkeypatch.setattr(ShardsJob, "run", counted)
    # Fewer descriptors than the shards need: without the bound a worker would fail to open.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = psutil.Process().num_fds() + 4 * limit + 20
    assert low < n_files
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        with make(paths, batch_size=4, shuffle=True, window=8, n_procs=2) as loader:
            rows = rows_of(list(loader))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert sorted(rows.tolist()) == list(range(4 * n_files))
    held = [int(note.read_text()) for note in tmp_path.glob("held-*")]
    assert held and max(held) <= limit


def test_torch_dataloader_with_two_workers(shards):
    torch = pytest.importorskip("torch")
    import multitables.torch as mt_torch

    paths, total = shards
    with mt_torch.Loader(paths, {"idx": "idx", "x": "x"}, 8, shuffle=True, seed=2,
                         n_procs=1) as dataset:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                             multiprocessing_context="fork")
        batches = list(loader)
        rows = np.concatenate([b["idx"].numpy() for b in batches])
        assert sorted(rows.tolist()) == list(range(total))
        for b in batches:
            np.testing.assert_array_equal(b["x"][:, 1].numpy(), -b["idx"].numpy())


def test_a_list_of_urls(shards):
    from servers.rangeserver import RangeServer

    paths, total = shards
    server = RangeServer(os.path.dirname(paths[0])).start()
    try:
        urls = [server.url(os.path.basename(p)) for p in paths]
        with make(urls, shuffle=True, seed=4, n_procs=1) as loader:
            assert loader.filename == urls
            rows = rows_of(list(loader))
            state = loader.state_dict()
        assert sorted(rows.tolist()) == list(range(total))
        name = os.path.basename(paths[1])
        assert state["files"][1] == [urls[1], os.path.getsize(paths[1]), server.etag(name)]
    finally:
        server.stop()


@pytest.fixture
def served(shards):
    """The shards over our range server: (urls, the server)."""
    from servers.rangeserver import RangeServer

    paths, _ = shards
    with RangeServer(os.path.dirname(paths[0])) as server:
        yield [server.url(os.path.basename(p)) for p in paths], server


@pytest.mark.timeout(120)
@pytest.mark.parametrize("copy", [True, False])
def test_urls_read_ahead_as_the_local_files_read(shards, served, monkeypatch, tmp_path, copy):
    """Units over URLs are fetched ahead, several files' at once (their reads in flight keep a
    file open past the bound on open files: 2 here), and give the batches of the local files,
    in the same order, epoch after epoch."""
    from multitables._hdf5.remoteahead import RowsAhead

    paths, total = shards
    urls, _ = served
    monkeypatch.setattr(files_module, "MAX_OPEN_FILES", 2)
    run = RowsAhead.run

    def noted(self, ring, task, end, pieces, failed):  # in the forked workers: each run's files
        files = set()

        def seen(slot, ticket):
            read = pieces(slot, ticket)
            files.add(id(read[2]))
            return read
        run(self, ring, task, end, seen, failed)
        with open(tmp_path / f"runs-{os.getpid()}", "a") as note:
            note.write(f"{len(files)}\n")

    monkeypatch.setattr(RowsAhead, "run", noted)
    kw = dict(shuffle=True, seed=9, window=6, n_procs=2, batch_size=5)
    with make(paths, **kw) as local, make(urls, copy=copy, **kw) as remote:
        for _ in range(2):
            want = [{k: v.copy() for k, v in b.items()} for b in local]
            got = [{k: np.array(v) for k, v in b.items()} for b in remote]
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g["idx"], w["idx"])
                np.testing.assert_array_equal(g["x"], w["x"])
            assert sorted(rows_of(got).tolist()) == list(range(total))
    # The workers read ahead, and some runs took units of several files at once.
    runs = [int(n) for note in tmp_path.glob("runs-*") for n in note.read_text().split()]
    assert runs and max(runs) > 1


@pytest.mark.timeout(120)
def test_urls_read_ahead_through_faults(shards):
    """503s, resets and short bodies on the shards' GETs: retried, the same batches."""
    from servers.rangeserver import RangeServer

    paths, _ = shards
    kw = dict(shuffle=True, seed=2, window=6, n_procs=2, batch_size=5)
    with RangeServer(os.path.dirname(paths[0]), p503=0.05, preset=0.03, pshort=0.03,
                     seed=5) as server, make(paths, **kw) as local, \
            make([server.url(os.path.basename(p)) for p in paths],
                 storage_options={"retries": 10}, **kw) as remote:
        want = [{k: v.copy() for k, v in b.items()} for b in local]
        got = [{k: v.copy() for k, v in b.items()} for b in remote]
        assert server.counts["fault 503"] and server.counts["fault reset"] and \
            server.counts["fault short"]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["idx"], w["idx"])
        np.testing.assert_array_equal(g["x"], w["x"])


@pytest.mark.timeout(60)
def test_urls_resume_mid_epoch(shards, served):
    urls, _ = served
    kw = dict(shuffle=True, seed=3, window=4, n_procs=2, batch_size=6)
    with make(urls, **kw) as loader:
        whole = [b["idx"].copy() for b in loader]
    with make(urls, **kw) as loader:
        batches = iter(loader)
        first = [next(batches)["idx"].copy() for _ in range(7)]
        state = loader.state_dict()
    with make(urls, **kw) as loader:
        loader.load_state_dict(state)
        rest = [b["idx"].copy() for b in loader]
    for g, w in zip(first + rest, whole, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.timeout(60)
def test_a_refused_shard_over_urls_raises_naming_it(shards, served):
    paths, _ = shards
    urls, server = served
    name = os.path.basename(paths[3])
    with make(urls, shuffle=True, seed=1, n_procs=2) as loader:
        server.forbidden.add(name)  # after the open: the workers' GETs are refused
        with pytest.raises(PermissionError, match=name):
            list(loader)
        server.forbidden.clear()
        assert sorted(rows_of(list(loader)).tolist()) == list(range(shards[1]))


def test_one_url_with_a_query_is_one_file_and_an_http_glob_is_refused(shards, served):
    """A presigned URL's query held a '?', read as a wildcard: the Loader refused the URL."""
    paths, _ = shards
    urls, _ = served
    with h5py.File(paths[0]) as f:
        want = f["idx"][:]
    signed = f"{urls[0]}?X-Amz-Signature=hunter2&x=1"
    with multitables.Loader(signed, "idx", 8, n_procs=1) as loader:
        np.testing.assert_array_equal(rows_of(list(loader)), want)
    # An IPv6 host's brackets are no wildcard either: one file.
    assert files_module.expand("http://[::1]:9/a.h5?x=[1]", None, None, None) is None
    pattern = urls[0].replace("part-000", "part-*") + "?X-Amz-Signature=hunter2"
    with pytest.raises(ValueError, match=r"supported for s3:// only") as e:
        multitables.Loader(pattern, "idx", 8, n_procs=1)
    assert "hunter2" not in str(e.value)


@pytest.mark.timeout(60)
def test_a_failed_fetch_names_its_own_file(shards, served):
    """Units of a local file and of a URL taken at once: the URL's GETs refused, the error
    named the rows of the first unit left, often the local file's, which nothing failed."""
    paths, _ = shards
    urls, server = served
    files = [paths[0], urls[3]]
    for seed in range(6):
        with make(files, shuffle=True, seed=seed, n_procs=1, batch_size=4) as loader:
            server.forbidden.add(os.path.basename(paths[3]))
            try:
                with pytest.raises(PermissionError) as e:
                    list(loader)
            finally:
                server.forbidden.clear()
        text = str(e.value)
        assert "part-003.h5" in text and f"in {paths[0]}" not in text, text


def test_open_files_keep_busy_files_aside_until_their_reads_end(shards):
    from multitables._hdf5.filejob import OpenFiles

    paths, _ = shards
    busy, closed = set(), []
    files = OpenFiles(2, {}, busy.__contains__, closed.append)
    a = files.get(0, paths[0])
    files.get(1, paths[1])
    busy.add(0)
    files.get(2, paths[2])  # 0 is the least recently used, but busy: aside, open
    assert list(files.files) == [1, 2] and list(files.aside) == [0] and closed == []
    assert files.get(0, paths[0]) is a  # wanted again: taken back, not opened again
    assert list(files.files) == [2, 0] and closed == [1]
    files.get(3, paths[3])  # 2 is idle: closed
    assert closed == [1, 2]
    files.get(4, paths[4])  # 0 is busy again: aside
    files.sweep()
    assert list(files.aside) == [0]
    busy.clear()
    files.sweep()
    assert not files.aside and closed == [1, 2, 0]
    files.close()
    assert sorted(closed) == [0, 1, 2, 3, 4]


def test_epoch_order_over_units_of_several_files():
    from multitables._loader.order import EpochOrder

    starts = np.array([0, 4, 8, 9, 12, 20, 23])  # units of 4, 4, 1, 3, 8, 3 rows
    for shuffle in (False, True):
        order = EpochOrder(23, 8, 2, shuffle=shuffle, seed=5, epoch=1, unit_starts=starts)
        rows = order.rows(0, 23)
        assert sorted(rows.tolist()) == list(range(23))
        np.testing.assert_array_equal(order.rows_at(np.arange(23)), rows)
        for w in range(order.n_windows):  # a window holds its units' rows, no other
            lo, hi = order.window_bounds(w)
            units = order.window_units(w)
            assert sorted(rows[lo:hi].tolist()) == [
                r for u in units for r in range(starts[u], starts[u + 1])]
        np.testing.assert_array_equal(order.unit_of(np.array([0, 3, 8, 9, 22])), [0, 0, 2, 3, 5])
        np.testing.assert_array_equal(order.unit_start(np.array([2, 5])), [8, 20])


@pytest.mark.timeout(60)
def test_an_s3_glob_lists_the_prefix(shards, tmp_path):
    from servers.rclone import shards_bucket

    paths, total = shards
    with shards_bucket(tmp_path, paths) as server:
        options = server.options()
        with make("s3://bkt/part-0*.h5", storage_options=options, n_procs=1) as loader:
            assert loader.filename == [f"s3://bkt/{os.path.basename(p)}" for p in paths]
            np.testing.assert_array_equal(rows_of(list(loader)), np.arange(total))
        with pytest.raises(ValueError, match="no file matches"):
            make("s3://bkt/nothing-*.h5", storage_options=options)


def _loader_rows_in_a_daemon(files):
    with multitables.Loader(files, "idx", 64, n_procs=1) as loader:
        return np.concatenate(list(loader)).tolist()


@pytest.mark.timeout(60)
def test_many_files_in_a_daemonic_process(tmp_path):
    """A daemonic process (a DataLoader or Pool worker) may not have children: describing many
    files there in parallel processes failed; it describes them one by one instead."""
    import multiprocessing

    n = files_module.PARALLEL_FROM + 2
    files = []
    for i in range(n):
        files.append(str(tmp_path / f"s{i:03d}.h5"))
        write_shard(files[-1], 3 * i, 3)
    with multiprocessing.get_context("fork").Pool(1) as pool:  # its workers are daemonic
        rows = pool.apply_async(_loader_rows_in_a_daemon, (files,)).get(timeout=50)
    assert rows == list(range(3 * n))


def test_local_files_are_read_by_their_chunk_maps(shards):
    """Rows whose byte ranges the parent noted are read with no HDF5 open in the workers; what
    the map cannot read (no fast codec for lzf) is left to HDF5."""
    from multitables._hdf5.mapped import DECODED, RAW
    from multitables._hdf5.source import describe

    paths, _ = shards
    first = [describe(paths[0], p, {}) for p in ("idx", "x")]
    files = files_module.describe_files(paths, first, {}, None)
    how = files.maps.how.tolist()
    assert [how[i] for i in (0, 2, 3, 4, 6)] == [[DECODED] * 2, [RAW] * 2, [DECODED] * 2,
                                                 [RAW] * 2, [DECODED] * 2]
    assert {*how[1], *how[5]} <= {0, DECODED}  # lzf: by its codec if installed, else HDF5
    assert all(s.layouts is None for s in files.shards)  # packed in the table, not per file


@pytest.mark.timeout(60)
def test_a_corrupt_chunk_of_a_shard_is_named_with_its_file(tmp_path):
    """A chunk the map's decoder cannot decode is read by HDF5, whose error names the file,
    the dataset and the chunk; the other files' rows came by their chunk maps."""
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"s{i}.h5"))
        write_shard(paths[-1], 40 * i, 40, chunks=10)
    with h5py.File(paths[1], "r") as f:
        info = f["x"].id.get_chunk_info(1)  # rows 20:40 of the second file
    with open(paths[1], "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)
    with make(paths, batch_size=10, n_procs=1) as loader:
        with pytest.raises(OSError) as raised:
            list(loader)
    where = str(raised.value).split("the worker's traceback")[0]
    assert (f"of /x in {paths[1]}: chunk 1 (rows 20:40, at byte offset {info.byte_offset:,}, "
            f"{info.size:,} bytes stored) cannot be read") in where
