"""Rows of a compressed dataset in an object store read by whole chunks, any number of threads
at once: the Reader's random rows of compressed data over a URL, and every whole-row read of it
past HDF5 (internal; ``remoteread.remote_rows`` hands such a dataset to ``RemoteChunkRows``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from .fallback import Undecodable, fall_back
from .libraries import DECODE_ERRORS
from .rawread import RawRows
from .remoteread import RemoteDecoder


class _Declined(Exception):
    """A read ``RemoteChunkRows`` leaves to HDF5 (a chunk not stored, or undecodable)."""


class RemoteChunkRows(RawRows):
    """``RawRows`` of a compressed dataset in an object store, chunked in whole rows: the rows
    of a read, a run or scattered (a Reader's random rows), come from one fetch of the stored
    chunks they lie in, each decoded as it lands by the fetch thread that brought it. Each read
    keeps its own buffers, so threads may read at once. A read it cannot make (a chunk not
    stored, or stored with a filter skipped, or that fails to decode) returns False, and HDF5
    reads it. The chunks of scattered reads stay in memory decoded a while (``_DECODED``), as
    HDF5 keeps them for such reads through it: random reads of a small dataset soon need
    neither a request nor a decode."""

    def __init__(self, decoder: RemoteDecoder):
        self.decoder = decoder
        self.row_bytes, self.chunk_rows = decoder.row_bytes, decoder.chunk_rows

    def read(self, sel: Any, buf: np.ndarray) -> bool:
        try:
            return super().read(sel, buf)
        except _Declined:
            return False

    def gather(self, sel: Any, out: np.ndarray) -> bool:
        try:
            return super().gather(sel, out)
        except _Declined:
            return False

    def requests(self, start: int, stop: int, out: np.ndarray) -> Any:
        """As ``RemoteDecoder.requests`` (for ``RowsAhead``)."""
        return self.decoder.requests(start, stop, out)

    def _read_run(self, row: int, count: int, out: memoryview) -> None:
        found = self.decoder.requests(row, row + count, np.frombuffer(out, np.uint8))
        if found is None:
            raise _Declined
        self._fetch(*found)

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return
        d, cr, rb = self.decoder, self.chunk_rows, self.row_bytes
        chunks, which = np.unique(rows // cr, return_inverse=True)
        if chunks[0] < 0 or chunks[-1] >= len(d.ok) or not d.ok[chunks].all():
            raise _Declined
        sizes = d._sizes[chunks]
        identity = d._fetcher.source.identity
        decoded: list[np.ndarray] = []
        ranges: list[tuple[int, int, Any]] = []
        actions: list[Callable[[], None] | None] = []
        body = np.empty(int(sizes.sum()), np.uint8)
        at = 0
        for k, size in zip(chunks.tolist(), sizes.tolist(), strict=True):
            key = (identity, int(d._offsets[k]))
            chunk = _DECODED.get(key)
            if chunk is None:  # else decoded by an earlier scattered read
                chunk = np.empty(d.chunk_bytes, np.uint8)
                view = body[at : at + size].data
                at += size
                ranges.append((key[1], size, view))
                actions.append(functools.partial(self._decode_and_keep, key, view, chunk))
            decoded.append(chunk)
        self._fetch(ranges, actions)
        dest = out.reshape(-1).view(np.uint8).reshape(len(rows), rb)
        within = rows - chunks[which] * cr
        order = np.argsort(which, kind="stable")  # the rows of each chunk, together
        bounds = np.searchsorted(which[order], np.arange(len(chunks) + 1))
        for j, chunk in enumerate(decoded):
            mine = order[bounds[j] : bounds[j + 1]]
            dest[mine] = chunk.reshape(cr, rb)[within[mine]]

    def _decode_and_keep(self, key: tuple, raw: memoryview, dest: np.ndarray) -> None:
        self.decoder._decode_whole(raw, dest)
        _DECODED.put(key, dest)

    def _fetch(self, ranges: list, actions: list) -> None:
        """Fetch ``ranges``, running ``actions[i]`` as range ``i`` lands; a decode error
        declines the read."""
        def landed(i: int) -> None:
            if actions[i] is not None:
                actions[i]()

        try:
            if ranges:
                self.decoder._fetcher.fetch(ranges, landed)
        except Undecodable as exc:
            fall_back(exc.args[0])
            raise _Declined from None
        except DECODE_ERRORS as exc:
            fall_back(f"failed: {self.decoder.name} raised {type(exc).__name__}")
            raise _Declined from None


class _Kept:
    """Decoded chunks by (object identity, offset), least recently used out first past
    ``limit`` bytes; shared by the threads of a process (a forked child starts empty)."""

    def __init__(self, limit: int):
        self.limit, self.nbytes = limit, 0
        self._chunks: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, key: tuple) -> np.ndarray | None:
        with self._lock:
            self._mine()
            raw = self._chunks.get(key)
            if raw is not None:
                self._chunks.move_to_end(key)
            return raw

    def put(self, key: tuple, chunk: np.ndarray) -> None:
        if chunk.nbytes > self.limit:
            return
        with self._lock:
            self._mine()
            old = self._chunks.pop(key, None)
            self.nbytes += chunk.nbytes - (old.nbytes if old is not None else 0)
            self._chunks[key] = chunk
            while self.nbytes > self.limit:
                _, dropped = self._chunks.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def _mine(self) -> None:
        if self._pid != os.getpid():
            self._chunks, self.nbytes, self._pid = OrderedDict(), 0, os.getpid()


# The decoded chunks of scattered reads a process keeps, as HDF5 keeps them in its chunk cache
# for the same reads through it (and the BlockFile their stored bytes): 64 MiB.
DECODED_LIMIT = 64 << 20
_DECODED = _Kept(DECODED_LIMIT)
