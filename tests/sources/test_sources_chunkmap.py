"""Chunk maps: built over the network equal to the local file's, picklable, stored and loaded by
the file's version (a second open costs one request), and good enough to read every chunk's
raw bytes by range."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
from conftest import H5_NAME

from multitables._sources import open_source
from multitables._sources.blockfile import BlockFile
from multitables._sources.chunkmap import ChunkMapStore, chunk_map

NAMES = ["gz", "grp/raw", "contig", "compact", "table", "partial"]


@pytest.fixture(scope="module")
def local_maps(source_dir):
    with h5py.File(source_dir[0] / H5_NAME, "r") as f:
        return {name: chunk_map(f[name]) for name in NAMES}


def test_layouts(local_maps, source_dir):
    gz, raw, contig, compact, table, partial = (local_maps[n] for n in NAMES)
    assert gz.layout == "chunked" and len(gz) == 20 and gz.chunks == (100, 64)
    assert [f[3] for f in gz.filters] == ["shuffle", "deflate"]
    assert raw.chunk_offsets.tolist()[:3] == [[0, 0], [0, 128], [256, 0]]
    assert (raw.sizes == 256 * 128 * 4).all() and raw.filters == ()
    assert contig.layout == "contiguous" and contig.sizes.tolist() == [300_000 * 8]
    assert compact.layout == "compact" and len(compact) == 0
    assert np.frombuffer(compact.compact_data, np.int16).tolist() == list(range(10))
    assert table.dtype.names == ("a", "b") and len(table) == 5
    assert len(partial) == 1 and partial.chunk_offsets.tolist() == [[200]]
    assert np.frombuffer(partial.fillvalue, np.int64).tolist() == [-1]
    assert pickle.loads(pickle.dumps(gz)) == gz


def test_over_the_network_equals_local(open_remote, local_maps):
    with open_remote(H5_NAME) as src, BlockFile(src) as bf, h5py.File(bf, "r") as f:
        for name in NAMES:
            assert chunk_map(f[name], key=src.identity) == local_maps[name], name


def test_raw_chunks_by_range_equal_hdf5s(open_remote, source_dir, local_maps):
    with h5py.File(source_dir[0] / H5_NAME, "r") as f, open_remote(H5_NAME) as src, \
            src.fetcher() as fetcher:
        for name in ("gz", "grp/raw", "table"):
            cm = local_maps[name]
            bufs = [np.empty(int(n), np.uint8) for n in cm.sizes]
            fetcher.fetch(zip(cm.byte_offsets.tolist(), cm.sizes.tolist(), bufs, strict=True))
            for start, buf in zip(cm.chunk_offsets, bufs, strict=True):
                mask, expected = f[name].id.read_direct_chunk(tuple(int(s) for s in start))
                assert buf.tobytes() == expected and mask == 0
        cm = local_maps["contig"]
        out = np.empty(300_000)
        src.read_into(int(cm.byte_offsets[0]), out)
        np.testing.assert_array_equal(out, f["contig"][()])


def test_store_round_trip_and_second_open_costs_one_request(http, tmp_path, local_maps):
    store = ChunkMapStore(tmp_path / "maps")
    with open_source(http.url(H5_NAME)) as src, BlockFile(src) as bf, h5py.File(bf, "r") as f:
        for name in NAMES:
            store.save(chunk_map(f[name], key=src.identity))
    with open_source(http.url(H5_NAME)) as src:
        loaded = {name: store.load(src.identity, name) for name in NAMES}
        assert src.stats.requests == 1
    assert loaded == local_maps
    assert all(cm.key == src.identity for cm in loaded.values())


def test_store_misses_another_version(http, tmp_path):
    store = ChunkMapStore(tmp_path / "maps")
    with open_source(http.url(H5_NAME)) as src, BlockFile(src) as bf, h5py.File(bf, "r") as f:
        store.save(chunk_map(f["gz"], key=src.identity))
        key = src.identity
    other = (key[0], key[1], '"another-etag"')
    assert store.load(other, "gz") is None
    assert store.load(key, "contig") is None
    store.path(key, "gz").write_bytes(b"not a zip file")  # damaged: counts as absent
    assert store.load(key, "gz") is None
    with pytest.raises(ValueError, match="without a key"):
        store.save(chunk_map_without_key(http))


def test_store_keeps_metadata_block_numbers_by_version(tmp_path):
    store = ChunkMapStore(tmp_path / "maps")
    key = ("http://h/a.h5", 1234, '"etag-1"')
    assert store.load_blocks(key) == []
    store.save_blocks(key, {3: b"", 0: b""})
    assert store.load_blocks(key) == [0, 3]
    assert store.load_blocks((key[0], key[1], '"etag-2"')) == []  # another version
    store.blocks_path(key).write_text("{not json")  # damaged: counts as absent
    assert store.load_blocks(key) == []


def chunk_map_without_key(http):
    with open_source(http.url(H5_NAME)) as src, BlockFile(src) as bf, h5py.File(bf, "r") as f:
        return chunk_map(f["gz"])
