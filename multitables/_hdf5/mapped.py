"""Rows of datasets in many local files read by their chunk maps, with no HDF5 open (internal).

A Loader over many small files reads each unit from a file its worker has not opened: an HDF5 open
and close of the file, its datasets and their chunk indexes cost about 2 ms, more than reading
and decoding 100 rows of images (bench/README.md, "Many files"). Where a dataset's rows lie at
byte ranges known in advance, the parent notes them when it describes the files (``layout_of``,
packed for all files in a ``MapTable``), and a worker reads a unit with ``pread`` on a plain
descriptor: unfiltered chunks of whole rows (or contiguous rows) straight into the destination,
compressed ones decoded by ``decode``'s codecs. Anything else (virtual, external or converted
datasets, chunks never written or stored with a filter skipped, filters no installed library
decodes, drivers other than sec2) is not mapped, and a read that fails to decode returns False:
both are read through HDF5, so results are identical either way.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .decode import place
from .eligibility import Pipeline, chunks_ok, decodable, pipeline
from .fallback import Undecodable, fall_back
from .libraries import DECODE_ERRORS

RAW, DECODED = 1, 2
# A dataset of more chunks is not mapped: its file is large, so an open is a small share of
# reading it, and the map of every file travels with each epoch's job.
MAX_CHUNKS = 4096


@dataclass(frozen=True)
class Layout:
    """Where the rows of one dataset of one file lie: each chunk of ``chunk_rows`` rows (all
    rows when contiguous) at ``offsets[k]``, ``sizes[k]`` bytes stored, read as they are
    (``RAW``) or decoded through ``filters`` (``DECODED``)."""

    how: int
    chunk_rows: int
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    filters: tuple[tuple[int, int, tuple[int, ...]], ...]


def layout_of(dataset: h5py.Dataset, driver: str | None = None) -> Layout | None:
    """The ``Layout`` of an open local ``dataset``, or None where HDF5 must read it.
    ``driver``: its file's driver, when the caller knows it."""
    shape, dtype = dataset.shape, dataset.dtype
    if driver is None:
        driver = dataset.file.driver
    if not shape or not shape[0] or driver != "sec2" or dtype.hasobject:
        return None
    dsid = dataset.id
    dcpl = dsid.get_create_plist()
    layout = dcpl.get_layout()
    if layout not in (h5py.h5d.CHUNKED, h5py.h5d.CONTIGUOUS) or dcpl.get_external_count():
        return None  # virtual, compact or external
    if dsid.get_type() != h5py.h5t.py_create(dtype):
        return None  # converted by HDF5: not the bytes in the file
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dsid.get_offset()
        if offset is None:
            return None  # never written: HDF5 supplies the fill value
        return Layout(RAW, shape[0], np.array([offset], np.int64),
                      np.array([shape[0] * row_bytes], np.int64), ())
    chunks = dcpl.get_chunk()
    if tuple(chunks[1:]) != tuple(shape[1:]) or not hasattr(dsid, "chunk_iter"):
        return None
    chunk_rows = chunks[0]
    n_chunks = -(-shape[0] // chunk_rows)
    if n_chunks > MAX_CHUNKS:
        return None
    found: list[tuple[int, int, int, int]] = []
    dsid.chunk_iter(lambda info: found.append(
        (info.chunk_offset[0] // chunk_rows, info.byte_offset, info.size, info.filter_mask)))
    table = np.array(found, np.int64).reshape(-1, 4)
    k = table[:, 0]
    if len(k) != n_chunks or not np.array_equal(np.sort(k), np.arange(n_chunks)):
        return None  # chunks never written read as the fill value
    order = np.argsort(k)
    offsets, sizes = table[order, 1], table[order, 2]
    filters = tuple(dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters()))
    if not filters:
        return Layout(RAW, chunk_rows, offsets, sizes, ())
    ok, _ = chunks_ok(k, table[:, 3], table[:, 2], shape[0], chunk_rows, chunk_rows * row_bytes)
    if not ok.all() or not decodable(dtype, list(filters)):
        return None  # a chunk stored with a filter skipped, or no codec installed
    return Layout(DECODED, chunk_rows, offsets, sizes, filters)


class MapTable:
    """The ``Layout`` of every dataset of every file, packed in a few arrays: it travels with
    each epoch's job, where a thousand small objects would cost tens of milliseconds."""

    def __init__(self, layouts: Sequence[Sequence[Layout | None]]):
        n_files, n_columns = len(layouts), len(layouts[0]) if layouts else 0
        self.shape = (n_files, n_columns)
        self.how = np.zeros(self.shape, np.int8)
        self.chunk_rows = np.zeros(self.shape, np.int64)
        self.first = np.zeros(n_files * n_columns + 1, np.int64)
        self.pipelines: list[tuple] = []
        self.pipeline = np.zeros(self.shape, np.int32)
        offsets, sizes, at = [], [], 0
        for f, row in enumerate(layouts):
            for c, layout in enumerate(row):
                i = f * n_columns + c
                if layout is not None:
                    self.how[f, c], self.chunk_rows[f, c] = layout.how, layout.chunk_rows
                    if layout.filters not in self.pipelines:
                        self.pipelines.append(layout.filters)
                    self.pipeline[f, c] = self.pipelines.index(layout.filters)
                    offsets.append(layout.offsets)
                    sizes.append(layout.sizes)
                    at += len(layout.offsets)
                self.first[i + 1] = at
        empty = np.zeros(0, np.int64)
        self.offsets = np.concatenate(offsets) if offsets else empty
        self.sizes = np.concatenate(sizes) if sizes else empty


class MappedReads:
    """A worker's reads of mapped datasets (``MapTable``) of many files: a descriptor per file,
    at most ``limit`` open (the least recently used closed first), and the codecs and scratch
    buffers of each dataset shared by all files."""

    def __init__(self, table: MapTable, dtypes: Sequence[np.dtype],
                 row_shapes: Sequence[tuple[int, ...]], limit: int):
        self.table, self.limit = table, max(1, limit)
        self.dtypes, self.row_shapes = list(dtypes), [tuple(s) for s in row_shapes]
        self.row_bytes = [np.dtype(d).itemsize * int(np.prod(s))
                          for d, s in zip(dtypes, row_shapes, strict=True)]
        self.fds: OrderedDict[int, int] = OrderedDict()
        self._pipelines: dict[tuple[int, int, int], Pipeline | None] = {}
        self._raw = np.empty(0, np.uint8)
        self._shuffled = np.empty(0, np.uint8)
        self._chunk: list[np.ndarray] = [np.empty(0, np.uint8) for _ in dtypes]
        self._chunk_of: list[tuple[int, int]] = [(-1, -1) for _ in dtypes]  # (file, chunk)

    def read(self, f: int, c: int, path: str, identity: tuple[int, int], start: int,
             stop: int, out: np.ndarray) -> bool:
        """Rows ``start:stop`` of dataset ``c`` of file ``f`` (``path``, whose ``(size,
        mtime_ns)`` must be ``identity``) into ``out`` (C-contiguous, those rows); False when
        they must be read through HDF5 (``out`` then holds nothing or part of them)."""
        how = self.table.how[f, c]
        if not how:
            return False
        if start >= stop:
            return True
        fd = self._fd(f, path, identity)
        i = f * self.table.shape[1] + c
        first = int(self.table.first[i])
        cr, rb = int(self.table.chunk_rows[f, c]), self.row_bytes[c]
        dest = out.reshape(-1).view(np.uint8)
        if how == RAW:
            row, at = start, 0
            while row < stop:
                k, skip = divmod(row, cr)
                n = min(stop - row, cr - skip)
                _pread(fd, dest[at : at + n * rb], int(self.table.offsets[first + k]) + skip * rb)
                at += n * rb
                row += n
            return True
        found = self._pipeline(f, c, cr)
        if found is None:
            return False
        try:
            self._decode_rows(f, c, fd, first, cr, rb, found, start, stop, dest)
        except Undecodable as exc:
            self._chunk_of[c] = (-1, -1)
            fall_back(exc.args[0])
            return False
        except DECODE_ERRORS as exc:
            self._chunk_of[c] = (-1, -1)
            fall_back(f"failed: {found.name} raised {type(exc).__name__}")
            return False
        return True

    def _decode_rows(self, f: int, c: int, fd: int, first: int, cr: int, rb: int,
                     found: Pipeline, start: int, stop: int, dest: np.ndarray) -> None:
        chunk_bytes = cr * rb
        row, at = start, 0
        while row < stop:
            k, skip = divmod(row, cr)
            n = min(stop - row, cr - skip)
            if n == cr:
                self._decode(fd, first + k, found, dest[at : at + chunk_bytes])
            else:  # part of a chunk: decoded whole once, kept for the next unit that needs it
                if self._chunk_of[c] != (f, k):
                    if self._chunk[c].nbytes != chunk_bytes:
                        self._chunk[c] = np.empty(chunk_bytes, np.uint8)
                    self._chunk_of[c] = (-1, -1)
                    self._decode(fd, first + k, found, self._chunk[c])
                    self._chunk_of[c] = (f, k)
                dest[at : at + n * rb] = self._chunk[c][skip * rb : (skip + n) * rb]
            at += n * rb
            row += n

    def _decode(self, fd: int, j: int, found: Pipeline, dest: np.ndarray) -> None:
        """Stored chunk ``j`` of the table, decoded into ``dest`` (its decoded size)."""
        size = int(self.table.sizes[j])
        if self._raw.nbytes < size:
            self._raw = np.empty(max(size, 2 * self._raw.nbytes), np.uint8)
        raw = self._raw[:size]
        _pread(fd, raw, int(self.table.offsets[j]))
        data: Any
        if found.codec is None:
            data = raw
        else:
            if found.shuffle and self._shuffled.nbytes < dest.nbytes:
                self._shuffled = np.empty(dest.nbytes, np.uint8)
            into = self._shuffled[: dest.nbytes] if found.shuffle else dest
            # A codec that wants bytes (bytes_in) takes them where others take a memoryview.
            source: Any = bytes(raw) if found.bytes_in else raw.data
            data = found.codec(source, into)
        place(data, dest, found.shuffle, found.name)

    def _pipeline(self, f: int, c: int, chunk_rows: int) -> Pipeline | None:
        key = (c, int(self.table.pipeline[f, c]), chunk_rows)
        if key not in self._pipelines:
            filters = [tuple(x) for x in self.table.pipelines[key[1]]]
            self._pipelines[key] = pipeline(np.dtype(self.dtypes[c]),
                                            (chunk_rows, *self.row_shapes[c]), filters)
        return self._pipelines[key]

    def _fd(self, f: int, path: str, identity: tuple[int, int]) -> int:
        fd = self.fds.pop(f, None)
        if fd is None:
            while len(self.fds) >= self.limit:
                os.close(self.fds.popitem(last=False)[1])
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if (st.st_size, st.st_mtime_ns) != tuple(identity):
                os.close(fd)
                raise ValueError(f"{path} changed since this Loader was made (size "
                                 f"{identity[0]:,} -> {st.st_size:,} bytes, modified again); "
                                 "make a new Loader")
        self.fds[f] = fd
        return fd

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.popitem(last=False)[1])


def _pread(fd: int, dest: np.ndarray, offset: int) -> None:
    """``dest.nbytes`` bytes of ``fd`` from ``offset`` into ``dest``; OSError if the file
    ends first."""
    got = os.preadv(fd, [dest.data], offset)
    if got != dest.nbytes:
        raise OSError(f"the file ends at byte {offset + got} but its HDF5 metadata puts data up "
                      f"to byte {offset + dest.nbytes} (truncated while being read?)")
