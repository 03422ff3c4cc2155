"""LocalSource: preadv into caller buffers, pinned to size and mtime, across pickle and fork."""

from __future__ import annotations

import multiprocessing
import os
import pickle

import numpy as np
import pytest
from conftest import BLOB_NAME

from multitables._sources import LocalSource, open_source
from multitables.errors import ObjectChangedError


def test_reads_equal_the_bytes(source_dir, blob):
    path = str(source_dir[0] / BLOB_NAME)
    with open_source(path, {"timeout": 1}) as src:
        assert isinstance(src, LocalSource) and src.size == len(blob) and src.etag is None
        assert src.read(0, 10) == blob[:10]
        out = np.empty(1000, np.uint16)
        src.read_into(12345, out)
        assert out.tobytes() == blob[12345:12345 + 2000]
        src.read_segments(5, [memoryview(bytearray(3)), memoryview(bytearray(0))])
        assert src.stats.requests == 3 and src.stats.bytes_needed == 2010
        with pytest.raises(ValueError, match=r"byte range .* is outside"):
            src.read(len(blob) - 1, 2)
        with pytest.raises(TypeError, match="read-only"):
            src.read_into(0, b"abc")


def test_replaced_file_is_refused(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    src = LocalSource(str(path))
    clone = pickle.loads(pickle.dumps(src))
    path.write_bytes(b"b" * 50)
    os.utime(path, ns=(1, 1))
    with pytest.raises(ObjectChangedError, match="changed since it was opened"):
        clone.read(0, 10)
    src.close(), clone.close()


def _child_reads(src, conn):
    conn.send(src.read(100, 50))
    src.close()


def test_fork_reads_with_the_inherited_descriptor(source_dir, blob):
    src = LocalSource(str(source_dir[0] / BLOB_NAME))
    assert src.read(0, 4) == blob[:4]  # the descriptor is open before the fork
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_child_reads, args=(src, there))
    p.start()
    assert here.poll(10), "the child did not answer"
    assert here.recv() == blob[100:150]
    p.join(10)
    here.close(), there.close()
    assert src.read(7, 3) == blob[7:10]
    src.close()
