"""BlockFile: file semantics against io.BytesIO, and h5py over it over HTTP and S3 equal to h5py
on the local file, opening in at most 4 requests."""

from __future__ import annotations

import io
import os
import random

import h5py
import numpy as np
import pytest
from conftest import BLOB_NAME, H5_NAME

from multitables._sources import open_source
from multitables._sources.blockfile import BlockFile
from multitables._sources.chunkmap import chunk_map


def test_file_semantics_match_bytesio(http, blob):
    rng = random.Random(4)
    with open_source(http.url(BLOB_NAME)) as src:
        f = BlockFile(src, block_size=4096, cache_blocks=8, first_read=10_000)
        ref = io.BytesIO(blob)
        for _ in range(150):
            op = rng.random()
            if op < 0.3:
                pos = rng.randint(-100, len(blob) + 100)
                whence = rng.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
                target = {os.SEEK_SET: pos, os.SEEK_CUR: ref.tell() + pos,
                          os.SEEK_END: len(blob) + pos}[whence]
                if target < 0:
                    with pytest.raises(OSError):
                        f.seek(pos, whence)
                    continue
                assert f.seek(pos, whence) == ref.seek(pos, whence)
            else:
                n = rng.choice([1, 100, 4095, 4096, 5000, 20_000, 50_000])
                assert f.read(n) == ref.read(n)
                assert f.tell() == ref.tell()
        assert len(f._blocks) <= 8
        f.close()
        with pytest.raises(ValueError, match="closed file"):
            f.read(1)


def test_first_read_and_block_runs(http, blob):
    with open_source(http.url(BLOB_NAME)) as src:
        f = BlockFile(src, block_size=1 << 16, first_read=1 << 18, cache_blocks=16)
        f.seek(100)
        assert f.read(10) == blob[100:110] and f.requests == 1  # the first read: 4 blocks
        f.seek((1 << 18) - 5)
        assert f.read(10) == blob[(1 << 18) - 5:(1 << 18) + 5] and f.requests == 2
        f.seek(1 << 20)
        assert f.read(3 << 16) == blob[1 << 20:(1 << 20) + (3 << 16)]
        assert f.requests == 3  # three missing blocks: one request
        f.seek(0)
        assert f.read(1 << 18) == blob[:1 << 18] and f.requests == 4  # large: direct
        assert f.bytes_fetched == (1 << 18) + (1 << 16) + (3 << 16) + (1 << 18)


def walk(f: h5py.File) -> dict:
    """Everything h5py says about every dataset, and its values."""
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out[name] = (obj.shape, obj.dtype, obj.chunks, obj.compression, obj[()])
    f.visititems(visit)
    out["attrs"] = dict(f.attrs)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k == "attrs":
            assert a[k] == b[k]
            continue
        *meta_a, va = a[k]
        *meta_b, vb = b[k]
        assert meta_a == meta_b, k
        np.testing.assert_array_equal(va, vb, err_msg=k)


def test_h5py_over_blockfile_equals_local(open_remote, source_dir):
    with h5py.File(source_dir[0] / H5_NAME, "r") as f:
        expected = walk(f)
    src = open_remote(H5_NAME)
    with src, BlockFile(src) as bf, h5py.File(bf, "r") as f:
        assert_same(walk(f), expected)
        np.testing.assert_array_equal(f["grp/raw"][100:300:7, 5],
                                      expected["grp/raw"][-1][100:300:7, 5])


def test_open_and_walk_metadata_in_at_most_4_requests(open_remote):
    src = open_remote(H5_NAME)
    assert src.size > 4 << 20  # the data goes past the first read
    with src, BlockFile(src) as bf, h5py.File(bf, "r") as f:
        described = {}

        def describe(name, obj):
            if isinstance(obj, h5py.Dataset):
                described[name] = (obj.shape, obj.dtype, obj.chunks, dict(obj.attrs))
        f.visititems(describe)
        assert len(described) == 6 and f.attrs["title"] == "byte sources"
        maps = [chunk_map(f[name]) for name in described]
        assert sum(len(m) for m in maps) == 20 + 16 + 1 + 0 + 5 + 1
        assert src.stats.requests <= 4, (src.stats, bf)  # here: the open, then the first read


def test_prime_keeps_the_blocks_another_file_holds_without_a_copy(http, blob):
    # A forked worker primes its BlockFile with its parent's blocks at every job start: the
    # parent's buffers themselves, never written once fetched, so no page of them is copied.
    with open_source(http.url(BLOB_NAME)) as src:
        parent = BlockFile(src, block_size=4096, first_read=3 * 4096)
        parent.read(10)
        held = parent.held([0, 1, 2, 7])
        assert sorted(held) == [0, 1, 2]
        assert all(held[b] is parent._blocks[b] for b in held)
        child = BlockFile(src, block_size=4096, first_read=0)
        before = src.stats.snapshot()["requests"]
        with src.fetcher() as fetcher:
            child.prime([0, 1, 2], fetcher, held)
        assert src.stats.snapshot()["requests"] == before
        assert all(child._blocks[b] is held[b] for b in held)
        child.seek(4000)
        assert child.read(9000) == blob[4000:13000]
