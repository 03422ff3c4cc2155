"""Loader: aligned columns, every row once per epoch, seeded shuffles, ranks, resuming, leases."""

from __future__ import annotations

import json
import os
import pickle
import signal
import time

import h5py
import numpy as np
import pytest
from helpers import sample, worker_pids

import multitables
from multitables._loader.order import shuffle_quality

N = 1003  # prime: no batch size or chunk divides it


@pytest.fixture(scope="module")
def columns_file(tmp_path_factory):
    """Columns of one length in every layout: chunk shapes, dtypes and filters all differ.
    ``idx`` is the row number, so a batch says which rows it holds."""
    path = str(tmp_path_factory.mktemp("loader") / "columns.h5")
    table = np.zeros(N, [("a", "<i4"), ("b", "<f8", (2,)), ("c", "u1")])
    table["a"] = np.arange(N)
    table["b"] = sample((N, 2), "<f8", 5)
    table["c"] = np.arange(N) % 251
    truth = {
        "idx": np.arange(N, dtype=np.int64),
        "x": sample((N, 3, 4), "<f4", 1),
        "img": sample((N, 8, 8), "u1", 2),
        "lab": sample((N,), "<i2", 3),
        "flat": sample((N, 5), "<f8", 4),
        "t": table,
    }
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=truth["idx"], chunks=(40,))
        f.create_dataset("x", data=truth["x"], chunks=(40, 3, 4), compression="gzip")
        f.create_dataset("img", data=truth["img"], chunks=(20, 4, 8), compression="gzip",
                         shuffle=True)
        f.create_dataset("lab", data=truth["lab"], chunks=(80,), compression="lzf")
        f.create_dataset("flat", data=truth["flat"])  # contiguous
        f.create_dataset("t", data=table, chunks=(40,))
        f.create_dataset("short", data=np.arange(N - 1))
        f.create_dataset("vlen", shape=(N,), dtype=h5py.vlen_dtype("i4"))
        f.create_group("grp")
    return path, truth


def make(path, columns="idx", batch_size=32, **kw) -> multitables.Loader:
    kw.setdefault("n_procs", 2)
    return multitables.Loader(path, columns, batch_size, **kw)


def epoch_rows(loader, column="idx") -> list[np.ndarray]:
    return [np.asarray(b if not isinstance(b, (dict, tuple)) else b[column]).copy()
            for b in loader]


def test_columns_stay_aligned_in_every_layout(columns_file):
    path, truth = columns_file
    cols = {"idx": "idx", "x": "x", "img": "img", "lab": "lab", "flat": "flat",
            "a": "/t/a", "b": "/t/b", "c": "t/c", "t": "/t"}
    with make(path, cols, 64, shuffle=True, seed=3) as loader:
        seen = []
        for batch in loader:
            rows = batch["idx"]
            seen.append(rows)
            for name in ("x", "img", "lab", "flat", "t"):
                np.testing.assert_array_equal(batch[name], truth[name][rows])
                assert batch[name].dtype == truth[name].dtype
            for field in ("a", "b", "c"):
                np.testing.assert_array_equal(batch[field], truth["t"][field][rows])
        assert sorted(np.concatenate(seen).tolist()) == list(range(N))


def test_batch_kinds_follow_columns(columns_file):
    path, truth = columns_file
    with make(path, "x", 100) as loader:
        first = next(iter(loader))
        assert isinstance(first, np.ndarray)
        np.testing.assert_array_equal(first, truth["x"][:100])
    with make(path, ["lab", "idx"], 100) as loader:
        first = next(iter(loader))
        assert isinstance(first, tuple) and len(first) == 2
        np.testing.assert_array_equal(first[0], truth["lab"][:100])
        np.testing.assert_array_equal(first[1], np.arange(100))


