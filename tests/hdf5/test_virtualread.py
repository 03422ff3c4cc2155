"""Rows of a virtual dataset read from its sources through the fast paths (``virtualread``)
equal h5py's, fill value included; mappings it does not resolve are read by HDF5, as equal."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
from helpers import sample, write_virtual

import multitables
from multitables._hdf5 import fallback
from multitables._hdf5.hyperslab import read_selection
from multitables._hdf5.virtualread import VirtualRows
from multitables._keys._indexing import translate

WIDTH = 3
FILL = -7.5


def stitched(directory, with_gaps=True):
    """A virtual dataset ``/v`` over sources of every layout: raw chunks, gzip + shuffle,
    contiguous, one in its own file (``.``), one by an absolute name, and (``with_gaps``)
    rows no source maps; returns (path, h5py's values)."""
    layouts = [{"chunks": (16, WIDTH)}, {"chunks": (10, WIDTH), "compression": "gzip",
                                         "shuffle": True}, {}, {"chunks": (7, WIDTH)}]
    sizes = [50, 45, 30, 21]
    gap = 9 if with_gaps else 0
    n = sum(sizes) + gap * len(sizes) + 8  # a gap after each source, and a longer source
    layout = h5py.VirtualLayout((n, WIDTH), "f4")
    path = str(directory / "v.h5")
    at = 0
    for i, (size, kw) in enumerate(zip(sizes, layouts, strict=True)):
        data = sample((size + 4, WIDTH), "f4", seed=i)  # 2 rows before and after the mapping
        name = f"src{i}.h5"
        if i == 3:  # an absolute name
            name = str(directory / name)
        with h5py.File(directory / f"src{i}.h5", "w") as f:
            f.create_dataset("x", data=data, **kw)
        layout[at : at + size] = h5py.VirtualSource(name, "x", shape=data.shape)[2 : 2 + size]
        at += size + gap
    own = sample((8, WIDTH), "f4", seed=9)
    with h5py.File(path, "w") as f:
        f.create_dataset("own", data=own, chunks=(4, WIDTH), compression="gzip")
        layout[n - 8 :] = h5py.VirtualSource(".", "own", shape=own.shape)
        f.create_virtual_dataset("v", layout, fillvalue=FILL)
    with h5py.File(path, "r") as f:
        return path, f["v"][()]


def rows_by_read_selection(path, ranges, name="v"):
    with h5py.File(path, "r") as f:
        ds = f[name]
        found = VirtualRows.of(ds)
        out = []
        for start, stop in ranges:
            buf = np.full((stop - start, *ds.shape[1:]), 99, ds.dtype)
            read_selection(ds, translate((slice(start, stop),), ds.shape), buf)
            out.append(buf)
        return found, out


@pytest.mark.parametrize("with_gaps", [True, False])
def test_rows_equal_h5py_fill_value_included(tmp_path, with_gaps):
    path, truth = stitched(tmp_path, with_gaps)
    n = len(truth)
    assert with_gaps == bool((truth == FILL).all(axis=1).any())
    ranges = [(0, n), (0, 1), (45, 70), (50, 59), (n - 10, n), (n - 1, n), (7, 7),
              (100, min(160, n))]
    decoded = sum(fallback.decoded.values())
    found, got = rows_by_read_selection(path, ranges)
    assert found is not None and len(found.mappings) == 5
    for (start, stop), rows in zip(ranges, got, strict=True):
        np.testing.assert_array_equal(rows, truth[start:stop])
    assert sum(fallback.decoded.values()) > decoded  # gzip sources went by the decoders


def test_relative_names_are_found_beside_the_virtual_file(tmp_path, monkeypatch):
    path, data = write_virtual(tmp_path, [60, 40, 45], compression="gzip")
    monkeypatch.chdir("/")  # not the working directory
    found, (rows,) = rows_by_read_selection(path, [(0, len(data))])
    assert found is not None
    np.testing.assert_array_equal(rows, data)


def test_what_it_leaves_to_hdf5(tmp_path):
    """Strided, overlapping, part-row and missing sources: HDF5 reads them (the missing one as
    the fill value), and the values are h5py's."""
    path = str(tmp_path / "odd.h5")
    data = sample((40, WIDTH), "f4", seed=1)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f.create_dataset("x", data=data, chunks=(8, WIDTH))
        f.create_dataset("wide", data=np.zeros((40, WIDTH + 1), "f4"))
    cases = {}
    strided = h5py.VirtualLayout((20, WIDTH), "f4")
    strided[:] = h5py.VirtualSource("s.h5", "x", shape=(40, WIDTH))[::2]
    cases["strided"] = strided
    overlap = h5py.VirtualLayout((30, WIDTH), "f4")
    overlap[0:20] = h5py.VirtualSource("s.h5", "x", shape=(40, WIDTH))[0:20]
    overlap[10:30] = h5py.VirtualSource("s.h5", "x", shape=(40, WIDTH))[20:40]
    cases["overlap"] = overlap
    missing = h5py.VirtualLayout((40, WIDTH), "f4")
    missing[:20] = h5py.VirtualSource("s.h5", "x", shape=(40, WIDTH))[:20]
    missing[20:] = h5py.VirtualSource("nowhere.h5", "x", shape=(20, WIDTH))
    cases["missing"] = missing
    columns = h5py.VirtualLayout((40, WIDTH), "f4")  # part of each source row
    columns[:] = h5py.VirtualSource("s.h5", "wide", shape=(40, WIDTH + 1))[:, :WIDTH]
    cases["columns"] = columns
    with h5py.File(path, "w") as f:
        for name, layout in cases.items():
            f.create_virtual_dataset(name, layout, fillvalue=FILL)
    for name in cases:
        with h5py.File(path, "r") as f:
            truth = f[name][()]
        ranges = [(0, len(truth)), (3, 17)]
        found, got = rows_by_read_selection(path, ranges, name)
        for (start, stop), rows in zip(ranges, got, strict=True):
            np.testing.assert_array_equal(rows, truth[start:stop], err_msg=name)
        if name in ("strided", "overlap"):  # not resolved (the others: sources refused)
            assert found is None, name


def test_sources_close_with_the_virtual_dataset(tmp_path):
    path, truth = stitched(tmp_path)
    with h5py.File(path, "r") as f:
        ds = f["v"]
        found = VirtualRows.of(ds)
        out = np.empty_like(truth)
        read_selection(ds, translate((slice(0, len(truth)),), ds.shape), out)
        files = list(found._files.values())
        assert files and all(g.id.valid for g in files)
        del ds, found
    import gc

    gc.collect()
    assert not any(g.id.valid for g in files)


@pytest.mark.timeout(120)
def test_front_doors_read_it(tmp_path):
    import multitables.dask as mdask

    path, truth = stitched(tmp_path)
    with multitables.Streamer(path) as streamer:
        got = np.stack([np.array(row) for row in streamer.get_generator(
            "/v", n_procs=2, block_size=16, ordered=True)])
    np.testing.assert_array_equal(got, truth)
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("/v")
        stage = ds.create_stage(80)
        np.testing.assert_array_equal(reader.request(ds[20:90], stage).get(), truth[20:90])
        rows = np.array([0, 50, 51, 140, 3])
        np.testing.assert_array_equal(reader.request(ds[rows], stage).get(), truth[rows])
    with multitables.Loader(path, "/v", 16, shuffle=True, n_procs=2, seed=1) as loader:
        order = loader.order(0).rows(0, len(truth))
        got = np.concatenate([b.copy() for b in loader])
    np.testing.assert_array_equal(got, truth[order])
    x = mdask.from_hdf5(path, "/v", chunks=32)
    np.testing.assert_array_equal(x.compute(scheduler="threads"), truth)
    mdask.close_files()
    assert os.path.exists(path)
