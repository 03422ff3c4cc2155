"""multitables.dask.from_hdf5 over many files: their rows concatenated along axis 0 and equal to
h5py's, each file's blocks its own whole chunks, bad lists refused naming the file."""

from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest
from helpers import TABLE_DTYPE, sample

pytest.importorskip("dask.array")

import multitables.dask as mdask  # noqa: E402
from multitables._loader import files as files_module  # noqa: E402

# (rows, h5py options): row counts no block size divides, chunks of differing rows, filters,
# a contiguous file and an empty one.
LAYOUTS = [
    (37, {"chunks": (8, 3), "compression": "gzip", "shuffle": True}),
    (0, {"chunks": (4, 3), "maxshape": (None, 3)}),
    (100, {"chunks": (16, 3)}),
    (1, {"chunks": (1, 3), "compression": "lzf"}),
    (23, {}),
    (64, {"chunks": (5, 3), "compression": "gzip"}),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards named so that name order is row order; returns (paths, their rows concatenated)."""
    folder = tmp_path_factory.mktemp("dask-shards")
    paths, parts = [], []
    for i, (n, kw) in enumerate(LAYOUTS):
        data = sample((n, 3), "f4", seed=i)
        path = str(folder / f"part-{i:02d}.h5")
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=data, **kw)
        paths.append(path)
        parts.append(data)
    yield paths, np.concatenate(parts)
    mdask.close_files()


def block_files(x, paths):
    """The file each block of ``x`` reads and its rows there, from the graph's tasks."""
    tasks = [x.dask[(x.name, k, 0)] for k in range(x.numblocks[0])]
    found = []
    for task in tasks:
        args = getattr(task, "args", None)
        source, start, stop = (a.value if hasattr(a, "value") else a
                               for a in (args if args is not None else task[1:]))
        found.append((paths.index(source.filename), start, stop))
    return found


@pytest.mark.parametrize("chunks", [None, 1, 10, 32])
def test_rows_concatenated_list_and_glob(shards, chunks):
    paths, truth = shards
    pattern = os.path.join(os.path.dirname(paths[0]), "part-*.h5")
    for files in (paths, pattern):
        x = mdask.from_hdf5(files, "/x", chunks=chunks)
        assert x.shape == truth.shape and x.dtype == truth.dtype
        np.testing.assert_array_equal(x.compute(scheduler="threads"), truth)
        np.testing.assert_array_equal(x[5:150:7].compute(scheduler="sync"), truth[5:150:7])
        # Blocks never cross a file and hold whole chunks of their file (the last one's rest).
        starts = np.cumsum([0] + [n for n, _ in LAYOUTS])
        at = 0
        for (f, start, stop), rows in zip(block_files(x, paths), x.chunks[0], strict=True):
            assert stop - start == rows and at == starts[f] + start
            chunk_rows = LAYOUTS[f][1].get("chunks", (None,))[0]
            if chunk_rows is not None:
                assert start % chunk_rows == 0
                assert rows % chunk_rows == 0 or stop == LAYOUTS[f][0]
            at += rows
        assert at == len(truth)


def test_graph_pickles_and_names_each_files_version(shards, tmp_path):
    paths, truth = shards
    x = mdask.from_hdf5(paths, "/x", chunks=16)
    y = pickle.loads(pickle.dumps(x))
    np.testing.assert_array_equal(y.compute(scheduler="sync"), truth)
    assert mdask.from_hdf5(paths, "/x", chunks=16).name == x.name
    # A shard rewritten is another array (a cluster keeps no results of the old one).
    copies = []
    for i, path in enumerate(paths[:2]):
        copies.append(str(tmp_path / f"c{i}.h5"))
        with h5py.File(path) as src, h5py.File(copies[-1], "w") as dst:
            src.copy(src["x"], dst)
    before = mdask.from_hdf5(copies, "/x", chunks=16).name
    with h5py.File(copies[0], "a") as f:
        f["x"][0] = -1
        f.attrs["touched"] = 1
    after = mdask.from_hdf5(copies, "/x", chunks=16)
    assert after.name != before
    assert after[0, 0].compute(scheduler="sync") == -1


def test_a_field_over_many_files(tmp_path):
    paths, parts = [], []
    for i, n in enumerate([9, 20, 4]):
        table = np.zeros(n, TABLE_DTYPE)
        table["image"] = sample((n, 4, 4), "u1", i)
        table["score"] = sample(n, "f4", 10 + i)
        paths.append(str(tmp_path / f"t{i}.h5"))
        with h5py.File(paths[-1], "w") as f:
            f.create_dataset("table", data=table, chunks=(3,), compression="gzip")
        parts.append(table)
    truth = np.concatenate(parts)
    for field in ("image", "score"):
        x = mdask.from_hdf5(paths, "/table", chunks=6, field=field)
        np.testing.assert_array_equal(x.compute(scheduler="threads"), truth[field])


@pytest.mark.timeout(120)
def test_many_files_described_in_parallel(tmp_path):
    n = files_module.PARALLEL_FROM + 3
    paths, parts = [], []
    for i in range(n):
        data = np.arange(5 * i, 5 * i + 5, dtype=np.int64)
        paths.append(str(tmp_path / f"s{i:03d}.h5"))
        with h5py.File(paths[-1], "w") as f:
            f.create_dataset("idx", data=data, chunks=(2,), compression="gzip")
        parts.append(data)
    x = mdask.from_hdf5(str(tmp_path / "s*.h5"), "idx")
    assert x.numblocks == (n,)  # a block per file: it never spans two
    np.testing.assert_array_equal(x.compute(scheduler="threads"), np.arange(5 * n))


def test_bad_file_lists(shards, tmp_path):
    paths, _ = shards
    with pytest.raises(ValueError, match="list of files is empty"):
        mdask.from_hdf5([], "/x")
    with pytest.raises(ValueError, match="no file matches"):
        mdask.from_hdf5(str(tmp_path / "nothing-*.h5"), "/x")
    lacking = str(tmp_path / "lacking.h5")
    with h5py.File(lacking, "w") as f:
        f.create_dataset("y", data=np.zeros((5, 3), "f4"))
        f.create_group("x_group")
    for files in ([paths[0], lacking], [lacking, paths[0]]):
        with pytest.raises(ValueError, match=r"lacking\.h5: .*'/x'.*every file must hold"):
            mdask.from_hdf5(files, "/x")
    with pytest.raises(ValueError, match=r"lacking\.h5: .*'/x_group'.*not a dataset"):
        mdask.from_hdf5([lacking, paths[0]], "/x_group")
    wide = str(tmp_path / "wide.h5")
    with h5py.File(wide, "w") as f:
        f.create_dataset("x", data=np.zeros((5, 4), "f4"))
    with pytest.raises(ValueError, match=r"wide\.h5: /x holds rows of \(4,\) float32, the "
                                         r"first file's hold \(3,\) float32"):
        mdask.from_hdf5([paths[0], wide], "/x")
    other = str(tmp_path / "other.h5")
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=np.zeros((5, 3), "f8"))
    with pytest.raises(ValueError, match=r"other\.h5: /x holds rows of \(3,\) float64"):
        mdask.from_hdf5([paths[0], other], "/x")
    with pytest.raises(ValueError, match="no field 'nope'"):
        mdask.from_hdf5(paths, "/x", field="nope")
    missing = str(tmp_path / "missing.h5")
    with pytest.raises(OSError, match=r"missing\.h5"):
        mdask.from_hdf5([paths[0], missing], "/x")


@pytest.mark.timeout(60)
def test_an_s3_glob_lists_the_prefix(shards, tmp_path):
    from servers.rclone import shards_bucket

    paths, truth = shards
    with shards_bucket(tmp_path, paths) as server:
        options = server.options()
        x = mdask.from_hdf5("s3://bkt/part-0*.h5", "/x", chunks=16, storage_options=options)
        np.testing.assert_array_equal(x.compute(scheduler="threads"), truth)
        with pytest.raises(ValueError, match="no file matches"):
            mdask.from_hdf5("s3://bkt/nothing-*.h5", "/x", storage_options=options)
    mdask.close_files()
