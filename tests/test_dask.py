"""multitables.dask arrays must equal numpy on h5py's reading, on a real process cluster too."""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.resource_tracker
import os
import pickle
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from helpers import REPO, TABLE_DTYPE, sample, write_h5py

pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import dask  # noqa: E402
import dask.array as da  # noqa: E402

import multitables.dask as mdask  # noqa: E402

ROWS, COLS, CHUNK = 1000, 24, 64  # 16 chunks, the last one partial

# Every dataset the cluster tests read: raw chunks (pread), gzip + shuffle (decoder), contiguous.
LAYOUTS = {
    "raw": ("f8", {"chunks": (CHUNK, COLS)}),
    "gzip": ("i4", {"chunks": (CHUNK, COLS), "compression": "gzip", "shuffle": True}),
    "contiguous": ("f4", {}),
}


@pytest.fixture(scope="module")
def h5file(tmp_path_factory):
    """One file holding every layout and a compound table; returns (filename, {path: truth})."""
    filename = str(tmp_path_factory.mktemp("dask") / "data.h5")
    truth = {}
    for seed, (name, (dtype, kwargs)) in enumerate(LAYOUTS.items()):
        truth[name] = write_h5py(filename, name, sample((ROWS, COLS), dtype, seed), **kwargs)
    table = np.zeros(ROWS, TABLE_DTYPE)
    table["image"] = sample((ROWS, 4, 4), "u1", 7)
    table["vec"] = sample((ROWS, 3), "f8", 8)
    table["score"] = sample(ROWS, "f4", 9)
    truth["table"] = write_h5py(filename, "table", table, chunks=(CHUNK,), compression="gzip")
    with h5py.File(filename, "a") as f:
        f.create_group("group")
    yield filename, truth
    mdask.close_files()


@pytest.fixture(scope="module", autouse=True)
def resource_tracker():
    """multiprocessing's resource tracker, which the workers' spawn starts once and which lives as
    long as this process, started before any test, so that no test is blamed for it."""
    multiprocessing.resource_tracker.ensure_running()


