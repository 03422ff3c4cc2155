"""Subarray fields of a table (a field that is itself an array per row) under the keys a caller
uses: uneven rows anywhere in the table, then keys into the subarray, equal to numpy's
``table[field][key]``, through ``dataset[field][key]`` and ``.read_coordinates``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import N_ROWS

import multitables

pytestmark = pytest.mark.timeout(60)

DTYPE = np.dtype([("id", "<i4"), ("v", "<f8", (3,)), ("img", "u1", (4, 5)), ("w", "<i2", (2,))])

KEYS = [
    np.s_[[2, 3, 7]],
    np.s_[[7, 2, 3]],
    np.s_[[5, 5, 60, 1]],
    np.s_[[N_ROWS - 1, 0, N_ROWS - 2]],
    np.s_[[-1, -5, 3]],
    np.s_[11:23:3],
    np.s_[90:40:-7],
    np.s_[[2, 3, 7], 1],
    np.s_[[2, 3, 7], -1],
    np.s_[[9, 4, 33], 1:],
    np.s_[[9, 4, 33], ::-1],
    np.s_[40, ...],
    np.s_[[2, 3, 7], ...],
    np.s_[np.arange(N_ROWS) % 7 == 3],
]
IMG_KEYS = [
    np.s_[[2, 3, 7], 1:3, 2],
    np.s_[[6, 2, 3], :, [4, 0, 4]],
    np.s_[[31, 17], 3, ::-2],
    np.s_[13:40:9, 2:, 1:4],
]


GRID_KEYS = [  # a 2-D dataset of the same records: index arrays over both of its dimensions
    np.s_[[2, 3, 7], [1, 0, 1]],
    np.s_[[7, 2, 3], [3, 3, 0], 2],
    np.s_[[9, 4], [2, 1], ::-1],
    np.s_[[20, 5, 5], 2, [2, 0, 1]],
    np.s_[5:9, [3, 1]],
]
# Scattered points over a large 2-D dataset: the reader reads the points themselves, not the box
# of all their rows times all their columns.
_R = np.random.default_rng(5)
_ROWS, _COLS = _R.integers(3, 200, 40), _R.integers(1, 60, 40)
POINT_KEYS = [np.s_[_ROWS, _COLS], np.s_[_ROWS, _COLS, 2], np.s_[_ROWS[::-1], _COLS, ::-1],
              np.s_[_ROWS, 7, [2, 0, 1, 1] * 10]]


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    rng = np.random.default_rng(12)
    rows = np.zeros(N_ROWS, DTYPE)
    rows["id"] = np.arange(N_ROWS)
    rows["v"] = rng.normal(size=(N_ROWS, 3))
    rows["img"] = rng.integers(0, 255, (N_ROWS, 4, 5))
    rows["w"] = rng.integers(-999, 999, (N_ROWS, 2))
    path = tmp_path_factory.mktemp("subarray") / "table.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("plain", data=rows)
        f.create_dataset("chunked", data=rows, chunks=(8,), compression="gzip", shuffle=True)
        f.create_dataset("grid", data=rows[: N_ROWS - N_ROWS % 4].reshape(-1, 4), chunks=(5, 4))
        f.create_dataset("points", data=_points_grid())
    return str(path), rows


def _points_grid() -> np.ndarray:
    grid = np.zeros((200, 60), DTYPE)
    grid["v"] = np.arange(200 * 60 * 3, dtype="<f8").reshape(200, 60, 3)
    return grid


@pytest.fixture(params=["plain", "chunked"])
def table(request, table_file):
    path, rows = table_file
    with multitables.Reader(path, n_procs=2) as reader:
        yield reader, reader.get_dataset(request.param), rows


def _read(reader, proxy, n_rows):
    return reader.request(proxy, reader.get_dataset(proxy.path).create_stage(n_rows)).get()


@pytest.mark.parametrize("field", ["v", "w"])
@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_vector_field_keys_match_numpy(table, field, key):
    reader, ds, rows = table
    expected = rows[field][key]
    got = _read(reader, ds[field][key], N_ROWS)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("key", KEYS[:7] + IMG_KEYS, ids=repr)
def test_image_field_keys_match_numpy(table, key):
    reader, ds, rows = table
    expected = rows["img"][key]
    got = _read(reader, ds["img"][key], N_ROWS)
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("coords", [[2, 3, 7], [7, 3, 2, 3], [96, 0]])
def test_read_coordinates_of_a_subarray_field(table, coords):
    reader, ds, rows = table
    got = _read(reader, ds.read_coordinates(coords, field="v"), N_ROWS)
    np.testing.assert_array_equal(got, rows["v"][coords])


@pytest.mark.parametrize("key", GRID_KEYS, ids=repr)
def test_index_arrays_over_a_2d_dataset_of_records_match_numpy(table_file, key):
    path, rows = table_file
    grid = rows[: N_ROWS - N_ROWS % 4].reshape(-1, 4)
    expected = grid["v"][key]
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("grid")
        got = reader.request(ds["v"][key], ds.create_stage(ds.shape)).get()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("key", POINT_KEYS, ids=["points", "points-2", "points-reversed",
                                                 "points-int-field-array"])
def test_scattered_points_of_a_subarray_field_match_numpy(table_file, key):
    path, _ = table_file
    expected = _points_grid()["v"][key]
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("points")
        got = reader.request(ds["v"][key], ds.create_stage(ds.shape)).get()
    np.testing.assert_array_equal(got, expected)
