"""Stages at their boundaries: a result that exactly fills its stage is read, one element more is a
``SharedMemoryError`` naming both sizes, for arrays, tables, subarray fields and variable-length
rows (whose stage also holds the rows' offsets)."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
from helpers import N_ROWS, sample

import multitables

pytestmark = pytest.mark.timeout(60)

VLEN_BASES = ["u1", "<i2", "<f4", "<i8", "<c16"]  # the offsets take 8 bytes a row


@pytest.fixture(scope="module")
def stage_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("stages") / "stages.h5"
    truth = {
        "one": sample((N_ROWS,), "<f8"),
        "two": sample((N_ROWS, 3), "<i4", 1),
        "table": np.zeros(N_ROWS, [("a", "<i2"), ("v", "<f4", (3,))]),
    }
    truth["table"]["a"] = np.arange(N_ROWS)
    truth["table"]["v"] = sample((N_ROWS, 3), "<f4", 2)
    with h5py.File(path, "w") as f:
        for name, data in truth.items():
            f.create_dataset(name, data=data)
        for base in VLEN_BASES:
            # One-element rows, then rows of 1, 1, 1, 2 elements.
            rows = [np.arange(1, dtype=base) + i for i in range(4)]
            rows += [np.arange(n, dtype=base) + 10 for n in (1, 1, 1, 2)]
            ds = f.create_dataset(f"vlen{base}", shape=(len(rows),), dtype=h5py.vlen_dtype(base))
            for i, row in enumerate(rows):
                ds[i] = row
            truth[f"vlen{base}"] = rows
    return str(path), truth


@pytest.fixture
def stage_file(stage_data):
    path, truth = stage_data
    with multitables.Reader(path, n_procs=1) as reader:
        yield reader, truth


def _too_small(capacity: int, needed: int):
    return pytest.raises(
        multitables.SharedMemoryError,
        match=re.escape(f"stage holds {capacity} bytes but the result needs {needed} "),
    )


@pytest.mark.parametrize(
    "name, stage_shape, full_key, over_key",
    [
        ("one", 5, np.s_[0:5], np.s_[0:6]),
        ("one", 5, np.s_[[4, 0, 4, 1, 2]], np.s_[[4, 0, 4, 1, 2, 3]]),
        ("one", 5, np.s_[::-20], np.s_[::-17]),
        ("two", 2, np.s_[3:5], np.s_[[0, 1, 2, 3, 4, 5, 6], 1]),
        ("two", 2, np.s_[0:6, 0], np.s_[6::-1, 2]),
        ("two", (1, 3), np.s_[7], np.s_[[True] * 4 + [False] * (N_ROWS - 4), :1]),
        ("table", 4, np.s_[10:14], np.s_[10:15]),
    ],
)
def test_exactly_full_is_read_and_one_element_over_raises(stage_file, name, stage_shape,
                                                          full_key, over_key):
    reader, truth = stage_file
    ds = reader.get_dataset(name)
    stage = ds.create_stage(stage_shape)
    expected, over = truth[name][full_key], truth[name][over_key]
    # The test's own premises: exactly full, and one element more.
    assert expected.nbytes == stage.nbytes
    assert over.nbytes == stage.nbytes + truth[name].dtype.itemsize
    np.testing.assert_array_equal(reader.request(ds[full_key], stage).get(), expected)
    with _too_small(stage.nbytes, over.nbytes):
        reader.request(ds[over_key], stage).get()
    # The stage is free again and still serves.
    np.testing.assert_array_equal(reader.request(ds[full_key], stage).get(), expected)


def test_subarray_field_exactly_full_and_one_element_over(stage_file):
    """A stage of 4 table rows (56 bytes) holds 14 float32 elements of the subarray field ``v``,
    taken here from uneven rows."""
    reader, truth = stage_file
    table = reader.get_dataset("table")
    v = table["v"]
    stage = table.create_stage(4)
    assert stage.nbytes == 4 * (2 + 3 * 4)
    np.testing.assert_array_equal(reader.request(v[[2, 3, 7, 8, 1, 5, 6], 0:2], stage).get(),
                                  truth["table"]["v"][[2, 3, 7, 8, 1, 5, 6], 0:2])
    with _too_small(56, 60):
        reader.request(v[[2, 3, 7, 8, 1]], stage).get()
    np.testing.assert_array_equal(reader.request(v[[9, 2, 3, 7]], stage).get(),
                                  truth["table"]["v"][[9, 2, 3, 7]])


@pytest.mark.parametrize("base", VLEN_BASES)
def test_vlen_stage_of_n_holds_n_one_element_rows(stage_file, base):
    """``create_stage(4)``: room for 4 elements and the offsets of 4 rows, so 4 rows of one
    element fill it exactly, whatever the element size."""
    reader, truth = stage_file
    ds = reader.get_dataset(f"vlen{base}")
    stage = ds.create_stage(4)
    got = reader.request(ds[0:4], stage).get()
    assert got.dtype == object and got.shape == (4,)
    for g, t in zip(got, truth[f"vlen{base}"][:4], strict=True):
        assert g.dtype == np.dtype(base)
        np.testing.assert_array_equal(g, t)
    got = reader.request(ds[[3, 0]], stage).get()  # fewer rows: fewer offsets, still fits
    np.testing.assert_array_equal(np.concatenate(list(got)), np.array([3, 0], base))


@pytest.mark.parametrize("base", VLEN_BASES)
def test_vlen_one_element_over_raises_naming_both_sizes(stage_file, base):
    """Rows of 1, 1, 1, 2 elements: one element more than ``create_stage(4)`` holds (its 4 rows'
    offsets take 40 bytes, as for 4 one-element rows)."""
    reader, truth = stage_file
    ds = reader.get_dataset(f"vlen{base}")
    stage = ds.create_stage(4)
    needed = 40 + 5 * np.dtype(base).itemsize
    assert needed > stage.nbytes
    with _too_small(stage.nbytes, needed):
        reader.request(ds[4:8], stage).get()
    three = reader.request(ds[4:7], stage).get()  # and the stage is free again
    np.testing.assert_array_equal(np.concatenate(list(three)), np.array([10, 10, 10], base))


def test_a_taken_result_leaves_its_stage_idle(stage_file):
    """The stage states of NOTE [ Worker shutdown logic ]: DONE or FAILED go back to IDLE once
    the result (or the error) is taken."""
    from multitables._reader.stages import IDLE

    reader, truth = stage_file
    ds = reader.get_dataset("one")
    stage = ds.create_stage(5)
    assert stage.memory.state.load() == IDLE
    np.testing.assert_array_equal(reader.request(ds[0:5], stage).get(), truth["one"][0:5])
    assert stage.memory.state.load() == IDLE
    with pytest.raises(multitables.SharedMemoryError):
        reader.request(ds[0:6], stage).get()
    assert stage.memory.state.load() == IDLE


def test_a_pool_with_a_closed_stage_serves_from_the_others(stage_file):
    reader, truth = stage_file
    ds = reader.get_dataset("one")
    pool = ds.create_stage_pool(5, 3)
    pool.stages[0].close()
    for i in range(4):  # each turn of the pool passes the closed stage
        np.testing.assert_array_equal(reader.request(ds[i : i + 5], pool).get(),
                                      truth["one"][i : i + 5])
    for stage in pool.stages[1:]:
        stage.close()
    with pytest.raises(multitables.QueueClosedException, match="stage pool is closed"):
        reader.request(ds[0:5], pool)


def test_each_failed_request_reports_its_own_error(stage_file):
    """Errors found by the worker (a variable-length result is sized only once read) come back
    one per request: the second failure on a stage is not the first one again."""
    reader, _ = stage_file
    ds = reader.get_dataset("vlen<i8")
    stage = ds.create_stage(4)
    with _too_small(stage.nbytes, 40 + 5 * 8):
        reader.request(ds[4:8], stage).get()  # rows of 1, 1, 1, 2 elements
    with _too_small(stage.nbytes, 40 + 8 * 8):
        reader.request(ds[[7, 7, 7, 7]], stage).get()  # four rows of 2


def test_stages_say_why_they_do_not_pickle(stage_data):
    import pickle

    with multitables.Reader(stage_data[0], n_procs=1) as reader:
        ds = reader.get_dataset("one")
        for stage in (ds.create_stage(4), ds.create_stage_pool(4, 2)):
            with pytest.raises(TypeError, match="does not pickle.*make stages where they are used"):
                pickle.dumps(stage)