@pytest.fixture
def client():
    """Two one-thread worker processes, as the issue asks; no dashboard (no port to take). One
    per test: its connections stay open while it lives, and each test must close what it opened."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.fixture(autouse=True)
def closed_files():
    """Files that tasks computed in this process opened are closed at the end of each test."""
    yield
    mdask.close_files()


def assert_same(got, expected):
    """Exact for integers; float sums are reduced in dask's order, not numpy's."""
    got = np.asarray(got)
    assert got.shape == np.shape(expected) and got.dtype == np.asarray(expected).dtype
    if got.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    else:
        np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------- values


@pytest.mark.timeout(120)
def test_cluster_computes_what_numpy_does(client, h5file):
    filename, truth = h5file
    for name in LAYOUTS:
        a = truth[name]
        x = mdask.from_hdf5(filename, name, chunks=3 * CHUNK)
        assert (x.shape, x.dtype) == (a.shape, a.dtype)
        whole, total, peak, strided, expr = client.compute(
            [x, x.sum(), x.max(axis=0), x[7:991:13, ::-3],
             (2 * x[::5] - x[::5] ** 2).mean(axis=1)], sync=True)
        np.testing.assert_array_equal(whole, a, err_msg=name)
        assert_same(total, a.sum())
        np.testing.assert_array_equal(peak, a.max(axis=0), err_msg=name)
        np.testing.assert_array_equal(strided, a[7:991:13, ::-3], err_msg=name)
        assert_same(expr, (2 * a[::5] - a[::5] ** 2).mean(axis=1))


@pytest.mark.timeout(120)
def test_cluster_reads_fields_and_pickled_graphs(client, h5file):
    filename, truth = h5file
    table = truth["table"]
    image = mdask.from_hdf5(filename, "table", field="image")
    assert (image.shape, image.dtype) == ((ROWS, 4, 4), np.dtype("u1"))
    assert image.chunks[1:] == ((4,), (4,))
    np.testing.assert_array_equal(client.compute(image, sync=True), table["image"])
    assert int(client.compute(image.sum(), sync=True)) == int(table["image"].sum())
    records = mdask.from_hdf5(filename, "table")
    assert records.dtype == TABLE_DTYPE
    np.testing.assert_array_equal(client.compute(records[::9], sync=True), table[::9])

    x = mdask.from_hdf5(filename, "gzip")
    graph = pickle.dumps(dict(x.__dask_graph__()))  # plain pickle: h5py objects refuse it
    assert b"h5py" not in graph and filename.encode() in graph
    y = pickle.loads(pickle.dumps(x))
    np.testing.assert_array_equal(client.compute(y, sync=True), truth["gzip"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", [*LAYOUTS, "table"])
def test_threads_of_one_process_read_the_same_file(h5file, name):
    # Threads share the decoder state of a dataset: unguarded, a chunk decoded for one block
    # ended up in another.
    filename, truth = h5file
    for _ in range(10):
        mdask.close_files()
        x = mdask.from_hdf5(filename, name, chunks=CHUNK)
        got = x.compute(scheduler="threads", num_workers=4)
        np.testing.assert_array_equal(got, truth[name])


@pytest.mark.timeout(60)
def test_files_past_the_cache_close_after_their_reads(tmp_path):
    n = mdask._MAX_FILES + 3
    arrays, truth = [], []
    for k in range(n):
        filename = str(tmp_path / f"f{k}.h5")
        truth.append(write_h5py(filename, "d", sample((200, 5), "i8", k), chunks=(16, 5),
                                compression="gzip"))
        arrays.append(mdask.from_hdf5(filename, "d", chunks=16))
    got = da.stack(arrays).compute(scheduler="threads", num_workers=4)
    np.testing.assert_array_equal(got, np.stack(truth))
    assert len(mdask._cache) == mdask._MAX_FILES
    # The fixture's descriptor check fails the test if an evicted file stayed open.


def test_empty_dataset(tmp_path):
    filename = str(tmp_path / "empty.h5")
    write_h5py(filename, "e", np.zeros((0, 3), "i2"), chunks=(8, 3), maxshape=(None, 3))
    x = mdask.from_hdf5(filename, "e")
    assert x.chunks == ((0,), (3,))
    assert x.compute(scheduler="sync").shape == (0, 3)


# ------------------------------------------------------------------------------------- blocks


def edges(x) -> list[int]:
    return np.cumsum((0,) + x.chunks[0]).tolist()


@pytest.mark.parametrize("rows, blocks", [(1, 1), (64, 1), (95, 1), (97, 2), (200, 3), (10**6, 16)])
def test_blocks_are_whole_chunks(h5file, rows, blocks):
    filename, _ = h5file
    x = mdask.from_hdf5(filename, "raw", chunks=rows)
    assert x.chunks[0][0] == blocks * CHUNK or x.chunks[0] == (ROWS,)
    assert all(e % CHUNK == 0 for e in edges(x)[:-1]) and edges(x)[-1] == ROWS
    assert x.chunks[1:] == ((COLS,),)


def test_default_blocks_follow_dasks_chunk_size(h5file):
    filename, _ = h5file
    chunk_bytes = CHUNK * COLS * 8
    with dask.config.set({"array.chunk-size": f"{5 * chunk_bytes}B"}):
        x = mdask.from_hdf5(filename, "raw")
    assert x.chunks[0][:-1] == (5 * CHUNK,) * 3
    with dask.config.set({"array.chunk-size": "128MiB"}):
        assert mdask.from_hdf5(filename, "raw").chunks[0] == (ROWS,)
    # A field's blocks are measured in its own bytes: 4 * 4 per row.
    with dask.config.set({"array.chunk-size": f"{16 * 2 * CHUNK}B"}):
        assert mdask.from_hdf5(filename, "table", field="image").chunks[0][0] == 2 * CHUNK


def test_contiguous_rows_are_taken_as_given(h5file):
    filename, _ = h5file
    x = mdask.from_hdf5(filename, "contiguous", chunks=300)
    assert x.chunks[0] == (300, 300, 300, 100)


def test_name_follows_the_file(h5file, tmp_path):
    filename, _ = h5file
    a, b = (mdask.from_hdf5(filename, "raw", chunks=CHUNK) for _ in range(2))
    assert a.name == b.name
    assert mdask.from_hdf5(filename, "raw", chunks=2 * CHUNK).name != a.name
    other = str(tmp_path / "other.h5")
    write_h5py(other, "raw", np.zeros((ROWS, COLS)), chunks=(CHUNK, COLS))
    assert mdask.from_hdf5(other, "raw", chunks=CHUNK).name != a.name


# ------------------------------------------------------------------------------------- errors


def test_bad_input_raises_at_creation(h5file, tmp_path):
    filename, _ = h5file
    missing = str(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        mdask.from_hdf5(missing, "raw")
    not_hdf5 = tmp_path / "text.h5"
    not_hdf5.write_text("not HDF5")
    with pytest.raises(OSError, match="text.h5"):
        mdask.from_hdf5(str(not_hdf5), "raw")
    with pytest.raises(KeyError, match="/nowhere"):
        mdask.from_hdf5(filename, "/nowhere")
    with pytest.raises(TypeError, match="group"):
        mdask.from_hdf5(filename, "group")
    with pytest.raises(ValueError, match="no field 'nope'"):
        mdask.from_hdf5(filename, "table", field="nope")
    with pytest.raises(ValueError, match="chunks must be >= 1, got 0"):
        mdask.from_hdf5(filename, "raw", chunks=0)
    with pytest.raises(ValueError, match="read-only"):
        mdask.from_hdf5(filename, "raw", mode="a")


# ------------------------------------------------------------------------------------- processes


def _die_once(block, marker):
    """Kill this worker process the first time any task calls it; pass the block on after."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return block
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.timeout(120)
def test_worker_killed_mid_compute_is_retried(h5file, tmp_path):
    # A cluster of its own: its nanny restarts the killed worker, a process no other test owns.
    filename, truth = h5file
    marker = str(tmp_path / "killed")
    x = mdask.from_hdf5(filename, "gzip", chunks=CHUNK)
    # meta given: dask would otherwise call _die_once here to learn its output type.
    y = x.map_blocks(_die_once, marker=marker, meta=np.empty((0, 0), x.dtype))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as c:
            total, whole = c.compute([y.sum(), y], sync=True)
    assert os.path.exists(marker)  # a worker did die
    assert int(total) == int(truth["gzip"].sum())
    np.testing.assert_array_equal(whole, truth["gzip"])


