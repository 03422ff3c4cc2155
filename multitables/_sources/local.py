"""A local file as a byte source: ``preadv`` straight into the caller's buffers, pinned to the
file's size and mtime."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

from ..errors import ObjectChangedError
from .base import Source

IOV_MAX = 1024  # Linux's limit on the buffers of one preadv


class LocalSource(Source):
    """``path`` read with ``os.preadv`` (no shared file offset, so threads and forked workers
    can share the descriptor). Identity is (size, mtime_ns): a file replaced or truncated after
    open raises ``ObjectChangedError``."""

    remote = False
    etag = None

    def __init__(self, path: str, *, pinned: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.path = self.url = path
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        if pinned is None:
            st = os.stat(path)
            pinned = (st.st_size, st.st_mtime_ns)
        self.size, self.mtime_ns = pinned

    @property
    def identity(self) -> tuple:
        return (self.url, self.size, f"mtime:{self.mtime_ns}")

    def _descriptor(self) -> int:
        # Opened on first read and checked against the pinned version then, so a worker that
        # unpickles this source sees a replaced file at once.
        fd = self._fd
        if fd is not None:
            return fd
        with self._lock:
            if self._fd is None:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._check(fd)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd, self._pid = fd, os.getpid()
            return self._fd

    def _check(self, fd: int) -> None:
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            raise ObjectChangedError(
                f"{self.url} changed since it was opened: {self.size} bytes, mtime_ns "
                f"{self.mtime_ns} then; {st.st_size} bytes, mtime_ns {st.st_mtime_ns} now")

    def read_segments(self, offset: int, segments: Sequence[memoryview],
                      landed: Callable[[int], None] | None = None) -> None:
        fd = self._descriptor()
        views = [memoryview(s) for s in segments]
        pos = offset
        while views:
            n = os.preadv(fd, views[:IOV_MAX], pos)
            if n == 0:
                self._check(fd)  # raises if truncated; else the range was past the end
                raise ValueError(f"byte range from {offset} is outside {self.url} "
                                 f"({self.size} bytes)")
            pos += n
            self.stats.add(fetched=n)
            while views and n >= views[0].nbytes:
                n -= views[0].nbytes
                views.pop(0)
            if n:
                views[0] = views[0][n:]
        self.stats.add(requests=1)
        if landed is not None:
            for k in range(len(segments)):
                landed(k)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            # A forked child closes only its own copy of the descriptor: harmless to the parent.
            if fd is not None:
                os.close(fd)

    def __reduce__(self) -> tuple:
        return (_pinned, (self.path, self.size, self.mtime_ns))


def _pinned(path: str, size: int, mtime_ns: int) -> LocalSource:
    return LocalSource(path, pinned=(size, mtime_ns))
