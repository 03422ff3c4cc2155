"""Fixtures of the byte-source tests: an HDF5 file with every storage layout, served by our HTTP
range server and ``rclone serve s3`` (``servers.fixtures``, shared with the front doors' tests
of remote files)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from servers.fixtures import BUCKET, aws_env, http, http_factory, open_remote, rclone

__all__ = ["BUCKET", "aws_env", "http", "http_factory", "open_remote", "rclone"]

H5_NAME = "data.h5"
BLOB_NAME = "blob.bin"
BLOB_SIZE = 3_000_000


def write_h5(path: str) -> dict[str, np.ndarray]:
    """Every layout h5py makes (chunked gzip+shuffle, chunked raw, contiguous, compact, a
    compound table, chunks never written), about 8 MiB, its metadata aggregated at the start
    (``meta_block_size``) as a file written for the cloud would have it."""
    rng = np.random.default_rng(19)
    truth = {
        "gz": rng.integers(0, 50, (2000, 64), dtype=np.int32),
        "raw": rng.random((2048, 256), dtype=np.float32),
        "contig": rng.random(300_000),
        "compact": np.arange(10, dtype=np.int16),
        "table": np.array([(i, i / 3) for i in range(500)], [("a", "<i4"), ("b", "<f8")]),
    }
    partial = np.full(1000, -1, np.int64)
    partial[200:300] = np.arange(100)
    truth["partial"] = partial
    compact = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    compact.set_layout(h5py.h5d.COMPACT)
    with h5py.File(path, "w", meta_block_size=4 << 20) as f:
        f.create_dataset("gz", data=truth["gz"], chunks=(100, 64), compression="gzip",
                         shuffle=True)
        f.create_dataset("grp/raw", data=truth["raw"], chunks=(256, 128))
        f.create_dataset("contig", data=truth["contig"])
        f.create_dataset("compact", data=truth["compact"], dcpl=compact)
        f.create_dataset("table", data=truth["table"], chunks=(100,))
        p = f.create_dataset("partial", shape=(1000,), dtype=np.int64, chunks=(100,),
                             fillvalue=-1)
        p[200:300] = np.arange(100)
        f.attrs["title"] = "byte sources"
    return truth


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory):
    """A directory with ``data.h5`` and ``blob.bin`` (random bytes), and ``truth``."""
    d = tmp_path_factory.mktemp("sources")
    truth = write_h5(str(d / H5_NAME))
    (d / BLOB_NAME).write_bytes(np.random.default_rng(1).bytes(BLOB_SIZE))
    return d, truth


@pytest.fixture
def blob(source_dir) -> bytes:
    return (source_dir[0] / BLOB_NAME).read_bytes()
