"""Whole rows of unfiltered datasets read with ``pread`` straight from the file, past HDF5.

Internal module. For a dataset stored without filters, contiguously or in chunks that span whole
rows, every row lies at a known byte offset, exactly as it lies in memory: HDF5's per-chunk
machinery (tens of microseconds per chunk touched, and whole 1 MiB chunks read through its cache
for one 4 KiB row) buys nothing there. ``RawRows.of`` says whether a dataset qualifies; anything
unusual (other drivers, filters, unallocated chunks, types that convert) keeps the HDF5 path, so
results are identical either way.
"""

from __future__ import annotations

import math
import os
import weakref

import h5py
import numpy as np

from ._indexing import Selection, runs


class RawRows:
    """Byte offsets of the rows of one dataset, and reads of whole rows from them."""

    def __init__(self, fd: int, row_bytes: int, chunk_rows: int, chunk_offsets: np.ndarray):
        self.fd = fd
        self.row_bytes = row_bytes
        self.chunk_rows = chunk_rows  # rows per chunk (all rows for contiguous data)
        self.chunk_offsets = chunk_offsets  # file offset of chunk k's first row

    @classmethod
    def of(cls, dataset: h5py.Dataset) -> RawRows | None:
        """The raw layout of ``dataset``, or None when it must be read through HDF5."""
        cached = _LAYOUTS.get(dataset.id, False)
        if cached is False:
            cached = _LAYOUTS[dataset.id] = _layout(dataset)
        return cached

    def read(self, sel: Selection, buf: np.ndarray) -> bool:
        """Fill ``buf`` (the box of ``sel``) if ``sel`` takes whole rows; False if it does not."""
        dims = sel.dims
        for d, entry in enumerate(dims[1:], start=1):
            if not (isinstance(entry, tuple) and entry[0] == 0 and entry[1] == 1
                    and entry[2] == sel.shape[d]):
                return False
        rows = dims[0]
        if isinstance(rows, tuple):
            start, step, count = rows
            if step != 1:
                rows = np.arange(start, start + step * count, step, dtype=np.int64)
            else:
                self._read_run(start, count, memoryview(buf.reshape(-1).view(np.uint8)))
                return True
        view = memoryview(buf.reshape(-1).view(np.uint8))
        starts, lengths = runs(np.ascontiguousarray(rows, dtype=np.int64))
        at = 0
        for start, count in zip(starts.tolist(), lengths.tolist(), strict=True):
            self._read_run(start, count, view[at : at + count * self.row_bytes])
            at += count * self.row_bytes
        return True

    def _read_run(self, row: int, count: int, out: memoryview) -> None:
        """Rows ``row:row + count`` into ``out``, one pread per chunk they span."""
        at = 0
        while count:
            chunk, first = divmod(row, self.chunk_rows)
            n = min(count, self.chunk_rows - first)
            nbytes = n * self.row_bytes
            offset = int(self.chunk_offsets[chunk]) + first * self.row_bytes
            got = os.preadv(self.fd, [out[at : at + nbytes]], offset)
            if got != nbytes:
                raise OSError(
                    f"read {got} of {nbytes} bytes at offset {offset}: the file is shorter "
                    "than its HDF5 metadata says (truncated while being read?)"
                )
            at += nbytes
            row += n
            count -= n


# Keyed weakly by dataset id: a layout goes with its dataset (and its file descriptor with it).
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layout(dataset: h5py.Dataset) -> RawRows | None:
    dsid, shape = dataset.id, dataset.shape
    if not shape or dataset.file.driver != "sec2" or dataset.is_virtual:
        return None
    if dataset.external:
        return None
    dcpl = dsid.get_create_plist()
    if dcpl.get_nfilters() or dsid.get_type() != h5py.h5t.py_create(dataset.dtype):
        return None  # decoded or converted by HDF5: not the bytes in the file
    row_bytes = dataset.dtype.itemsize * math.prod(shape[1:])
    # Offsets from HDF5 are absolute: a userblock is already counted in them.
    layout = dcpl.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dsid.get_offset()
        if offset is None:
            return None  # never written: HDF5 supplies the fill value
        chunk_rows, offsets = max(shape[0], 1), np.array([offset], np.int64)
    elif layout == h5py.h5d.CHUNKED and tuple(dataset.chunks[1:]) == tuple(shape[1:]):
        chunk_rows = dataset.chunks[0]
        n_chunks = -(-shape[0] // chunk_rows)
        offsets = np.full(n_chunks, -1, np.int64)

        def note(info):
            offsets[info.chunk_offset[0] // chunk_rows] = info.byte_offset

        dsid.chunk_iter(note)
        if (offsets < 0).any():
            return None  # unallocated chunks read as the fill value
    else:
        return None
    fd = os.open(dataset.file.filename, os.O_RDONLY | os.O_CLOEXEC)
    raw = RawRows(fd, row_bytes, chunk_rows, offsets)
    weakref.finalize(raw, os.close, fd)
    return raw
