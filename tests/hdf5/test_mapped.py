"""Rows read by a file's chunk map with no HDF5 open (``_hdf5/mapped.py``) equal h5py's, and
what the map cannot read is left to HDF5."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from helpers import sample

from multitables._hdf5 import fallback
from multitables._hdf5.mapped import DECODED, RAW, MappedReads, MapTable, layout_of

N = 45  # the last chunk is partial (but for shuffle alone: see eligibility.chunks_ok)

# name: (dtype, row shape, h5py options, how the map reads it)
MAPPED = {
    "raw": ("f8", (3,), {"chunks": (8, 3)}, RAW),
    "contiguous": ("i2", (2, 2), {}, RAW),
    "gzip": ("i4", (3,), {"chunks": (8, 3), "compression": "gzip"}, DECODED),
    "shuffle_gzip": ("u1", (4, 4), {"chunks": (6, 4, 4), "compression": "gzip",
                                    "shuffle": True}, DECODED),
    "shuffle_f8": ("f8", (), {"chunks": (9,), "shuffle": True}, DECODED),  # 5 whole chunks
    "one_chunk": ("f4", (2,), {"chunks": (64, 2), "maxshape": (None, 2),
                               "compression": "gzip"}, DECODED),
}


def identity(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


@pytest.fixture(scope="module")
def mapped_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mapped") / "m.h5")
    truth = {}
    with h5py.File(path, "w") as f:
        for i, (name, (dtype, row, kw, _)) in enumerate(MAPPED.items()):
            truth[name] = sample((N, *row), dtype, seed=i)
            f.create_dataset(name, data=truth[name], **kw)
    return path, truth


def reads_of(path, names):
    """A MappedReads over the datasets ``names`` of ``path`` (one file), and their layouts."""
    with h5py.File(path, "r") as f:
        layouts = [layout_of(f[name]) for name in names]
        dtypes = [f[name].dtype for name in names]
        rows = [f[name].shape[1:] for name in names]
    return MappedReads(MapTable([layouts]), dtypes, rows, 2), layouts


@pytest.mark.parametrize("name", list(MAPPED))
def test_rows_equal_h5py(mapped_file, name):
    path, truth = mapped_file
    reads, (layout,) = reads_of(path, [name])
    assert layout is not None and layout.how == MAPPED[name][3]
    try:
        for start, stop in [(0, N), (0, 8), (8, 16), (3, 29), (40, N), (44, N), (5, 5)]:
            out = np.full((stop - start, *truth[name].shape[1:]), 7, truth[name].dtype)
            assert reads.read(0, 0, path, identity(path), start, stop, out)
            np.testing.assert_array_equal(out, truth[name][start:stop])
    finally:
        reads.close()


def test_many_files_share_one_table(tmp_path):
    paths, truths = [], []
    for i, n in enumerate([5, 17, 30]):
        paths.append(str(tmp_path / f"s{i}.h5"))
        truths.append(sample((n, 3), "i4", seed=i))
        with h5py.File(paths[-1], "w") as f:
            f.create_dataset("x", data=truths[-1], chunks=(min(4 + i, n), 3),
                             compression="gzip" if i != 1 else None)
            f.create_dataset("y", data=truths[-1][:, 0] * 2, chunks=(3,), fletcher32=True)
    layouts = []
    for path in paths:
        with h5py.File(path, "r") as f:
            layouts.append([layout_of(f["x"]), layout_of(f["y"])])
    table = MapTable(layouts)
    assert table.how[:, 1].tolist() == [0, 0, 0]  # a checksum: left to HDF5
    reads = MappedReads(table, [np.dtype("i4"), np.dtype("i4")], [(3,), ()], limit=2)
    try:
        for f in [2, 0, 1, 2, 0]:  # more files than the limit: descriptors reopened
            n = len(truths[f])
            out = np.zeros((n, 3), "i4")
            assert reads.read(f, 0, paths[f], identity(paths[f]), 0, n, out)
            np.testing.assert_array_equal(out, truths[f])
            assert not reads.read(f, 1, paths[f], identity(paths[f]), 0, n, np.zeros(n, "i4"))
            assert len(reads.fds) <= 2
    finally:
        reads.close()
    assert not reads.fds


def test_what_the_map_leaves_to_hdf5(tmp_path):
    path = str(tmp_path / "other.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("checksum", data=np.arange(20), chunks=(5,), fletcher32=True)
        unwritten = f.create_dataset("unwritten", (20,), "i4", chunks=(5,))
        unwritten[:5] = 1
        f.create_dataset("across", data=np.zeros((20, 4)), chunks=(5, 2))
        f.create_dataset("scalar", data=1.0)
        f.create_dataset("empty", (0, 2), "f4", chunks=(4, 2), maxshape=(None, 2))
        f.create_dataset("never", (20,), "f4")  # contiguous, never written
        layout = h5py.VirtualLayout((5,), "i8")
        layout[:] = h5py.VirtualSource(path, "checksum", shape=(20,))[:5]
        f.create_virtual_dataset("virtual", layout)
    with h5py.File(path, "r") as f:
        for name in f:
            assert layout_of(f[name]) is None, name


def test_changed_truncated_and_damaged_files(tmp_path):
    path = str(tmp_path / "d.h5")
    truth = sample((40, 8), "f4", seed=3)
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=truth, chunks=(8, 8), compression="gzip")
        f.create_dataset("r", data=truth, chunks=(8, 8))
    before = identity(path)
    reads, layouts = reads_of(path, ["x", "r"])
    # The map was made for the file as it was: another size or time is refused, naming it.
    with pytest.raises(ValueError, match=r"d\.h5 changed since"):
        reads.read(0, 0, path, (before[0] + 1, before[1]), 0, 8, np.zeros((8, 8), "f4"))
    # Garbage over a chunk: the decode fails, the read says so (HDF5 then reads it).
    offset = int(layouts[0].offsets[2])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * int(layouts[0].sizes[2]))
    os.utime(path, ns=(before[1], before[1]))
    fell = sum(fallback.fallbacks.values())
    out = np.zeros((8, 8), "f4")
    assert not reads.read(0, 0, path, identity(path), 16, 24, out)
    assert sum(fallback.fallbacks.values()) == fell + 1
    assert reads.read(0, 0, path, identity(path), 8, 16, out)  # the others still read
    np.testing.assert_array_equal(out, truth[8:16])
    reads.close()
    # Cut short: an error that says where the data should have been.
    os.truncate(path, int(layouts[1].offsets[-1]) + 10)
    reads = MappedReads(MapTable([layouts]), [np.dtype("f4")] * 2, [(8,)] * 2, 2)
    with pytest.raises(OSError, match="file ends at byte"):
        reads.read(0, 1, path, identity(path), 32, 40, np.zeros((8, 8), "f4"))
    reads.close()
