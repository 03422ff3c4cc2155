"""Dataset proxies read through a Reader: chained keys and fields, as numpy gives them."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import N_ROWS, sample, write_h5py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import multitables

pytestmark = pytest.mark.timeout(120)

TABLE = np.dtype([("x", "<f4"), ("v", "<i4", (3, 2)), ("w", "<f8", (4,))])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    path = tmp_path_factory.mktemp("proxies") / "p.h5"
    truth = {
        "f4": write_h5py(path, "f4", sample((N_ROWS, 6, 5), "<f4"), chunks=(8, 6, 5)),
        "gzip": write_h5py(path, "gzip", sample((N_ROWS, 10), "<i8", 1), chunks=(10, 10),
                           compression="gzip"),
    }
    rows = np.zeros(N_ROWS, TABLE)
    rows["x"] = np.arange(N_ROWS)
    rows["v"] = np.arange(N_ROWS * 6).reshape(N_ROWS, 3, 2)
    rows["w"] = sample((N_ROWS, 4), "<f8", 2)
    truth["table"] = write_h5py(path, "table", rows, chunks=(16,))
    return str(path), truth


@pytest.fixture
def reader(files):
    with multitables.Reader(files[0], n_procs=2) as r:
        yield r


def fetch(reader, proxy):
    stage = proxy.create_stage(N_ROWS * 60)
    return reader.request(proxy, stage).get()


def check(reader, proxy, expected):
    assert proxy.shape == np.shape(expected)
    got = fetch(reader, proxy)
    assert np.shape(got) == np.shape(expected)
    np.testing.assert_array_equal(got, expected)


CHAINS = [
    (np.s_[:], np.s_[[4, 1, 4]]),
    (np.s_[...], np.s_[:5]),
    (np.s_[10:90], np.s_[::-3, 2]),
    (np.s_[[7, 2, 9, 2]], np.s_[1:, ..., -1]),
    (np.s_[::2], np.s_[5], np.s_[3]),
    (np.s_[:], np.s_[:, np.arange(6) % 2 == 0]),  # 2.0.1's own test: test_array[:][:, mask]
    (np.s_[[[1, 2], [3, 4]]], np.s_[:, 1, [0, 4]]),
    (np.s_[90:2:-7, 1], np.s_[[2, 0, 2], ::-1]),
    (np.s_[None, 3:60], np.s_[0, [50, 3, 50], None, 4]),
    (np.s_[:, [5, 0]], np.s_[[1, 1], 1, 2]),
    (np.s_[0:0], np.s_[...]),
]


@pytest.mark.parametrize("name", ["f4", "gzip"])
def test_chained_keys_equal_numpy(reader, files, name):
    for keys in CHAINS:
        proxy, expected = reader.get_dataset(name), files[1][name]
        for key in keys:
            try:
                expected = expected[key]
            except IndexError:  # a chain for the other dataset's shape: refused the same way
                with pytest.raises(IndexError):
                    proxy[key]
                break
            proxy = proxy[key]
        else:
            check(reader, proxy, expected)


def test_a_second_key_out_of_range_raises_as_numpy_does(reader, files):
    ds = reader.get_dataset("f4")
    with pytest.raises(IndexError, match="index 10 is out of bounds for axis 0 with size 10"):
        ds[10:20][10]
    with pytest.raises(IndexError, match="too many indices"):
        ds[0][1, 2, 3]
    with pytest.raises(IndexError, match="boolean index did not match"):
        ds[:3][[True, False]]


def test_a_chained_request_reads_only_its_rows(reader, files):
    # The stage sized for three rows holds ds[:][[4, 1, 4]]: nothing else was read into it.
    ds = reader.get_dataset("f4")
    stage = ds.create_stage(3)
    got = reader.request(ds[:][[4, 1, 4]], stage).get()
    np.testing.assert_array_equal(got, files[1]["f4"][[4, 1, 4]])


TABLE_CHAINS = [
    (lambda t: t[30:35]["x"], lambda r: r[30:35]["x"]),
    (lambda t: t["v"][30:35, ..., :1], lambda r: r["v"][30:35, ..., :1]),
    (lambda t: t[30:35]["v"], lambda r: r[30:35]["v"]),
    (lambda t: t[[9, 2, 9]]["v"][:, 1], lambda r: r[[9, 2, 9]]["v"][:, 1]),
    (lambda t: t[..., None]["w"], lambda r: r[..., None]["w"]),  # the ellipsis covers rows only
    (lambda t: t[::-5][2:]["v"][[0, 3], [1, 2], 0], lambda r: r[::-5][2:]["v"][[0, 3], [1, 2], 0]),
    (lambda t: t["v"][:50][[3, 40, 3], ::-1], lambda r: r["v"][:50][[3, 40, 3], ::-1]),
    (lambda t: t.read(10, 50, 3)[[1, 0]], lambda r: r[10:50:3][[1, 0]]),
    (lambda t: t["x"][5:][::2][3], lambda r: r["x"][5:][::2][3]),
]


def test_chains_with_fields(reader, files):
    for make, expected in TABLE_CHAINS:
        check(reader, make(reader.get_dataset("table")), expected(files[1]["table"]))


SUBARRAY_KEYS = [
        np.s_[[2, 3, 7], [0, 2, 1], [1, 0, 1]],  # index arrays on the rows and both field axes
        np.s_[[5, 1], :, [1, 0]],
        np.s_[[[4, 4], [0, 96]], 2],
        np.s_[[2, 3, 7]],
        np.s_[[2, 3, 7], 1:],
        np.s_[np.arange(N_ROWS) % 48 == 1, [2, 0], 1],
]


def test_several_index_arrays_on_a_subarray_field(reader, files):
    for key in SUBARRAY_KEYS:
        check(reader, reader.get_dataset("table")["v"][key], files[1]["table"]["v"][key])


def test_index_arrays_on_a_subarray_field_read_point_by_point(tmp_path):
    # Scattered (row, i, j) triples over a field of 32 x 32: the product of their index sets is
    # far larger than the result, so the plan reads points, through the rows they touch.
    rng = np.random.default_rng(5)
    rows = np.zeros(200, [("x", "<f4"), ("img", "u1", (32, 32))])
    rows["img"] = rng.integers(0, 255, (200, 32, 32))
    path = tmp_path / "img.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("t", data=rows, chunks=(16,))
    r, i, j = rng.integers(0, 200, 300), rng.integers(0, 32, 300), rng.integers(0, 32, 300)
    with multitables.Reader(path, n_procs=1) as reader:
        img = reader.get_dataset("t")["img"]
        assert img[r + 0, i, j]._selection.points is not None  # the case under test
        for key in [(r, i, j), (r[:, None], i[:5], 3), (np.sort(r)[::10], slice(None), j[:30])]:
            check(reader, img[key], rows["img"][key])


def test_proxy_repr_names_every_key(reader):
    proxy = reader.get_dataset("table")[3:9]["v"][1]
    assert "[slice(3, 9, None)]['v'][1]" in repr(proxy)
    assert proxy.key == 1 and len(proxy.keys) == 2


@st.composite
def chains(draw):
    keys, shape = [], (N_ROWS, 10)
    for _ in range(draw(st.integers(2, 3))):
        if not shape:
            break
        kind = draw(st.sampled_from(["basic", "array", "mask"]))
        if kind == "basic":
            key = draw(hnp.basic_indices(shape, allow_newaxis=True))
        elif kind == "array":
            n = shape[0]
            key = draw(hnp.arrays(np.intp, draw(st.integers(0, 4)),
                                  elements=st.integers(-n, n - 1) if n else st.just(0)))
            if not n:
                key = key[:0]
        else:
            key = draw(hnp.arrays(np.bool_, shape[:1]))
        keys.append(key)
        shape = np.empty(shape)[key].shape
    return keys


def test_random_chains_through_workers(files):
    # One Reader for every example: starting workers per example would dominate.
    with multitables.Reader(files[0], n_procs=2) as reader:

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(keys=chains())
        def run(keys):
            proxy, expected = reader.get_dataset("gzip"), files[1]["gzip"]
            for key in keys:
                proxy, expected = proxy[key], expected[key]
            check(reader, proxy, expected)

        run()


def test_h5py_sees_the_same_rows(files):
    # The oracle itself: the file holds what the fixture says.
    with h5py.File(files[0], "r") as f:
        np.testing.assert_array_equal(f["gzip"][()], files[1]["gzip"])


def test_where_needs_a_stage_for_its_matches_only(reader, files):
    rows = files[1]["table"]
    table = reader.get_dataset("table")
    # 7 of 97 rows match: a stage of 7 rows holds them (the table's range does not have to fit).
    got = reader.request(table.where("x < 7"), table.create_stage(7)).get()
    np.testing.assert_array_equal(got, rows[rows["x"] < 7])
    got = reader.request(table["v"].where("x >= 90"), table.create_stage(7)).get()
    np.testing.assert_array_equal(got, rows["v"][rows["x"] >= 90])
    # One row too many: the error names both sizes.
    itemsize = rows.dtype.itemsize
    with pytest.raises(multitables.SharedMemoryError,
                       match=f"stage holds {6 * itemsize} bytes but the result needs "
                             f"{7 * itemsize} "):
        reader.request(table.where("x < 7"), table.create_stage(6)).get()
    assert len(reader.request(table.where("x < 6"), table.create_stage(6)).get()) == 6
