"""The fast read paths of ``rawread`` and ``decode`` for files in object stores: the byte ranges
of a whole read fetched at once by ranged GETs (several in flight), past HDF5 (internal).

A worker's dataset opened from a ``RemoteFile`` has the chunk map the parent made, so its reads
need no HDF5 metadata over the network: ``RemoteRows`` fetches unfiltered rows straight into the
destination (shared memory), ``RemoteDecoder`` fetches the stored chunks of a read into a
scratch buffer and decodes them with ``decode``'s codecs. ``rawread.RawRows.of`` and
``decode.ChunkDecoder.of`` hand such a dataset to these, with the same interface; what they do
not take (filters with no fast codec, chunks across rows, types that convert, chunks never
written) is read by HDF5 over the worker's ``BlockFile``: correct, one request at a time.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from .._sources.chunkmap import ChunkMap
from .._sources.scratch import SCRATCH, Countdown
from .decode import ChunkDecoder, unshuffle
from .eligibility import DecodePlan, plan
from .fallback import Undecodable, decoded, fall_back
from .libraries import DECODE_ERRORS
from .rawread import RawRows
from .remote import file_of_dataset


class RemoteRows(RawRows):
    """``RawRows`` of an unfiltered dataset in an object store: each read is one ``fetch`` of
    all its ranges (neighbours merged, several GETs in flight), each written straight into its
    place in the destination."""

    def __init__(self, fetcher: Any, row_bytes: int, chunk_rows: int, chunk_offsets: np.ndarray):
        self.fetcher = fetcher
        self.row_bytes = row_bytes
        self.chunk_rows = chunk_rows
        self.chunk_offsets = chunk_offsets
        self.end = int(chunk_offsets.max()) + chunk_rows * row_bytes

    def _read_run(self, row: int, count: int, out: memoryview) -> None:
        self.fetcher.fetch(self._ranges(row, count, out))

    def requests(self, start: int, stop: int, out: np.ndarray
                 ) -> tuple[list[tuple[int, int, Any]], list[Callable[[], None] | None]]:
        """What rows ``start:stop`` need fetched, for ``RowsAhead``: the ranges that write
        them straight into ``out`` (C-contiguous, their bytes), and nothing to do as each
        lands."""
        ranges = self._ranges(start, stop - start, out.reshape(-1).view(np.uint8).data)
        return ranges, [None] * len(ranges)

    def _ranges(self, row: int, count: int, out: memoryview) -> list[tuple[int, int, Any]]:
        ranges, at = [], 0
        while count:
            chunk, first = divmod(row, self.chunk_rows)
            n = min(count, self.chunk_rows - first)
            nbytes = n * self.row_bytes
            ranges.append((int(self.chunk_offsets[chunk]) + first * self.row_bytes, nbytes,
                           out[at : at + nbytes]))
            at += nbytes
            row += n
            count -= n
        return ranges

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        rb = self.row_bytes
        if not len(rows) or not rb:
            return
        chunk, first = np.divmod(np.asarray(rows, np.int64), self.chunk_rows)
        offsets = self.chunk_offsets[chunk] + first * rb
        # Rows that follow each other in the file and in ``out`` are one range.
        starts = np.flatnonzero(np.diff(offsets, prepend=offsets[0] - rb - 1) != rb)
        ends = np.append(starts[1:], len(offsets))
        dest = out.reshape(-1).view(np.uint8).data
        self.fetcher.fetch([(o, (b - a) * rb, dest[a * rb : b * rb]) for o, a, b in
                            zip(offsets[starts].tolist(), starts.tolist(), ends.tolist(),
                                strict=True)])


def remote_rows(dataset: h5py.Dataset) -> RawRows | None:
    """``RawRows.of`` for a dataset opened from a ``RemoteFile``: its rows fetched as they lie
    (``RemoteRows``) or as compressed chunks decoded (``remotechunks.RemoteChunkRows``); None
    where HDF5 must read."""
    file = file_of_dataset(dataset)
    if file is None or dataset.is_virtual or dataset.external:
        return None
    dsid, shape = dataset.id, dataset.shape
    if dsid.get_create_plist().get_nfilters():
        decoder = ChunkDecoder.of(dataset)
        if isinstance(decoder, RemoteDecoder) and decoder.threadsafe:
            from .remotechunks import RemoteChunkRows
            return RemoteChunkRows(decoder)
        return None
    if dsid.get_type() != h5py.h5t.py_create(dataset.dtype):
        return None  # converted by HDF5: not the bytes in the file
    found = file.chunk_map(dataset)
    offsets = _row_chunk_offsets(found, shape)
    if offsets is None:
        return None
    chunk_rows, at = offsets
    if (at < 0).any():
        return None  # chunks never written read as the fill value
    row_bytes = dataset.dtype.itemsize * math.prod(shape[1:])
    return RemoteRows(file.fetcher(), row_bytes, chunk_rows, at)


def _row_chunk_offsets(found: ChunkMap, shape: tuple[int, ...]
                       ) -> tuple[int, np.ndarray] | None:
    """(rows per chunk, byte offset of each chunk of rows, -1 where none is stored) of a
    dataset chunked in whole rows or contiguous; None otherwise."""
    if found.layout == "contiguous":
        if not len(found):
            return None  # never written: HDF5 supplies the fill value
        return max(shape[0], 1), found.byte_offsets.astype(np.int64)
    if found.layout != "chunked" or found.chunks is None or \
            tuple(found.chunks[1:]) != tuple(shape[1:]):
        return None
    chunk_rows = found.chunks[0]
    at = np.full(-(-shape[0] // chunk_rows), -1, np.int64)
    if len(found):
        k = found.chunk_offsets[:, 0] // chunk_rows
        inside = k < len(at)
        at[k[inside]] = found.byte_offsets[inside].astype(np.int64)
    return chunk_rows, at


class RemoteDecoder(ChunkDecoder):
    """``ChunkDecoder`` of a compressed dataset in an object store: the stored chunks a read
    needs are fetched at once into a scratch buffer, and each chunk the read covers whole is
    decoded straight into the destination by the fetch thread whose GET brought it, while the
    other GETs are still running (the codecs release the GIL: the decode of one GET overlaps
    the transfer of the next, and uses more than one core). Chunks read in part are decoded
    afterwards as ``ChunkDecoder`` does."""

    def __init__(self, dsid: Any, found: DecodePlan, stored: ChunkMap, fetcher: Any):
        super().__init__(dsid, found)
        mapped = _row_chunk_offsets(stored, found.shape)
        assert mapped is not None  # the plan takes only datasets chunked in whole rows
        self._offsets = mapped[1]
        self._sizes = np.zeros(len(self._offsets), np.int64)
        if len(stored):
            k = stored.chunk_offsets[:, 0] // self.chunk_rows
            inside = k < len(self._sizes)
            self._sizes[k[inside]] = stored.sizes[inside].astype(np.int64)
        self._fetcher = fetcher
        self._fetched: dict[int, memoryview] = {}
        self._placed: set[int] = set()  # chunks this read already decoded into the destination
        self._body = np.empty(0, np.uint8)
        self._remake = found.remake
        self._local = threading.local()  # each fetch thread's codec and shuffle scratch
        self._count_lock = threading.Lock()

    def read_rows(self, start: int, stop: int, out: np.ndarray) -> bool:
        cr = self.chunk_rows
        if 0 <= start < stop <= self.n_rows and out.flags.c_contiguous and \
                out.nbytes == (stop - start) * self.row_bytes and \
                self.ok[start // cr : (stop - 1) // cr + 1].all():
            try:
                self._fetch_and_decode(start, stop, out.reshape(-1).view(np.uint8))
            except Undecodable as exc:
                self._fetched.clear()
                self._placed.clear()
                fall_back(exc.args[0])
                return False
            except DECODE_ERRORS as exc:
                self._fetched.clear()
                self._placed.clear()
                fall_back(f"failed: {self.name} raised {type(exc).__name__}")
                return False
        try:
            return super().read_rows(start, stop, out)
        finally:
            self._fetched.clear()
            self._placed.clear()

    def _fetch_and_decode(self, start: int, stop: int, dest: np.ndarray) -> None:
        """Fetch the stored bytes of the chunks rows ``start:stop`` need (not the partial chunk
        already decoded in the scratch chunk), decoding each whole one into ``dest`` (the
        bytes of those rows) as it arrives."""
        cr, cb = self.chunk_rows, self.chunk_bytes
        wanted: list[int] = []
        places: list[int] = []  # where chunk ``wanted[j]`` goes in ``dest``; -1: read in part
        for k in range(start // cr, (stop - 1) // cr + 1):
            first = max(start, k * cr)
            partial = min(stop - first, cr - (first - k * cr)) != cr
            if not (partial and k == self._scratch_chunk):
                wanted.append(k)
                places.append(-1 if partial else (k * cr - start) * self.row_bytes)
        sizes = self._sizes[wanted]
        total = int(sizes.sum())
        if self._body.nbytes < total:
            self._body = np.empty(total, np.uint8)
        body, ranges, at = self._body.data, [], 0
        for k, size in zip(wanted, sizes.tolist(), strict=True):
            view = body[at : at + size]
            ranges.append((int(self._offsets[k]), size, view))
            self._fetched[k] = view
            at += size
        fetched = self._fetched

        def arrived(j: int) -> None:
            place = places[j]
            if place >= 0 and (self._remake is not None or self._codec is None):
                k = wanted[j]
                self._decode_whole(fetched[k], dest[place : place + cb])
                self._placed.add(k)

        self._fetcher.fetch(ranges, arrived)

    @property
    def threadsafe(self) -> bool:
        """Whether fetch threads may decode at once (each makes its own codec)."""
        return self._remake is not None or self._codec is None

    def requests(self, start: int, stop: int, out: np.ndarray
                 ) -> tuple[list[tuple[int, int, Any]], list[Callable[[], None] | None]] | None:
        """What rows ``start:stop`` need fetched, for ``RowsAhead``: the stored chunks, each
        into a buffer of its own, and for each what decodes it into its place in ``out``
        (C-contiguous, those rows), safe in any fetch thread; None where some chunk must go
        through HDF5 (not stored, or stored with a filter skipped)."""
        cr, rb = self.chunk_rows, self.row_bytes
        if not (0 <= start < stop <= self.n_rows and out.flags.c_contiguous
                and out.nbytes == (stop - start) * rb):
            return None
        k0, k1 = start // cr, (stop - 1) // cr + 1
        if not self.ok[k0:k1].all():
            return None
        sizes = self._sizes[k0:k1]
        # A buffer of the pool, back to it once its last chunk is decoded: fresh memory would
        # be faulted in page by page by the GETs.
        body = SCRATCH.take(int(sizes.sum()))
        done = Countdown(SCRATCH, body, k1 - k0)
        dest = out.reshape(-1).view(np.uint8)
        ranges: list[tuple[int, int, Any]] = []
        actions: list[Callable[[], None] | None] = []
        at = 0
        for k, size in zip(range(k0, k1), sizes.tolist(), strict=True):
            raw = body[at : at + size].data
            at += size
            first, last = max(start, k * cr), min(stop, (k + 1) * cr)
            place = dest[(first - start) * rb : (last - start) * rb]
            ranges.append((int(self._offsets[k]), size, raw))
            actions.append(functools.partial(self._decode_then, raw, place,
                                             -1 if last - first == cr else (first - k * cr) * rb,
                                             done))
        return ranges, actions

    def _decode_then(self, raw: memoryview, dest: np.ndarray, skip: int, done: Countdown
                     ) -> None:
        """Chunk ``raw`` decoded into ``dest`` (whole, or from byte ``skip`` on), then its
        buffer's countdown told."""
        if skip < 0:
            self._decode_whole(raw, dest)
        else:
            self._decode_part(raw, dest, skip)
        done.one_done()

    def _decode_part(self, raw: memoryview, dest: np.ndarray, skip: int) -> None:
        """The bytes of chunk ``raw`` from ``skip`` on, decoded into ``dest``: the chunk
        whole into this thread's scratch, then the part copied."""
        local = self._local
        chunk = getattr(local, "chunk", None)
        if chunk is None:
            chunk = local.chunk = np.empty(self.chunk_bytes, np.uint8)
        self._decode_whole(raw, chunk)
        dest[:] = chunk[skip : skip + dest.nbytes]

    def _decode_whole(self, raw: Any, dest: np.ndarray) -> None:
        """Chunk bytes ``raw`` decoded into ``dest``, safe in any fetch thread: with this
        thread's own codec and shuffle scratch."""
        local = self._local
        # A shuffle of 1-byte elements moves no byte: such a chunk is decoded into its place.
        planes = self._shuffle if self._shuffle > 1 else 0
        codec = getattr(local, "codec", None)
        if codec is None and self._remake is not None:
            codec = local.codec = self._remake()
            local.shuffled = np.empty(self.chunk_bytes if planes else 0, np.uint8)
        shuffled = getattr(local, "shuffled", None)
        if shuffled is None:
            shuffled = local.shuffled = np.empty(self.chunk_bytes if planes else 0, np.uint8)
        if codec is None:
            data: Any = raw
        else:
            data = codec(bytes(raw) if self._bytes_in else raw, shuffled if planes else dest)
        if len(data) != self.chunk_bytes:
            raise Undecodable(f"failed: {self.name} gave a chunk of the wrong size")
        with self._count_lock:
            decoded[self.name] += 1
        if planes:
            unshuffle(np.frombuffer(data, np.uint8), dest, planes)
        elif data is not dest:
            dest[:] = np.frombuffer(data, np.uint8)

    def _decode(self, dsid: Any, chunk: int, dest: np.ndarray) -> None:
        if chunk in self._placed and dest.nbytes == self.chunk_bytes:
            return  # decoded into its place as it arrived
        super()._decode(dsid, chunk, dest)

    def _stored(self, dsid: Any, chunk: int) -> tuple[int, Any]:
        raw = self._fetched.get(chunk)
        if raw is None:  # not fetched with the read: through HDF5
            return super()._stored(dsid, chunk)
        return 0, bytes(raw) if self._bytes_in else raw


def remote_decoder(dataset: h5py.Dataset) -> RemoteDecoder | None:
    """``ChunkDecoder.of`` for a dataset opened from a ``RemoteFile``: None where HDF5 must
    read."""
    file = file_of_dataset(dataset)
    if file is None:
        return None
    stored = file.chunk_map(dataset)
    found = plan(dataset, stored)
    if found is None:
        return None
    return RemoteDecoder(dataset.id, found, stored, file.fetcher())
