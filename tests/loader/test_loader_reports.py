"""What a Loader tells its user about a file changed under it, a chunk that cannot be read, a
setting that yields nothing, and the shuffle it chose by default."""

from __future__ import annotations

import os
import warnings

import h5py
import numpy as np
import pytest

import multitables
from multitables._loader.order import shuffle_quality

pytestmark = pytest.mark.timeout(60)


def _bump_mtime(path) -> None:
    """A change on disk shows even where the clock has not moved since the Loader was made."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


@pytest.fixture
def growable(tmp_path):
    path = str(tmp_path / "grow.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(2000.0), chunks=(100,), maxshape=(None,))
        f.create_dataset("y", data=np.arange(2000), chunks=(100,), maxshape=(None,))
    return path


def test_a_dataset_shrunk_between_epochs_raises_what_changed(growable):
    """It read 'out has shape (100,) ... but the selection needs shape (0,)' in a worker."""
    with multitables.Loader(growable, ["x", "y"], 100, n_procs=1) as loader:
        assert sum(len(x) for x, _ in loader) == 2000
        with h5py.File(growable, "a") as f:
            f["y"].resize((500,))
        _bump_mtime(growable)
        with pytest.raises(ValueError, match=r"grow.h5 changed since this Loader was made .*"
                           r"counted 2,000 rows, now /y has 500; .*make a new Loader"):
            iter(loader)


def test_rows_appended_between_epochs_warn_once(growable):
    """Rows appended were left out of every later epoch without a word."""
    with multitables.Loader(growable, ["x", "y"], 100, n_procs=1) as loader:
        list(loader)
        with h5py.File(growable, "a") as f:
            for name in ("x", "y"):
                f[name].resize((2500,))
        _bump_mtime(growable)
        with pytest.warns(UserWarning, match=r"rows were added \(/x has 2,500, /y has 2,500\); "
                          r"this Loader's epochs hold its first 2,000 rows only"):
            rows = np.concatenate([y for _, y in loader])
        np.testing.assert_array_equal(rows, np.arange(2000))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert sum(len(x) for x, _ in loader) == 2000  # once is enough


def test_a_corrupt_chunk_is_named_with_its_dataset_and_place(tmp_path):
    """The error named every column of the unit ("/idx, /x") and no chunk."""
    path = str(tmp_path / "bad.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=np.arange(4000), chunks=(100,))
        f.create_dataset("x", data=np.arange(4000.0), chunks=(100,), compression="gzip")
        info = f["x"].id.get_chunk_info(12)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset)
        f.write(b"\xff" * info.size)
    with multitables.Loader(path, ["idx", "x"], 100, n_procs=1) as loader:
        with pytest.raises(OSError) as raised:
            list(loader)
    where = str(raised.value).split("the worker's traceback")[0]
    assert (f"reading rows 1200:1300 of /x in {path}: chunk 12 (rows 1200:1300, at byte offset "
            f"{info.byte_offset:,}, {info.size:,} bytes stored) cannot be read") in where
    assert "/idx" not in where


def test_drop_last_that_leaves_no_batch_warns_at_construction(tmp_path):
    path = str(tmp_path / "few.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(300))
    with pytest.warns(UserWarning, match=r"never yield a batch: drop_last=True with batch_size="
                      r"256 over 300 rows on 2 rank\(s\) \(150 rows per rank"):
        loader = multitables.Loader(path, "x", 256, drop_last=True, rank=0, world_size=2)
    with loader:
        assert len(loader) == 0 and list(loader) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        multitables.Loader(path, "x", 150, drop_last=True, rank=1, world_size=2).close()


def test_the_default_shuffle_is_uniform_on_unfiltered_data(tmp_path):
    """Unfiltered rows are read from the file whatever the window: the default window of 16
    chunks drew a batch of 256 rows from about 32 chunks where a uniform shuffle draws ~200."""
    path = str(tmp_path / "u.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=np.arange(40_000), chunks=(100,))
        # 40 MB in memory, more than a default window of compressed rows holds
        f.create_dataset("gz", data=np.zeros((40_000, 1024), "u1"), chunks=(100, 1024),
                         compression="gzip")
    with multitables.Loader(path, "raw", 256, shuffle=True, n_procs=1) as loader:
        assert loader.window == loader.n_rows
        distinct, _ = shuffle_quality([b.copy() for b in loader], 100)
    assert distinct > 150, distinct
    with multitables.Loader(path, "gz", 256, shuffle=True, n_procs=1) as loader:
        assert loader.window < loader.n_rows  # compressed: a window of chunks in memory
