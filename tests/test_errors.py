"""The exceptions' family: one base, and a closed object reported one way that old ``except``
clauses still catch."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

import multitables
from multitables import errors


def test_every_exception_derives_from_the_base():
    for name in ("QueueClosedException", "ClosedError", "SubprocessException", "SharedMemoryError",
                 "StagePoolExhausted"):
        assert issubclass(getattr(multitables, name), multitables.MultitablesError), name


def test_closed_error_is_both_old_spellings():
    assert issubclass(errors.ClosedError, multitables.QueueClosedException)
    assert issubclass(errors.ClosedError, ValueError)


@pytest.fixture
def small_file(tmp_path):
    path = str(tmp_path / "small.h5")
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(100, dtype=np.float32)
    return path


def test_each_front_door_reports_closed_the_same_way(small_file):
    """A closed Loader raised a bare ValueError, a closed Reader a QueueClosedException."""
    loader = multitables.Loader(small_file, {"x": "/x"}, batch_size=10, n_procs=1)
    loader.close()
    with pytest.raises(multitables.ClosedError, match="closed"):
        iter(loader).__next__()
    reader = multitables.Reader(small_file, n_procs=1)
    ds = reader.get_dataset("/x")
    stage = ds.create_stage(4)
    reader.close()
    with pytest.raises(multitables.ClosedError, match="closed"):
        reader.request(ds[:4], stage)


def test_a_full_stage_pool_raises_a_typed_error(small_file):
    with multitables.Reader(small_file, n_procs=1) as reader:
        ds = reader.get_dataset("/x")
        pool = ds.create_stage_pool(1, 1)
        held = reader.request(ds[0], pool)
        with pytest.raises(multitables.StagePoolExhausted, match="all 1 stages of the pool"):
            reader.request(ds[1], pool)
        assert held.get() == 0
