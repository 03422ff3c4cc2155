"""A read-only, seekable file object over a byte source with an LRU cache of blocks, so that h5py
can parse an HDF5 file's metadata over the network in a few requests."""

from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from typing import Any

from .base import Source, as_writable

DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_CACHE_BLOCKS = 64
# The first read: a small file's superblock, object headers, B-trees and heaps usually all sit
# in its first few MiB, so one request brings them all.
DEFAULT_FIRST_READ = 4 << 20


class BlockFile(io.RawIOBase):
    """``h5py.File(BlockFile(source), "r")``: reads go through a cache of ``cache_blocks``
    blocks of ``block_size`` bytes (least recently used out first); the first read fetches
    ``first_read`` bytes from the start in one request; a run of missing blocks is one request;
    a read of at least ``direct_threshold`` bytes goes straight to the source, uncached (a
    contiguous dataset read through h5py, say).

    ``requests`` and ``bytes_fetched`` count this file's requests and bytes; ``bytes_read``
    what its callers asked for; ``touched`` holds the blocks they read (HDF5's metadata, when
    h5py opens a file and its datasets), which ``prime`` fetches at once in another process.
    Closing it leaves the source open unless ``close_source``.

    >>> import tempfile, os
    >>> from multitables._sources import LocalSource
    >>> with tempfile.NamedTemporaryFile() as t:
    ...     _ = t.write(bytes(range(256)) * 8); t.flush()
    ...     f = BlockFile(LocalSource(t.name), block_size=256, first_read=512, close_source=True)
    ...     _ = f.seek(300); data = f.read(4); f.close()
    >>> list(data), f.requests
    ([44, 45, 46, 47], 1)
    """

    def __init__(self, source: Source, *, block_size: int = DEFAULT_BLOCK_SIZE,
                 cache_blocks: int = DEFAULT_CACHE_BLOCKS, first_read: int = DEFAULT_FIRST_READ,
                 direct_threshold: int | None = None, close_source: bool = False) -> None:
        super().__init__()
        if block_size < 1 or cache_blocks < 1 or first_read < 0:
            raise ValueError("block_size and cache_blocks must be >= 1, first_read >= 0")
        self.source, self.block_size, self.cache_blocks = source, block_size, cache_blocks
        self.first_read = first_read
        self.direct_threshold = direct_threshold or 4 * block_size
        self.close_source = close_source
        self.name = source.url
        self.size = source.size
        self.requests = self.bytes_fetched = self.bytes_read = 0
        self.touched: set[int] = set()
        self._blocks: OrderedDict[int, bytearray] = OrderedDict()
        self._pos = 0
        self._primed = first_read == 0
        self._lock = threading.Lock()

    # -- io.RawIOBase --------------------------------------------------------------------------
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self.size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence ({whence})")
        if base + pos < 0:
            raise OSError(f"negative seek position {base + pos} in {self.name}")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        view = as_writable(buffer)
        n = max(min(view.nbytes, self.size - self._pos), 0)
        if n:
            with self._lock:
                self._read_at(self._pos, view[:n])
            self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            self._blocks.clear()
            if self.close_source:
                self.source.close()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on closed file {self.name}")

    # -- the cache -----------------------------------------------------------------------------
    def _read_at(self, pos: int, view: memoryview) -> None:
        self.bytes_read += view.nbytes
        if not self._primed:
            self._primed = True
            last = (min(self.first_read, self.size) - 1) // self.block_size
            if last >= 0:
                self._fetch_blocks(0, last)
        if view.nbytes >= self.direct_threshold:
            self._get(pos, [view])
            return
        bs = self.block_size
        first, last = pos // bs, (pos + view.nbytes - 1) // bs
        self.touched.update(range(first, last + 1))
        b = first
        while b <= last:  # fetch each run of missing blocks with one request
            if b in self._blocks:
                b += 1
                continue
            end = b
            while end + 1 <= last and end + 1 not in self._blocks:
                end += 1
            self._fetch_blocks(b, end)
            b = end + 1
        done = 0
        for b in range(first, last + 1):
            block = self._blocks[b]
            self._blocks.move_to_end(b)
            at = pos + done - b * bs
            n = min(len(block) - at, view.nbytes - done)
            view[done:done + n] = memoryview(block)[at:at + n]
            done += n
        while len(self._blocks) > max(self.cache_blocks, last - first + 1):
            self._blocks.popitem(last=False)

    def held(self, blocks: Any, wait: bool = True) -> dict[int, bytearray]:
        """The bytes of those of ``blocks`` (block numbers) that the cache holds now: the
        cache's own buffers, not copies (a block is never written once fetched; a forked child
        reads its parent's without faulting its pages in or copying them, at every job start).
        With ``wait=False`` (a forked child reading its parent's copy, whose lock another
        thread may have held at the fork): none unless the lock is free at once."""
        if not self._lock.acquire(blocking=wait):
            return {}
        try:
            return {b: self._blocks[b] for b in blocks if b in self._blocks}
        finally:
            self._lock.release()

    def prime(self, blocks: Any, fetcher: Any, given: dict[int, Any] | None = None) -> None:
        """Fetch ``blocks`` (block numbers, e.g. another process's ``touched``) with
        ``fetcher.fetch``, all at once, instead of the first read; those in ``given`` (block
        number: its bytes, e.g. another process's ``held``, of the same pinned version) are
        kept as they are, not copied, without a request."""
        with self._lock:
            bs, wanted = self.block_size, []
            for b, data in (given or {}).items():
                if 0 <= b * bs < self.size and len(data) == min(bs, self.size - b * bs):
                    self._blocks[b] = data
            for b in sorted(set(blocks)):
                if b not in self._blocks and 0 <= b * bs < self.size:
                    wanted.append((b, bytearray(min(bs, self.size - b * bs))))
            fetcher.fetch([(b * bs, len(block), block) for b, block in wanted])
            for b, block in wanted:
                self._blocks[b] = block
            self._primed = True

    def _fetch_blocks(self, first: int, last: int) -> None:
        bs = self.block_size
        blocks = [bytearray(min(bs, self.size - b * bs)) for b in range(first, last + 1)]
        self._get(first * bs, [memoryview(b) for b in blocks])
        for b, block in zip(range(first, last + 1), blocks, strict=True):
            self._blocks[b] = block

    def _get(self, offset: int, segments: list[memoryview]) -> None:
        nbytes = sum(s.nbytes for s in segments)
        self.source.stats.add(needed=nbytes)
        self.source.read_segments(offset, segments)
        self.requests += 1
        self.bytes_fetched += nbytes

    def __repr__(self) -> str:
        return (f"BlockFile({self.name!r}, size={self.size}, requests={self.requests}, "
                f"bytes_fetched={self.bytes_fetched})")
