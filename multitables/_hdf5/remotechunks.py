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
    reads it. The chunks of scattered reads stay in memory a while (``_STORED``), as HDF5's
    reads stay in its ``BlockFile``: random reads of a small dataset soon need no request."""

    def __init__(self, decoder: RemoteDecoder):
        self.decoder = decoder
        self.row_bytes, self.chunk_rows = decoder.row_bytes, decoder.chunk_rows
        self._local = threading.local()  # each thread's scratch of decoded chunks

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
        ranges, actions = found
        self._fetch(ranges, actions, [])

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        rows = np.asarray(rows, np.int64)
        if not len(rows):
            return
        d, cr, rb = self.decoder, self.chunk_rows, self.row_bytes
        chunks, which = np.unique(rows // cr, return_inverse=True)
        if chunks[0] < 0 or chunks[-1] >= len(d.ok) or not d.ok[chunks].all():
            raise _Declined
        sizes = d._sizes[chunks]
        decoded = self._scratch(len(chunks) * d.chunk_bytes).reshape(len(chunks), -1)
        identity = d._fetcher.source.identity
        ranges: list[tuple[int, int, Any]] = []
        actions: list[Callable[[], None] | None] = []
        kept: list[Callable[[], None]] = []
        body = np.empty(int(sizes.sum()), np.uint8)
        at = 0
        for j, (k, size) in enumerate(zip(chunks.tolist(), sizes.tolist(), strict=True)):
            key = (identity, int(d._offsets[k]))
            raw = _STORED.get(key)
            if raw is not None:  # a chunk an earlier scattered read fetched
                kept.append(functools.partial(d._decode_whole, raw, decoded[j]))
                continue
            view = body[at : at + size].data
            at += size
            ranges.append((key[1], size, view))
            actions.append(functools.partial(self._keep_and_decode, key, view, decoded[j]))
        self._fetch(ranges, actions, kept)
        rows_of = decoded.reshape(len(chunks), cr, rb)
        out.reshape(-1).view(np.uint8).reshape(len(rows), rb)[:] = \
            rows_of[which, rows - chunks[which] * cr]

    def _keep_and_decode(self, key: tuple, raw: memoryview, dest: np.ndarray) -> None:
        _STORED.put(key, bytes(raw))
        self.decoder._decode_whole(raw, dest)

    def _fetch(self, ranges: list, actions: list, now: list) -> None:
        """Fetch ``ranges``, running ``actions[i]`` as range ``i`` lands, and run ``now``
        meanwhile; a decode error declines the read."""
        def landed(i: int) -> None:
            if actions[i] is not None:
                actions[i]()

        try:
            if now and ranges:
                ended = threading.Event()
                failed: list[BaseException] = []

                def end(error: BaseException | None) -> None:
                    if error is not None:
                        failed.append(error)
                    ended.set()

                self.decoder._fetcher.start(ranges, landed, end)
                try:
                    for action in now:
                        action()
                finally:
                    while not ended.wait(1.0):  # each GET is bounded by the source's timeout
                        pass
                if failed:
                    raise failed[0]
            else:
                for action in now:
                    action()
                if ranges:
                    self.decoder._fetcher.fetch(ranges, landed)
        except Undecodable as exc:
            fall_back(exc.args[0])
            raise _Declined from None
        except DECODE_ERRORS as exc:
            fall_back(f"failed: {self.decoder.name} raised {type(exc).__name__}")
            raise _Declined from None

    def _scratch(self, nbytes: int) -> np.ndarray:
        """This thread's buffer of at least ``nbytes``: a new one each read would fault its
        pages in again (a 64-row read of 256 KiB chunks decodes up to 16 MiB)."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = np.empty(nbytes, np.uint8)
        return buf[:nbytes]


class _Kept:
    """Stored chunks by (object identity, offset), least recently used out first past
    ``limit`` bytes; shared by the threads of a process (a forked child starts empty)."""

    def __init__(self, limit: int):
        self.limit, self.nbytes = limit, 0
        self._chunks: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            self._mine()
            raw = self._chunks.get(key)
            if raw is not None:
                self._chunks.move_to_end(key)
            return raw

    def put(self, key: tuple, raw: bytes) -> None:
        if len(raw) > self.limit:
            return
        with self._lock:
            self._mine()
            old = self._chunks.pop(key, None)
            self.nbytes += len(raw) - (len(old) if old is not None else 0)
            self._chunks[key] = raw
            while self.nbytes > self.limit:
                _, dropped = self._chunks.popitem(last=False)
                self.nbytes -= len(dropped)

    def _mine(self) -> None:
        if self._pid != os.getpid():
            self._chunks, self.nbytes, self._pid = OrderedDict(), 0, os.getpid()


# The stored chunks of scattered reads a process keeps: as much as a BlockFile keeps of HDF5's
# reads (64 blocks of 1 MiB).
STORED_LIMIT = 64 << 20
_STORED = _Kept(STORED_LIMIT)
