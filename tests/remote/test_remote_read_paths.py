"""The workers' read paths on a remote file: the parent's chunk maps travel with the file, so a
worker reads no chunk index; unfiltered rows and compressed chunks come by one fetch per read
(several GETs in flight); a later epoch with ``cache_dir`` reads from the local disk; ``info``
says what the open cost."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import multitables
from multitables._hdf5 import remote as remote_module
from multitables._hdf5.decode import ChunkDecoder
from multitables._hdf5.hyperslab import read_selection
from multitables._hdf5.rawread import RawRows
from multitables._hdf5.remote import RemoteFile
from multitables._hdf5.remoteread import RemoteDecoder, RemoteRows
from multitables._hdf5.source import OpenFile, describe
from multitables._keys._indexing import translate
from multitables._tools import cli

from .remote_files import H5_NAME

pytestmark = pytest.mark.timeout(30)


def _gets(srv) -> int:
    return srv.counts["GET"]


@pytest.fixture
def worker_file(http, monkeypatch):
    """A RemoteFile as a worker gets it: described in the parent, then pickled. Building a chunk
    map from here on fails the test."""
    parent = RemoteFile(http.url(H5_NAME))
    for path in ("x", "gz", "wide", "label"):
        describe(parent, path, {})
    child = pickle.loads(pickle.dumps(parent))

    def no_chunk_index(*args, **kwargs):
        raise AssertionError("a worker read a chunk index over the network")

    monkeypatch.setattr(remote_module, "chunk_map", no_chunk_index)
    opened = OpenFile(child, {})
    yield opened
    opened.close()


def test_a_worker_opens_the_file_from_the_parents_blocks_no_request(http, truth):
    parent = RemoteFile(http.url(H5_NAME))
    describe(parent, "x", {})
    child = pickle.loads(pickle.dumps(parent))
    assert child.meta_blocks  # the blocks h5py read in the parent, found in its block file
    before = http.counts["requests"]
    opened = OpenFile(child, {})
    try:
        x = opened.dataset("x")
        assert http.counts["requests"] == before
        np.testing.assert_array_equal(_read(x, np.s_[3:40]), truth["x"][3:40])
    finally:
        opened.close()


def test_every_job_of_a_worker_opens_the_file_from_the_parents_blocks(http, truth):
    # A worker runs one job per epoch, each with its own copy of the file, closed at the job's
    # end: the second job still finds the parent's blocks, not the first job's closed ones.
    parent = RemoteFile(http.url(H5_NAME))
    describe(parent, "x", {})
    before = http.counts["requests"]
    for _ in range(2):
        opened = OpenFile(pickle.loads(pickle.dumps(parent)), {})
        try:
            np.testing.assert_array_equal(_read(opened.dataset("x"), np.s_[3:40]),
                                          truth["x"][3:40])
        finally:
            opened.close()
    assert http.counts["requests"] - before == 2  # the rows, once a job: no metadata


def test_compressed_chunks_decoded_as_each_get_arrives(worker_file, monkeypatch, truth):
    # GETs of about one chunk each: whole chunks are decoded by the fetch threads, the partial edge
    # chunks after the fetch; the result equals the file's.
    gz = worker_file.dataset("gz")
    decoder = ChunkDecoder.of(gz)
    assert isinstance(decoder, RemoteDecoder)
    monkeypatch.setattr(decoder._fetcher, "split_size", int(decoder._sizes.max()))
    monkeypatch.setattr(decoder._fetcher, "merge_gap", 0)
    for key in (np.s_[20:980], np.s_[0:1000], np.s_[999:1000]):
        np.testing.assert_array_equal(_read(gz, key), truth["gz"][key])


def _read(dataset, key) -> np.ndarray:
    sel = translate(key if isinstance(key, tuple) else (key,), dataset.shape)
    out = np.empty(sel.result_shape, dataset.dtype)
    read_selection(dataset, sel, out)
    return out


def test_unfiltered_rows_one_fetch_per_read(worker_file, http, truth):
    x = worker_file.dataset("x")
    assert isinstance(RawRows.of(x), RemoteRows)
    for key, most in ((np.s_[0:1000], 1), (np.s_[13:911], 1), (np.s_[[900, 5, 5, 3, 4]], 2)):
        before = _gets(http)
        np.testing.assert_array_equal(_read(x, key), truth["x"][key])
        assert _gets(http) - before <= most, key
    label = worker_file.dataset("label")  # contiguous
    assert isinstance(RawRows.of(label), RemoteRows)
    np.testing.assert_array_equal(_read(label, np.s_[::7]), truth["label"][::7])


def test_compressed_chunks_fetched_then_decoded(worker_file, http, truth):
    gz = worker_file.dataset("gz")
    decoder = ChunkDecoder.of(gz)
    assert isinstance(decoder, RemoteDecoder)
    before = _gets(http)
    np.testing.assert_array_equal(_read(gz, np.s_[20:980]), truth["gz"][20:980])
    assert _gets(http) - before == 1  # the chunks lie end to end: one merged GET
    np.testing.assert_array_equal(_read(gz, np.s_[[999, 0, 500]]), truth["gz"][[999, 0, 500]])


def test_what_the_fast_paths_leave_goes_through_hdf5(worker_file, truth):
    wide = worker_file.dataset("wide")  # chunked across rows
    assert RawRows.of(wide) is None and ChunkDecoder.of(wide) is None
    np.testing.assert_array_equal(_read(wide, np.s_[5:300, 3:17]), truth["wide"][5:300, 3:17])


def test_second_epoch_with_cache_dir_makes_no_request(http, tmp_path, local):
    url = http.url(H5_NAME)
    kw = dict(batch_size=100, shuffle=True, n_procs=2, cache_dir=str(tmp_path / "cache"))
    with multitables.Loader(url, {"x": "x", "gz": "gz"}, **kw) as loader, \
            multitables.Loader(local, {"x": "x", "gz": "gz"}, batch_size=100, shuffle=True,
                               n_procs=2) as here:
        first = list(loader)
        before = _gets(http)
        second = list(loader)
        assert _gets(http) == before  # every range and HDF5's metadata came from the cache
        for got, want in zip(first + second, list(here) + list(here), strict=True):
            np.testing.assert_array_equal(got["x"], want["x"])
            np.testing.assert_array_equal(got["gz"], want["gz"])
    assert any((tmp_path / "cache").rglob("*.mtb"))


def test_open_costs_few_requests_and_info_says_so(http, capsys):
    url = http.url(H5_NAME)
    with multitables.Reader(url, n_procs=1) as reader:
        for path in ("x", "gz", "label", "table", "wide"):
            reader.get_dataset(path)
    assert http.counts["requests"] <= 4
    assert cli.main(["info", url]) == 0
    out = capsys.readouterr().out
    assert f"opened {url} with 2 request(s)" in out and "/gz" in out


def test_second_open_with_cache_dir_costs_one_request(http, tmp_path, truth):
    """An open of a version seen before with this cache_dir reads HDF5's metadata and the chunk
    maps from the local disk: the request that pins the version is the only one (both kept
    under the version's identity: its size and ETag)."""
    url, cache = http.url(H5_NAME), str(tmp_path / "cache")
    paths = ("x", "gz", "label", "table", "wide")

    def open_and_read() -> int:
        with multitables.Reader(url, n_procs=1, cache_dir=cache) as reader:
            datasets = [reader.get_dataset(path) for path in paths]
            opened = http.counts["requests"]
            for path, ds in zip(paths, datasets, strict=True):
                stage = ds.create_stage(20)
                np.testing.assert_array_equal(reader.request(ds[3:9], stage).get(),
                                              truth[path][3:9], err_msg=path)
        return opened

    first = http.counts["requests"]
    assert open_and_read() - first >= 2  # the pin, then the first 4 MiB of the file
    second = http.counts["requests"]
    assert open_and_read() - second == 1


def test_reads_ahead_take_their_chunks_buffer_from_the_pool_and_give_it_back(
        worker_file, truth, monkeypatch):
    from multitables._hdf5 import remoteread
    from multitables._sources.scratch import Scratch

    pool = Scratch()
    monkeypatch.setattr(remoteread, "SCRATCH", pool)
    gz = worker_file.dataset("gz")
    decoder = ChunkDecoder.of(gz)
    assert isinstance(decoder, RemoteDecoder)
    at = []
    for start, stop in ((0, 1000), (20, 980), (999, 1000)):
        out = np.empty((stop - start, *gz.shape[1:]), gz.dtype)
        ranges, actions = decoder.requests(start, stop, out)
        at.append(np.frombuffer(ranges[0][2], np.uint8).ctypes.data)  # the buffer's start
        assert pool.kept == 0  # taken
        decoder._fetcher.fetch(ranges, lambda j, actions=actions: actions[j]())
        np.testing.assert_array_equal(out, truth["gz"][start:stop])
        assert pool.kept >= sum(size for _, size, _ in ranges)  # back once all are decoded
    assert at[1] == at[0] and at[2] == at[0]  # the same memory each time: no new pages
