"""Fixtures of the front doors' tests on remote files: a small HDF5 file of the layouts the read
paths treat apart (unfiltered rows, gzip+shuffle chunks, a table, contiguous data, a column
chunked across rows), served by our range server and ``rclone serve s3``."""

from __future__ import annotations

import numpy as np
import pytest
from servers.fixtures import BUCKET, aws_env, http, http_factory, rclone, remote

from .remote_files import H5_NAME, write_remote_h5

__all__ = ["BUCKET", "aws_env", "http", "http_factory", "rclone", "remote"]


@pytest.fixture(scope="session")
def source_dir(tmp_path_factory):
    """A directory with ``remote.h5``, and ``truth``: the arrays it holds by dataset path."""
    d = tmp_path_factory.mktemp("remote")
    truth = write_remote_h5(str(d / H5_NAME))
    return d, truth


@pytest.fixture
def local(source_dir) -> str:
    """The local path of the file the servers serve (their copies are byte for byte equal)."""
    return str(source_dir[0] / H5_NAME)


@pytest.fixture
def truth(source_dir) -> dict[str, np.ndarray]:
    return source_dir[1]
