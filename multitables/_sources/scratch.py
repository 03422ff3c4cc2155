"""Buffers for the stored bytes of reads in flight, kept for this process's next reads (internal).

A buffer of a few MB from ``np.empty`` is fresh memory each time, and the GETs that fill it
fault in every page of it: a Streamer's pass over 14 MB of gzip chunks took some 4,000 page
faults in its workers' fetch threads, a few ms of CPU on cores that decode. A buffer given back
here once the bytes in it are used is the next read's, its pages already in.
"""

from __future__ import annotations

import bisect
import threading

import numpy as np

# Buffers are rounded up to a multiple of this, so that reads of slightly different sizes share
# them; a kept buffer serves a read of at least half its size, so that the many small reads of
# a Loader's units (90 KB each) do not each hold a buffer made for a Streamer's slot (3 MB).
GRANULE = 64 << 10
# Bytes of buffers a process keeps idle at most (a worker reads ahead 16 MiB of rows, stored
# in at most as many bytes); more are left to the garbage collector.
KEEP_BYTES = 32 << 20


class Scratch:
    """A pool of byte buffers: ``take(n)`` gives one of at least ``n`` bytes (the smallest kept
    that fits and is at most about twice ``n``, else a new one), ``give(buf)`` keeps it for a
    later ``take``. Thread-safe.

    >>> pool = Scratch(keep_bytes=4 << 20)
    >>> a = pool.take(100_000)
    >>> a.nbytes, a.dtype
    (131072, dtype('uint8'))
    >>> pool.give(a)
    >>> pool.take(60_000) is a
    True
    """

    def __init__(self, keep_bytes: int = KEEP_BYTES, granule: int = GRANULE) -> None:
        self.keep_bytes, self.granule = keep_bytes, granule
        self._lock = threading.Lock()
        self._sizes: list[int] = []  # sorted, beside ``_bufs``
        self._bufs: list[np.ndarray] = []
        self.kept = 0  # bytes of the buffers kept idle

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least ``nbytes`` bytes, for the caller alone until it gives it
        back."""
        with self._lock:
            i = bisect.bisect_left(self._sizes, nbytes)
            if i < len(self._sizes) and self._sizes[i] <= 2 * nbytes + self.granule:
                del self._sizes[i]
                buf = self._bufs.pop(i)
                self.kept -= buf.nbytes
                return buf
        size = -(-max(nbytes, 1) // self.granule) * self.granule
        return np.empty(size, np.uint8)

    def give(self, buf: np.ndarray) -> None:
        """Keep ``buf`` (from ``take``; nothing may use it any more) for a later ``take``, unless
        the pool holds ``keep_bytes`` already."""
        with self._lock:
            if self.kept + buf.nbytes > self.keep_bytes:
                return
            i = bisect.bisect_left(self._sizes, buf.nbytes)
            self._sizes.insert(i, buf.nbytes)
            self._bufs.insert(i, buf)
            self.kept += buf.nbytes

    def clear(self) -> None:
        with self._lock:
            self._sizes.clear()
            self._bufs.clear()
            self.kept = 0

    def _after_fork_in_child(self) -> None:
        # The parent's buffers would fault in again, copied on write: not worth keeping.
        self._lock = threading.Lock()
        self.clear()


class Countdown:
    """Gives ``buf`` back to ``pool`` once ``n`` uses of it have ended (``one_done``); a use
    that never ends (a failed GET, a chunk left to HDF5) leaves it to the garbage collector."""

    def __init__(self, pool: Scratch, buf: np.ndarray, n: int) -> None:
        self.pool, self.buf, self.left = pool, buf, n
        self._lock = threading.Lock()

    def one_done(self) -> None:
        with self._lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.pool.give(self.buf)


# The pool of this process's fetches (fetch.py's fork hook clears it in a forked child).
SCRATCH = Scratch()
