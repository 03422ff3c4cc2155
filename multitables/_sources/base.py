"""The byte-source interface: one object (a local file, an HTTP URL, an S3 key) whose byte ranges
can be read into caller-owned buffers, pinned to one version of the object."""

from __future__ import annotations

import abc
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# How many request latencies a SourceStats keeps (the most recent ones), for p50/p99.
LATENCY_WINDOW = 100_000


class SourceStats:
    """Counters of one source in one process: requests, bytes fetched (off the wire, discarded
    bytes included) against bytes needed (what callers asked for), retries, and the latency of
    each request in seconds. Thread-safe; a worker's copy starts at zero."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_fetched = 0
        self.bytes_needed = 0
        self.retries = 0
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def add(self, *, requests: int = 0, fetched: int = 0, needed: int = 0, retries: int = 0,
            latency: float | None = None) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_fetched += fetched
            self.bytes_needed += needed
            self.retries += retries
            if latency is not None:
                self.latencies.append(latency)

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0-100) of the request latencies kept, in seconds (nan if
        none)."""
        with self._lock:
            values = list(self.latencies)
        return float(np.percentile(values, q)) if values else float("nan")

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self.requests, "bytes_fetched": self.bytes_fetched,
                    "bytes_needed": self.bytes_needed, "retries": self.retries}

    def __repr__(self) -> str:
        s = self.snapshot()
        return ("SourceStats(" + ", ".join(f"{k}={v}" for k, v in s.items())
                + f", p50={self.percentile(50) * 1e3:.2f} ms, "
                f"p99={self.percentile(99) * 1e3:.2f} ms)")


def as_writable(buffer: Any) -> memoryview:
    """``buffer`` as a flat writable byte view, or ``TypeError``."""
    view = memoryview(buffer)
    if view.readonly:
        raise TypeError("the destination buffer is read-only")
    if not view.c_contiguous:
        raise TypeError("the destination buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


class Source(abc.ABC):
    """One object's bytes, pinned at open to one version (size and ETag, or size and mtime for
    a local file): a read of a replaced object raises ``ObjectChangedError``.

    A source pickles as its location, options and pinned version, so a worker reopens it without
    a request and its first read checks the version. Network sources make their connections
    lazily in the process that uses them, never inheriting them across ``fork``.
    """

    #: The object's name for messages: a path, or a URL without credentials or query string.
    url: str
    #: The object's size in bytes, pinned at open.
    size: int
    #: The ETag pinned at open (None for local files and servers that give none).
    etag: str | None
    #: True when reads are network requests (and worth merging and running in parallel).
    remote: bool = False

    def __init__(self) -> None:
        self.stats = SourceStats()

    @property
    @abc.abstractmethod
    def identity(self) -> tuple:
        """What names this version of the object, for cache keys: (url, size, version)."""

    @abc.abstractmethod
    def read_segments(self, offset: int, segments: Sequence[memoryview],
                      landed: Callable[[int], None] | None = None) -> None:
        """Fill ``segments`` (writable byte views, in order) with the bytes from ``offset`` on,
        exactly, or raise: one request for the whole run of bytes. The building block of every
        read; ``fetch.Fetcher`` uses it to merge neighbouring ranges without a copy.

        ``landed(k)``, when given, is called once segment ``k`` holds its bytes, in order, as
        they arrive (the rest of the body may still be coming). A request retried after some
        segments landed never writes into those again: their bytes go to a scratch buffer."""

    def read_into(self, offset: int, buffer: Any) -> None:
        """Fill the writable ``buffer`` with the bytes at ``offset`` exactly, or raise."""
        view = as_writable(buffer)
        self.check_range(offset, view.nbytes)
        if view.nbytes:
            self.stats.add(needed=view.nbytes)
            self.read_segments(offset, [view])

    def read(self, offset: int, size: int) -> bytes:
        """The ``size`` bytes at ``offset``."""
        buf = bytearray(size)
        self.read_into(offset, buf)
        return bytes(buf)

    def check_range(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"byte range {offset}:{offset + size} is outside {self.url} "
                             f"({self.size} bytes)")

    def fetcher(self, **kwargs: Any) -> Any:
        """A :class:`~multitables._sources.fetch.Fetcher` of this source, for many ranges at
        once (made in the process that uses it)."""
        from .fetch import Fetcher
        return Fetcher(self, **kwargs)

    @abc.abstractmethod
    def close(self) -> None:
        """Close connections or descriptors (idempotent); the source reopens them if read
        again."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}, size={self.size}, etag={self.etag!r})"


class RemoteSource(Source):
    """A source reached over the network, pinned to the version its first request saw (a
    ``transport.Pin``: size, and ETag or Last-Modified)."""

    remote = True
    pin: Any

    def pin_to(self, pin: Any) -> None:
        self.pin = pin
        self.size, self.etag = pin.size, pin.etag

    @property
    def identity(self) -> tuple:
        return (self.url, self.size, self.pin.version())