@pytest.mark.parametrize("batch_size", [1, 7, 32, 1003, 5000])
def test_unshuffled_epoch_is_the_file_in_order(columns_file, batch_size):
    path, _ = columns_file
    with make(path, batch_size=batch_size) as loader:
        batches = epoch_rows(loader)
        assert len(batches) == len(loader) == -(-N // batch_size)
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        np.testing.assert_array_equal(np.concatenate(batches), np.arange(N))


def test_drop_last_drops_only_the_short_batch(columns_file):
    path, _ = columns_file
    with make(path, batch_size=100, drop_last=True, shuffle=True) as loader:
        batches = epoch_rows(loader)
        assert len(batches) == len(loader) == 10
        rows = np.concatenate(batches)
        assert len(set(rows.tolist())) == 1000


@pytest.mark.parametrize("window", [None, 1, 100, 10_000])
def test_shuffled_epochs_are_permutations_fixed_by_seed_and_epoch(columns_file, window):
    path, _ = columns_file
    with make(path, batch_size=50, shuffle=True, seed=7, window=window) as loader:
        e0, e1 = np.concatenate(epoch_rows(loader)), np.concatenate(epoch_rows(loader))
        loader.set_epoch(0)
        again = np.concatenate(epoch_rows(loader))
    with make(path, batch_size=50, shuffle=True, seed=8, window=window) as other:
        seed8 = np.concatenate(epoch_rows(other))
    for rows in (e0, e1, seed8):
        assert sorted(rows.tolist()) == list(range(N))
    np.testing.assert_array_equal(e0, again)
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, seed8)
    assert not np.array_equal(e0, np.arange(N))


