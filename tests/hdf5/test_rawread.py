"""Rows read past HDF5 with pread must equal h5py's reading, and only qualifying layouts use it."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import N_ROWS, TABLE_DTYPE, sample, write_pytables

from multitables._hdf5.hyperslab import read_selection
from multitables._hdf5.rawread import RawRows
from multitables._keys._indexing import translate

KEYS = [np.s_[:], np.s_[5:60], np.s_[::7], np.s_[[90, 3, 3, 17, 18, 19, 0]], np.s_[-1],
        np.s_[::-2], np.s_[np.arange(N_ROWS) % 4 == 1]]


def check_keys(ds, truth):
    for key in KEYS:
        sel = translate(key if isinstance(key, tuple) else (key,), ds.shape)
        out = np.empty(sel.result_shape, ds.dtype)
        read_selection(ds, sel, out)
        np.testing.assert_array_equal(out, truth[key])


@pytest.mark.parametrize(
    "kwargs, raw",
    [
        ({}, True),  # contiguous
        ({"chunks": (10, 6, 3)}, True),  # chunks spanning whole rows
        ({"chunks": (10, 3, 3)}, False),  # chunks split rows: HDF5 assembles them
        ({"chunks": (10, 6, 3), "compression": "gzip"}, False),
        ({"chunks": (10, 6, 3), "shuffle": True}, False),
    ],
)
@pytest.mark.parametrize("dtype", ["<f4", ">i8", "u1"])
def test_layouts(tmp_path, kwargs, raw, dtype):
    truth = sample((N_ROWS, 6, 3), dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("x", data=truth, **kwargs)
    with h5py.File(tmp_path / "a.h5", "r") as f:
        ds = f["x"]
        assert (RawRows.of(ds) is not None) == raw
        check_keys(ds, truth)


def test_userblock_offsets(tmp_path):
    truth = sample((N_ROWS, 4), "<f8")
    with h5py.File(tmp_path / "u.h5", "w", userblock_size=1024) as f:
        f.create_dataset("c", data=truth)
        f.create_dataset("k", data=truth, chunks=(8, 4))
    with h5py.File(tmp_path / "u.h5", "r") as f:
        for name in "ck":
            assert RawRows.of(f[name]) is not None
            check_keys(f[name], truth)


def test_unallocated_chunks_keep_the_fill_value(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        ds = f.create_dataset("s", (N_ROWS, 4), "<i4", chunks=(10, 4), fillvalue=-7)
        ds[20:30] = 1
        f.create_dataset("g", (N_ROWS, 4), "<i4", fillvalue=3)  # never written
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert RawRows.of(f["s"]) is None and RawRows.of(f["g"]) is None
        truth = f["s"][()]
        assert (truth[:20] == -7).all() and (truth[20:30] == 1).all()
        check_keys(f["s"], truth)


def test_pytables_table_and_arrays(tmp_path):
    truth = write_pytables(tmp_path / "t.h5")
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert f["table"].dtype == TABLE_DTYPE
        for name in ("table", "array", "earray"):
            assert RawRows.of(f[name]) is not None, name
            check_keys(f[name], truth[name])


def test_truncated_file_raises_instead_of_returning_zeros(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=sample((N_ROWS, 1024), "<f4"))
    with h5py.File(path, "r") as f:
        ds = f["x"]
        assert RawRows.of(ds) is not None
        size = path.stat().st_size
        with open(path, "r+b") as fh:
            fh.truncate(size // 2)
        sel = translate((np.s_[-3:],), ds.shape)
        with pytest.raises(OSError, match="truncated while being read"):
            read_selection(ds, sel, np.empty(sel.result_shape, ds.dtype))
        sel = translate((np.array([3, 1]),), ds.shape)  # scattered rows: the mapped path
        with pytest.raises(OSError, match="truncated while being read"):
            read_selection(ds, sel, np.empty(sel.result_shape, ds.dtype))


def test_gather_rows_copies_in_any_order_and_refuses_short_buffers():
    from multitables._hdf5._rows import gather_rows

    # Two chunks of 3 rows of 4 bytes, the second stored first in the file image.
    image = np.arange(40, dtype=np.uint8)
    offsets = np.array([16, 0], np.int64)
    rows = np.array([4, 0, 1, 2, 3, 3], np.int64)
    out = np.empty(len(rows) * 4, np.uint8)
    gather_rows(image, out, rows, offsets, 3, 4)
    expected = [image[16 + 4 * r : 20 + 4 * r] if r < 3 else image[4 * (r - 3) : 4 * (r - 2)]
                for r in rows]
    np.testing.assert_array_equal(out, np.concatenate(expected))
    with pytest.raises(ValueError, match="src holds 27 bytes, the rows lie up to byte 28"):
        gather_rows(image[:27], out, rows, offsets, 3, 4)
    with pytest.raises(ValueError, match="dst holds 20 bytes, 6 rows need 24"):
        gather_rows(image, out[:20], rows, offsets, 3, 4)
    with pytest.raises(IndexError, match="row 6 is outside the layout"):
        gather_rows(image, out, np.array([6], np.int64), offsets, 3, 4)


def test_a_worker_keeps_one_map_per_file_version(tmp_path, monkeypatch):
    """Worker processes keep their file maps across jobs (epochs): reopening the file finds the
    same map; a file grown between jobs gets a new one, and reads stay right."""
    from multitables._hdf5 import rawread

    monkeypatch.setattr(rawread, "_MAPS", {})  # as keep_maps() does in a worker
    path = tmp_path / "m.h5"
    truth = sample((N_ROWS, 5), "<f8")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=truth, chunks=(10, 5))

    def scattered_rows():
        with h5py.File(path, "r") as f:
            check_keys(f["x"], truth)

    scattered_rows()
    assert len(rawread._MAPS) == 1
    first = next(iter(rawread._MAPS.values()))
    scattered_rows()
    assert list(rawread._MAPS.values()) == [first]
    with h5py.File(path, "a") as f:
        f.create_dataset("y", data=np.zeros(100_000))
    scattered_rows()
    assert len(rawread._MAPS) == 2
    assert next(reversed(rawread._MAPS.values())) is not first


@pytest.mark.parametrize("kwargs", [{}, {"chunks": (10, 3)}])
def test_an_empty_dataset_has_no_raw_layout(tmp_path, kwargs):
    """No rows, nothing to read past HDF5 (and no descriptor opened for it)."""
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f.create_dataset("x", shape=(0, 3), dtype="<f4", maxshape=(None, 3), **kwargs)
        assert RawRows.of(f["x"]) is None


def test_populate_maps_every_page_of_a_file_map_and_keeps_its_bytes(tmp_path):
    """``populate`` maps a file map's pages ahead of the reads (touching them afterwards costs
    next to no page faults) in steps, from any start; the bytes read are the file's."""
    import mmap
    import os
    import resource

    from multitables._hdf5._rows import populate

    data = np.random.default_rng(0).integers(0, 255, 3 << 20, dtype=np.uint8)
    path = tmp_path / "bytes"
    data.tofile(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        image = np.frombuffer(mmap.mmap(fd, data.size, access=mmap.ACCESS_READ), np.uint8)
        assert populate(image, 5000, 1 << 20) in (True, False)  # False: an older kernel
        mapped = populate(image)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        total = int(image[::mmap.PAGESIZE].sum(dtype=np.int64))  # one touch a page
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        if mapped:
            assert faults < data.size // mmap.PAGESIZE // 8, faults
        assert total == int(data[::mmap.PAGESIZE].sum(dtype=np.int64))
        np.testing.assert_array_equal(image, data)
        assert populate(image, 100, 50) is True  # nothing to map
    finally:
        os.close(fd)


def test_a_worker_populates_new_maps_of_files_up_to_a_size(tmp_path, monkeypatch):
    """A worker's new map of a file is populated in a thread (once per map), unless the file is
    above _POPULATE_MAX (it may not be in the page cache: it is not read whole); reads are
    right either way."""
    import threading

    from multitables._hdf5 import rawread

    populated = []
    monkeypatch.setattr(rawread, "_populate", lambda image: populated.append(image.size))
    monkeypatch.setattr(rawread, "_MAPS", {})
    truth = sample((N_ROWS, 5), "<f8")
    for name, limit in [("small.h5", 1 << 40), ("large.h5", 0)]:
        monkeypatch.setattr(rawread, "_POPULATE_MAX", limit)
        path = tmp_path / name
        with h5py.File(path, "w") as f:
            f.create_dataset("x", data=truth, chunks=(10, 5))
        for _ in range(2):
            with h5py.File(path, "r") as f:
                check_keys(f["x"], truth)
        for thread in threading.enumerate():
            if thread.name == "multitables-populate":
                thread.join(10)
    assert populated == [(tmp_path / "small.h5").stat().st_size]
