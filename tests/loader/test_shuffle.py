"""Datasets written with HDF5's shuffle filter and gzip, read through the Streamer and the Reader,
byte for byte equal to h5py's read, for element sizes across the classes the decoder treats apart
(1 byte, the powers of two up to 16, larger and odd sizes). The data are random bytes, so every
byte plane differs and an element put together from the wrong planes shows."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import drain_rows

import multitables

pytestmark = pytest.mark.timeout(90)

N = 1000  # rows; chunks of 64 leave a partial last chunk

DTYPES = {
    "1": np.dtype("u1"),
    "2": np.dtype("<i2"),
    "3": np.dtype([("a", "u1"), ("b", "<i2")]),
    "4": np.dtype("<f4"),
    "5": np.dtype([("a", "u1"), ("b", "<i4")]),
    "7": np.dtype([("a", "<i2"), ("b", "u1"), ("c", "<i4")]),
    "8": np.dtype("<f8"),
    "16": np.dtype("<c16"),
    "17": np.dtype([("a", "u1"), ("b", "<c16")]),
    "24": np.dtype([("a", "<f8"), ("b", "<i8"), ("c", "<f8")]),
    "32": np.dtype([("a", "<f8"), ("b", "<i8"), ("c", "<c16")]),
    "33": np.dtype([("a", "u1"), ("b", "<f8", (4,))]),
    "8x3": np.dtype("<f8"),  # rows of 3 elements: the filter shuffles elements, not rows
}


@pytest.fixture(scope="module")
def shuffled(tmp_path_factory):
    path = tmp_path_factory.mktemp("shuffle") / "shuffled.h5"
    rng = np.random.default_rng(24)
    with h5py.File(path, "w") as f:
        for name, dtype in DTYPES.items():
            shape = (N, 3) if name == "8x3" else (N,)
            data = np.frombuffer(rng.bytes(np.prod(shape) * dtype.itemsize), dtype).reshape(shape)
            f.create_dataset(name, data=data, chunks=(64, *shape[1:]), shuffle=True,
                             compression="gzip")
        truth = {name: f[name][()] for name in DTYPES}  # h5py's read is the ground truth
    for name, dtype in DTYPES.items():
        assert truth[name].dtype == dtype
    return str(path), truth


def _same_bytes(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    # Random bytes hold NaNs: compare the bytes, and name the first element that differs.
    g = got.reshape(len(got), -1).view(np.uint8).reshape(len(got), -1)
    e = expected.reshape(len(expected), -1).view(np.uint8).reshape(len(expected), -1)
    bad = np.flatnonzero((g != e).any(axis=1))
    assert bad.size == 0, f"{bad.size} rows differ, the first at row {bad[0]}"


@pytest.mark.parametrize("name", DTYPES)
def test_streamer_reads_shuffled_data_as_h5py_does(shuffled, name):
    path, truth = shuffled
    with multitables.Streamer(path) as stream:
        with stream.get_queue(name, n_procs=2, block_size=100, ordered=True,
                              remainder=True) as queue:
            got = np.concatenate(drain_rows(queue))
    _same_bytes(got, truth[name])


@pytest.mark.parametrize("name", DTYPES)
def test_reader_reads_shuffled_data_as_h5py_does(shuffled, name):
    path, truth = shuffled
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset(name)
        stage = ds.create_stage(N)
        _same_bytes(reader.request(ds[:], stage).get(), truth[name])
        for key in (np.s_[[999, 3, 500, 64, 63]], np.s_[130:700:7], np.s_[::-1]):
            _same_bytes(reader.request(ds[key], stage).get(), truth[name][key])