def test_window_bounds_how_far_rows_travel(columns_file):
    """With a window of one unit, each batch's rows come from one or two units of 40 rows."""
    path, _ = columns_file
    with make(path, ["idx"], 40, shuffle=True, window=1, world_size=1, rank=0) as loader:
        assert loader.unit_rows == 40  # idx's chunks
        for (rows,) in loader:
            assert len(set((rows // 40).tolist())) <= 2


def test_default_shuffle_quality(tmp_path):
    """The bar of the design: a default shuffled batch of 32 over 40-row chunks draws from at
    least 8 chunks, with under 10% of consecutive pairs file neighbours."""
    path = str(tmp_path / "q.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=np.arange(20_000), chunks=(40,))
    with make(path, batch_size=32, shuffle=True) as loader:
        distinct, neighbours = shuffle_quality(epoch_rows(loader), 40)
    assert distinct >= 8, distinct
    assert neighbours < 0.10, neighbours


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_yield_equal_batches_and_cover_the_epoch(columns_file, world, drop_last):
    path, _ = columns_file
    per_rank = []
    for rank in range(world):
        with make(path, batch_size=32, shuffle=True, seed=1, rank=rank, world_size=world,
                  drop_last=drop_last) as loader:
            batches = epoch_rows(loader)
            assert len(batches) == len(loader)
            per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1, "ranks must step in lock-step"
    rows = np.concatenate([np.concatenate(b) for b in per_rank])
    counts = np.bincount(rows, minlength=N)
    if drop_last:
        assert counts.max() == 1
        assert N - len(rows) < world * 32
    else:
        assert counts.min() >= 1
        assert len(rows) - N < world


def test_rank_defaults_come_from_the_environment(columns_file, monkeypatch):
    path, _ = columns_file
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with make(path) as loader:
        assert (loader.rank, loader.world_size) == (1, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with make(path) as loader:
        assert (loader.rank, loader.world_size) == (0, 1)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("taken", [0, 1, 5, 11])
def test_resume_mid_epoch_gives_the_rest_of_an_uninterrupted_run(columns_file, world, taken):
    path, _ = columns_file
    kw = dict(batch_size=29, shuffle=True, seed=4, world_size=world, rank=world - 1)
    with make(path, **kw) as loader:
        loader.set_epoch(2)
        whole = epoch_rows(loader)
        loader.set_epoch(2)
        it = iter(loader)
        for _ in range(taken):
            next(it)
        state = json.loads(json.dumps(loader.state_dict()))
        it.close()
    with make(path, **kw) as resumed:
        resumed.load_state_dict(state)
        rest = epoch_rows(resumed)
        after = epoch_rows(resumed)  # then the next epoch, from its start
    assert len(rest) == len(whole) - taken
    for a, b in zip(rest, whole[taken:], strict=True):
        np.testing.assert_array_equal(a, b)
    with make(path, **kw) as fresh:
        fresh.set_epoch(3)
        np.testing.assert_array_equal(np.concatenate(after), np.concatenate(epoch_rows(fresh)))


def test_state_after_a_whole_epoch_starts_the_next(columns_file):
    path, _ = columns_file
    with make(path, shuffle=True) as loader:
        assert loader.state_dict()["epoch"] == 0
        epoch_rows(loader)
        state = loader.state_dict()
        assert (state["epoch"], state["history"]) == (1, [])


@pytest.mark.parametrize("old,new", [(2, 3), (3, 1), (1, 4)])
def test_elastic_resume_delivers_no_row_twice(columns_file, old, new):
    path, _ = columns_file
    kw = dict(batch_size=16, shuffle=True, seed=9, drop_last=False)
    delivered = []
    state = None
    for rank in range(old):
        with make(path, rank=rank, world_size=old, **kw) as loader:
            it = iter(loader)
            for _ in range(7):
                delivered.append(next(it))
            if rank == 0:
                state = loader.state_dict()
            it.close()
    rest, counts = [], []
    for rank in range(new):
        with make(path, rank=rank, world_size=new, **kw) as loader:
            loader.load_state_dict(state)
            batches = epoch_rows(loader)
            counts.append(len(batches))
            rest += batches
    assert len(set(counts)) == 1
    before = np.concatenate(delivered)
    after = np.concatenate(rest)
    assert not set(before.tolist()) & set(after.tolist())
    # Every row is delivered; padding repeats fewer than a world's worth per segment.
    assert set(before.tolist()) | set(after.tolist()) == set(range(N))
    assert len(before) + len(after) - N < old + new


def test_state_from_another_configuration_is_refused(columns_file):
    path, _ = columns_file
    with make(path, batch_size=32, shuffle=True) as loader:
        state = loader.state_dict()
    with make(path, batch_size=64, shuffle=True) as other:
        with pytest.raises(ValueError, match="batch_size=32"):
            other.load_state_dict(state)


def test_copy_true_batches_stay_valid(columns_file):
    path, truth = columns_file
    with make(path, ["idx", "x"], 50, shuffle=True) as loader:
        kept = list(loader)
    for rows, x in kept:
        np.testing.assert_array_equal(x, truth["x"][rows])


def test_copy_false_lends_a_batch_until_the_next(columns_file):
    path, truth = columns_file
    with make(path, ["idx", "x"], 50, shuffle=True, copy=False) as loader:
        it = iter(loader)
        rows, x = next(it)
        np.testing.assert_array_equal(x, truth["x"][rows])  # valid while it is the latest
        saved = rows.copy()
        rows2, x2 = next(it)
        np.testing.assert_array_equal(x2, truth["x"][rows2])
        # The first lease is over: it reads as poison, not as other rows.
        assert np.isnan(x).all()
        assert (rows == -1).all()
        assert not np.array_equal(rows, saved)
        it.close()


def test_bad_columns_raise_at_construction(columns_file):
    path, _ = columns_file
    with pytest.raises(KeyError, match="'/nope'"):
        make(path, ["idx", "/nope"])
    with pytest.raises(KeyError, match="no field 'zz'"):
        make(path, "/t/zz")
    with pytest.raises(ValueError, match=r"same number of rows.*1003.*1002"):
        make(path, ["idx", "short"])
    with pytest.raises(KeyError, match="grp/x"):
        make(path, "grp/x")
    with pytest.raises(FileNotFoundError):
        make(path + ".missing", "idx")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make(path, batch_size=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\), got 2"):
        make(path, rank=2, world_size=2)
    with pytest.raises(ValueError, match="columns is empty"):
        make(path, [])


def test_closed_loader_refuses_to_iterate(columns_file):
    path, _ = columns_file
    loader = make(path)
    it = iter(loader)
    next(it)
    loader.close()
    loader.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        next(it)
    with pytest.raises(ValueError, match="closed"):
        iter(loader)


def test_pickled_loader_resumes_where_it_stood(columns_file):
    path, _ = columns_file
    with make(path, batch_size=100, shuffle=True, seed=2) as loader:
        loader.set_epoch(5)
        copy = pickle.loads(pickle.dumps(loader))
        with copy:
            np.testing.assert_array_equal(np.concatenate(epoch_rows(copy)),
                                          np.concatenate(epoch_rows(loader)))


def test_breaking_out_hands_workers_back(columns_file):
    """An abandoned epoch stops its reads; the next epoch runs on the same workers."""
    path, _ = columns_file
    with make(path, batch_size=10, shuffle=True) as loader:
        for i, _ in enumerate(loader):
            if i == 3:
                break
        workers = worker_pids()
        assert len(workers) == 2
        rows = np.concatenate(epoch_rows(loader))
        assert sorted(rows.tolist()) == list(range(N))
        assert worker_pids() == workers


@pytest.mark.timeout(60)
def test_worker_killed_mid_epoch_raises(tmp_path):
    path = str(tmp_path / "big.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=sample((20_000, 64), "<f4"), chunks=(16, 64),
                         compression="gzip")
    with make(path, "x", 16, shuffle=True, window=64) as loader:
        it = iter(loader)
        next(it)
        # Both: a worker killed while the other reads on may leave nothing undone.
        victims = worker_pids()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(multitables.SubprocessException, match=r"pid \d+\) exited "
                           r"unexpectedly with signal 9"):
            for _ in it:
                pass
        assert time.monotonic() - t0 < 10


def test_read_error_reaches_the_caller(tmp_path):
    path = str(tmp_path / "bad.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(4000.0), chunks=(100,), compression="gzip")
        dsid = f["x"].id
        infos = [dsid.get_chunk_info(i) for i in range(10, 20)]
    with open(path, "r+b") as f:
        for info in infos:
            f.seek(info.byte_offset)
            f.write(b"\xff" * info.size)
    with make(path, "x", 100) as loader:
        with pytest.raises(OSError, match="worker's traceback"):
            list(loader)


# ---- unfiltered data: each batch's rows read straight from the file (or units, as if filtered) --


@pytest.fixture(scope="module")
def raw_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("loader") / "raw.h5")
    table = np.zeros(N, [("a", "<i4"), ("b", "<f8", (2,))])
    table["a"] = np.arange(N)
    table["b"] = sample((N, 2), "<f8", 5)
    truth = {"idx": np.arange(N, dtype=np.int64), "x": sample((N, 3, 4), "<f4", 1),
             "flat": sample((N, 5), "<f8", 4), "t": table}
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=truth["idx"], chunks=(40,))
        f.create_dataset("x", data=truth["x"], chunks=(64, 3, 4))
        f.create_dataset("flat", data=truth["flat"])
        f.create_dataset("t", data=table, chunks=(100,))
    return path, truth


@pytest.fixture(params=["units", "batches"])
def reads(request, monkeypatch):
    """Both ways of reading: units held in a window, or batches read row by row."""
    if request.param == "units":
        monkeypatch.setattr(multitables.Loader, "_reads_batches", lambda self: False)
    return request.param


RAW_COLUMNS = {"idx": "idx", "x": "x", "flat": "flat", "a": "/t/a", "b": "/t/b", "t": "t"}


@pytest.mark.parametrize("window", [1, 10_000])
def test_raw_columns_aligned_either_way(raw_file, reads, window):
    path, truth = raw_file
    with make(path, RAW_COLUMNS, 37, shuffle=True, window=window) as loader:
        assert loader._reads_batches() == (reads == "batches")
        seen = []
        for batch in loader:
            rows = batch["idx"]
            seen.append(rows)
            for name in ("x", "flat", "t"):
                np.testing.assert_array_equal(batch[name], truth[name][rows])
            np.testing.assert_array_equal(batch["a"], rows)
            np.testing.assert_array_equal(batch["b"], truth["t"]["b"][rows])
        assert sorted(np.concatenate(seen).tolist()) == list(range(N))


def test_both_ways_give_the_same_batches(raw_file, monkeypatch):
    path, _ = raw_file
    kw = dict(batch_size=50, shuffle=True, window=200, seed=11, rank=1, world_size=2)
    with make(path, **kw) as loader:
        batches = epoch_rows(loader)
    monkeypatch.setattr(multitables.Loader, "_reads_batches", lambda self: False)
    with make(path, **kw) as loader:
        units = epoch_rows(loader)
    assert len(units) == len(batches)
    for a, b in zip(units, batches, strict=True):
        np.testing.assert_array_equal(a, b)


def test_copy_false_lease_either_way(raw_file, reads):
    path, truth = raw_file
    with make(path, ["idx", "x"], 50, shuffle=True, copy=False, window=10_000) as loader:
        it = iter(loader)
        rows, x = next(it)
        np.testing.assert_array_equal(x, truth["x"][rows])
        rows2, x2 = next(it)
        np.testing.assert_array_equal(x2, truth["x"][rows2])
        assert np.isnan(x).all() and (rows == -1).all()
        it.close()


def test_resume_either_way(raw_file, reads):
    path, _ = raw_file
    kw = dict(batch_size=30, shuffle=True, seed=4, world_size=2, rank=0, window=10_000)
    with make(path, **kw) as loader:
        whole = epoch_rows(loader)
        loader.set_epoch(0)
        it = iter(loader)
        for _ in range(6):
            next(it)
        state = loader.state_dict()
        it.close()
    with make(path, **kw) as resumed:
        resumed.load_state_dict(state)
        rest = epoch_rows(resumed)
    np.testing.assert_array_equal(np.concatenate(rest), np.concatenate(whole[6:]))


def test_a_pickled_loader_keeps_its_rank(columns_file, monkeypatch):
    """A copy made by pickling (a spawned DataLoader worker) plays the same shard, though its
    process has no RANK or WORLD_SIZE to find."""
    path, _ = columns_file
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = make(path, shuffle=True)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    with loader, pickle.loads(pickle.dumps(loader)) as copy:
        assert (copy.rank, copy.world_size, copy.n_procs) == (1, 2, loader.n_procs)
        assert len(copy) == len(loader)
        np.testing.assert_array_equal(np.concatenate(epoch_rows(copy)),
                                      np.concatenate(epoch_rows(loader)))


def test_leases_end_with_the_epoch(raw_file, reads):
    """The last batch of an epoch is poisoned when the epoch ends too, not left to read as the
    next epoch's rows."""
    path, _ = raw_file
    with make(path, ["idx", "x"], 400, copy=False) as loader:
        *_, (rows, x) = loader
        assert (rows == -1).all() and np.isnan(x).all()


def test_a_lent_field_is_contiguous(raw_file, reads):
    """copy=False on a field of a table: a strided view cannot become a tensor; it is lent as
    a contiguous buffer instead."""
    path, truth = raw_file
    with make(path, ["idx", "/t/b"], 50, copy=False, shuffle=True) as loader:
        for rows, b in loader:
            assert b.flags.c_contiguous
            np.testing.assert_array_equal(b, truth["t"]["b"][rows])


def test_close_ends_the_epoch_being_read(columns_file):
    path, _ = columns_file
    before = worker_pids()
    loader = make(path, ["idx", "x"], 10, shuffle=True)
    it = iter(loader)
    next(it)
    assert len(worker_pids() - before) == 2
    loader.close()
    assert worker_pids() <= before
    with pytest.raises(ValueError, match="closed"):
        next(it)


def test_units_follow_the_costly_chunks_when_the_lcm_is_too_large(tmp_path):
    """Chunks of 1000 and 1024 rows have no common multiple short enough to shuffle: units are
    the compressed images' chunks, so those decode once an epoch and only the cheap labels'
    chunks are read twice."""
    path = str(tmp_path / "lcm.h5")
    n = 20_000
    with h5py.File(path, "w") as f:
        f.create_dataset("labels", data=np.arange(n), chunks=(1024,))
        f.create_dataset("images", data=np.zeros((n, 8), "u1"), chunks=(1000, 8),
                         compression="gzip")
    with make(path, ["labels", "images"], 100, shuffle=True) as loader:
        assert loader.unit_rows == 1000
        rows = np.concatenate([labels for labels, _ in loader])
        assert sorted(rows.tolist()) == list(range(n))


def test_bad_epochs_are_refused_when_given(columns_file):
    path, _ = columns_file
    with make(path) as loader:
        with pytest.raises(TypeError):
            loader.set_epoch("1")
        with pytest.raises(ValueError, match="epoch"):
            loader.set_epoch(-1)
        state = loader.state_dict()
        state["history"] = [[2, 10_000]]
        with pytest.raises(ValueError):
            loader.load_state_dict(state)


def test_a_worker_keeps_its_mapping_of_a_reused_ring(monkeypatch):
    """The ring of the last epoch comes back to a worker as a new descriptor of the same memory:
    the worker keeps the mapping it had (its pages faulted in already), and a new ring replaces
    it."""
    from multitables._engine.shm import SharedArena
    from multitables._loader import job as loadjob

    monkeypatch.setattr(loadjob, "_LAST_ARENA", None)
    first = SharedArena(1 << 16)
    first.buffer[:4] = b"ring"
    again = SharedArena(1 << 16, _fd=os.dup(first.fd))  # as a job brings it to a worker
    assert loadjob.mapped_before(first) is first
    assert loadjob.mapped_before(again) is first
    assert again._fd is None  # the duplicate was closed
    other = SharedArena(1 << 16)
    assert loadjob.mapped_before(other) is other
    first.close()
    other.close()
