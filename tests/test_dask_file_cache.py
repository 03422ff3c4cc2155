"""multitables.dask keeps the files its tasks open, one per file *and* set of h5py options: an
array made with other options (a driver, a chunk cache) reads through a handle opened with them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

pytest.importorskip("dask.array")

import multitables.dask as mdask  # noqa: E402

ROWS, COLS = 200, 8


@pytest.fixture(autouse=True)
def closed_files():
    yield
    mdask.close_files()


def test_an_array_with_other_h5py_options_gets_its_own_handle(tmp_path):
    """Bug guarded: the per-process file cache is keyed by the file name only, so a second array
    of the same file with other h5py options silently reuses the first one's handle, opened with
    the first one's options. Seen here through the ``core`` driver, which reads the whole file
    into memory when it opens it: after the file's rows are rewritten in place, an array made
    without it must read the new rows, not the first array's copy in memory."""
    path = str(tmp_path / "rows.h5")
    old = np.arange(ROWS * COLS, dtype="<f8").reshape(ROWS, COLS)
    with h5py.File(path, "w") as f:
        offset = f.create_dataset("x", data=old).id.get_offset()  # contiguous: one run of bytes
    in_memory = mdask.from_hdf5(path, "x", driver="core")
    np.testing.assert_array_equal(in_memory.compute(scheduler="sync"), old)
    new = old + 0.5
    with open(path, "r+b") as f:  # the same layout, other values: the rows change in place
        f.seek(offset)
        f.write(new.tobytes())
    from_disk = mdask.from_hdf5(path, "x")
    np.testing.assert_array_equal(
        from_disk.compute(scheduler="sync"), new,
        err_msg="an array without driver='core' read the rows a driver='core' array had in memory")
