"""Rows of a compressed dataset over a URL, in a run or scattered (a Reader's random rows), read
by one fetch of the chunks they lie in, decoded as they land (``RemoteChunkRows``), equal to
h5py's; what it cannot read goes through HDF5; threads may read at once."""

from __future__ import annotations

import concurrent.futures
import pickle

import h5py
import numpy as np
import pytest

import multitables
from multitables._hdf5 import hyperslab
from multitables._hdf5.hyperslab import read_selection
from multitables._hdf5.rawread import RawRows
from multitables._hdf5.remote import RemoteFile
from multitables._hdf5.remotechunks import RemoteChunkRows
from multitables._hdf5.source import OpenFile, describe
from multitables._keys._indexing import translate

pytestmark = pytest.mark.timeout(60)

NAME = "chunkrows.h5"
N = 1500


@pytest.fixture
def served(http):
    """``(server, truth)``: ``gz`` int16 gzip+shuffle in chunks of 40 rows, ``lzf`` float64
    lzf in chunks of 33, ``sparse`` gzip with only its first and last chunks written (the rest
    read as the fill value, 7)."""
    rng = np.random.default_rng(11)
    truth = {"gz": np.cumsum(rng.integers(-3, 4, (N, 24)), axis=0).astype(np.int16),
             "lzf": (np.arange(N * 5) % 17).reshape(N, 5) * 0.5,
             "sparse": np.full((N, 3), 7, np.int32)}
    truth["sparse"][:40] = np.arange(120).reshape(40, 3)
    truth["sparse"][-40:] = -np.arange(120).reshape(40, 3)
    with h5py.File(http.root / NAME, "w") as f:
        f.create_dataset("gz", data=truth["gz"], chunks=(40, 24), compression="gzip",
                         shuffle=True)
        f.create_dataset("lzf", data=truth["lzf"], chunks=(33, 5), compression="lzf")
        sparse = f.create_dataset("sparse", (N, 3), np.int32, chunks=(40, 3),
                                  compression="gzip", fillvalue=7)
        sparse[:40] = truth["sparse"][:40]
        sparse[-40:] = truth["sparse"][-40:]
    return http, truth


@pytest.fixture
def opened(served):
    """The file as a worker opens it (described in the parent, then pickled)."""
    server, _ = served
    parent = RemoteFile(server.url(NAME))
    for path in ("gz", "lzf", "sparse"):
        describe(parent, path, {})
    source = OpenFile(pickle.loads(pickle.dumps(parent)), {})
    yield source
    source.close()


def _read(dataset, key) -> np.ndarray:
    sel = translate(key if isinstance(key, tuple) else (key,), dataset.shape)
    out = np.empty(sel.result_shape, dataset.dtype)
    read_selection(dataset, sel, out)
    return out


KEYS = [np.s_[[1499, 3, 3, 700, 41, 0]], np.s_[[5]], np.s_[10:1400], np.s_[::-7],
        np.s_[np.arange(N) % 3 == 1], np.s_[[900, 12], 2:4]]


@pytest.mark.parametrize("path", ["gz", "lzf"])
def test_rows_come_by_one_fetch_of_their_chunks_not_through_hdf5(served, opened, path,
                                                                 monkeypatch):
    server, truth = served
    dataset = opened.dataset(path)
    assert isinstance(RawRows.of(dataset), RemoteChunkRows)

    def no_hdf5(*args):
        raise AssertionError("HDF5 read the rows")

    monkeypatch.setattr(hyperslab, "_read_box", no_hdf5)
    for key in KEYS[:-1]:
        np.testing.assert_array_equal(_read(dataset, key), truth[path][key], err_msg=str(key))
    monkeypatch.undo()  # rows and columns: not whole rows, HDF5's
    np.testing.assert_array_equal(_read(dataset, KEYS[-1]), truth[path][KEYS[-1]])


def test_chunks_not_stored_are_left_to_hdf5(opened, served):
    _, truth = served
    sparse = opened.dataset("sparse")
    for key in (np.s_[[0, 700, 1499]], np.s_[30:1480], np.s_[[1, 2]]):
        np.testing.assert_array_equal(_read(sparse, key), truth["sparse"][key])


def test_threads_read_at_once(opened, served):
    _, truth = served
    gz = opened.dataset("gz")
    rng = np.random.default_rng(2)
    keys = [np.s_[rng.integers(0, N, 64)] for _ in range(24)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda key: _read(gz, key), keys))
    for key, rows in zip(keys, got, strict=True):
        np.testing.assert_array_equal(rows, truth["gz"][key])


def test_a_readers_random_compressed_rows(served):
    server, truth = served
    rng = np.random.default_rng(4)
    with multitables.Reader(server.url(NAME), n_procs=2) as reader:
        for path in ("gz", "lzf", "sparse"):
            ds = reader.get_dataset(path)
            stage = ds.create_stage(64)
            for _ in range(4):
                rows = rng.integers(0, N, 64)
                np.testing.assert_array_equal(reader.request(ds[rows], stage).get(),
                                              truth[path][rows])


def test_the_chunks_of_scattered_reads_stay_a_while(opened, served):
    # Kept decoded in memory, as HDF5 keeps them in its chunk cache: the same rows again need
    # no GET; a read of kept chunks and new ones fetches only the new ones.
    server, truth = served
    gz = opened.dataset("gz")
    np.testing.assert_array_equal(_read(gz, np.s_[[3, 800]]), truth["gz"][[3, 800]])
    before = server.counts["GET"]
    np.testing.assert_array_equal(_read(gz, np.s_[[800, 5, 3]]), truth["gz"][[800, 5, 3]])
    assert server.counts["GET"] == before
    key = np.s_[[1400, 3, 50, 801]]
    np.testing.assert_array_equal(_read(gz, key), truth["gz"][key])
    assert server.counts["GET"] > before