def _sum_in_child(x, conn):
    conn.send((len(mdask._cache), int(x.sum().compute(scheduler="sync"))))


@pytest.mark.timeout(60)
def test_forked_child_opens_its_own_files(h5file):
    filename, truth = h5file
    x = mdask.from_hdf5(filename, "gzip")
    assert int(x.sum().compute(scheduler="sync")) == int(truth["gzip"].sum())
    assert len(mdask._cache) >= 1  # the parent keeps its file open
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_sum_in_child, args=(x, send))
    child.start()
    try:
        assert recv.poll(30), "the forked child sent nothing"
        assert recv.recv() == (0, int(truth["gzip"].sum()))
    finally:
        child.join(10)
        if child.exitcode is None:
            child.kill()
            child.join()
    assert child.exitcode == 0
    np.testing.assert_array_equal(x.compute(scheduler="sync"), truth["gzip"])  # parent unharmed


def test_close_files_closes_and_reads_reopen(h5file):
    filename, truth = h5file
    x = mdask.from_hdf5(filename, "raw")
    x.compute(scheduler="sync")
    files = [entry.source.file for entry in mdask._cache.values()]
    mdask.close_files()
    assert files and not any(f.id.valid for f in files) and not mdask._cache
    np.testing.assert_array_equal(x.compute(scheduler="sync"), truth["raw"])


@pytest.mark.timeout(60)
def test_multitables_imports_without_dask():
    code = ("import sys; sys.modules['dask'] = sys.modules['distributed'] = None\n"
            "import multitables\n"
            "try:\n    import multitables.dask\nexcept ImportError:\n    print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=50)
    assert out.stdout.strip() == "ok", out.stderr


# -------------------------------------------------------------------------------- block memory


def test_block_memory_is_reused_only_once_no_view_of_it_is_left(h5file, monkeypatch):
    """Blocks' memory goes back to the process's pool when the last array viewing it goes, and a
    block of the same size takes it: a view kept of an earlier block keeps its values."""
    monkeypatch.setattr(mdask, "_MIN_POOLED", 1)
    monkeypatch.setattr(mdask, "_free", {})
    monkeypatch.setattr(mdask, "_free_bytes", 0)
    f8 = np.dtype("f8")
    block = mdask._new_block((CHUNK, COLS), f8)
    block[...] = 1
    kept = block[::3]  # a view: the block's memory must stay its own
    del block
    gc.collect()
    assert not mdask._free
    other = mdask._new_block((CHUNK, COLS), f8)
    other[...] = 2
    assert (kept == 1).all()
    del kept
    gc.collect()
    assert mdask._free_bytes == CHUNK * COLS * 8
    again = mdask._new_block((CHUNK, COLS), f8)  # takes the memory back
    assert mdask._free_bytes == 0 and again.flags.writeable and again.shape == (CHUNK, COLS)
    # Tasks run one after another in one process reuse their blocks' memory: values stay right.
    filename, truth = h5file
    x = mdask.from_hdf5(filename, "raw", chunks=CHUNK)
    for _ in range(2):
        assert_same((x * 2).sum(axis=1).compute(scheduler="synchronous"),
                    (truth["raw"] * 2).sum(axis=1))


def test_block_memory_kept_free_is_bounded(monkeypatch):
    monkeypatch.setattr(mdask, "_MIN_POOLED", 1)
    monkeypatch.setattr(mdask, "_free", {})
    monkeypatch.setattr(mdask, "_free_bytes", 0)
    monkeypatch.setattr(mdask, "_POOL_BYTES", 2 * CHUNK * COLS * 8)
    blocks = [mdask._new_block((CHUNK, COLS), np.dtype("f8")) for _ in range(5)]
    del blocks
    gc.collect()
    assert mdask._free_bytes == 2 * CHUNK * COLS * 8 and len(mdask._free[CHUNK * COLS * 8]) == 2
