"""Whole rows of unfiltered datasets read with ``pread`` straight from the file, past HDF5.

Internal module. For a dataset stored without filters, contiguously or in chunks that span whole
rows, every row lies at a known byte offset, exactly as it lies in memory: HDF5's per-chunk
machinery (tens of microseconds per chunk touched, and whole 1 MiB chunks read through its cache
for one 4 KiB row) buys nothing there. ``RawRows.of`` says whether a dataset qualifies; anything
unusual (other drivers, filters, unallocated chunks, types that convert) keeps the HDF5 path, so
results are identical either way.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import threading
import weakref

import h5py
import numpy as np

from .._keys._indexing import Selection
from ._rows import gather_rows, populate
from .source import per_dataset


class RawRows:
    """Byte offsets of the rows of one dataset, and reads of whole rows from them.

    Ranges of rows are read with one ``pread`` per chunk; scattered rows are copied from a
    read-only map of the file (one ``memcpy`` each, no system call once its pages are mapped).
    """

    def __init__(self, fd: int, row_bytes: int, chunk_rows: int, chunk_offsets: np.ndarray):
        self.fd = fd
        self.row_bytes = row_bytes
        self.chunk_rows = chunk_rows  # rows per chunk (all rows for contiguous data)
        self.chunk_offsets = chunk_offsets  # file offset of chunk k's first row
        self.end = int(chunk_offsets.max()) + chunk_rows * row_bytes  # where the data ends
        self._map: list[np.ndarray] = []  # see file_map

    @classmethod
    def of(cls, dataset: h5py.Dataset) -> RawRows | None:
        """The raw layout of ``dataset``, or None when it must be read through HDF5."""
        return _layout(dataset)

    def read(self, sel: Selection, buf: np.ndarray) -> bool:
        """Fill ``buf`` (the box of ``sel``) if ``sel`` takes whole rows; False if it does not."""
        if not _whole_rows(sel):
            return False
        rows = sel.dims[0]
        if isinstance(rows, tuple) and rows[1] == 1:
            self._read_run(rows[0], rows[2], buf.reshape(-1).view(np.uint8).data)
        else:
            self._gather(_row_numbers(rows), buf)
        return True

    def gather(self, sel: Selection, out: np.ndarray) -> bool:
        """Fill ``out`` (the result) with rows in the caller's order, straight from the file,
        when ``sel`` picks whole rows by one index array; False otherwise."""
        key = sel.local_key
        if not (key is not None and _whole_rows(sel) and len(key) == 1
                and isinstance(key[0], np.ndarray)
                and key[0].dtype.kind in "iu"):
            return False
        self._gather(_row_numbers(sel.dims[0])[key[0].reshape(-1)], out)
        return True

    def take(self, rows: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out`` with whole rows ``rows`` (int64 row numbers in range, in any order)."""
        self._gather(rows, out)

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        gather_rows(file_map(self.fd, self.end, self._map), out.reshape(-1).view(np.uint8), rows,
                    self.chunk_offsets, self.chunk_rows, self.row_bytes)

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
                raise _truncated(offset + nbytes, offset + got)
            at += nbytes
            row += n
            count -= n


# Read-only maps of whole files, kept across jobs by a worker process (``keep_maps``): a
# standby worker serves many passes (epochs), and a page of the file mapped in one costs nothing
# in the next, where a new map would fault it in again (microseconds a page). Keyed by what
# identifies the file's bytes, so a file replaced, grown or rewritten between passes gets a new
# map. A map holds a descriptor but no HDF5 lock: writers may open the file between passes.
# Elsewhere (the caller's own process) a map lives as long as its dataset's layout.
_MAPS: dict[tuple[int, ...], np.ndarray] | None = None
_MAX_MAPS = 8
# A worker's new map of a file up to this size is populated (``_rows.populate``): an eighth of
# the machine's memory, so that a file that is not in the page cache is not read whole.
_POPULATE_MAX = os.sysconf("SC_PHYS_PAGES") * mmap.PAGESIZE // 8
_POPULATE_STEP = 8 << 20  # bytes of a map populated by one call (see _populate)


def keep_maps() -> None:
    """Keep file maps across jobs in this process (a worker's)."""
    global _MAPS
    if _MAPS is None:
        _MAPS = {}


def file_map(fd: int, end: int, mine: list) -> np.ndarray:
    """The bytes of the file open as ``fd``, mapped; checks that they reach ``end``. ``mine``
    holds the map when this process keeps none."""
    st = os.fstat(fd)
    if st.st_size < end:  # mapped pages past the end of a file raise SIGBUS: check first
        raise _truncated(end, st.st_size)
    if _MAPS is None:
        if not mine or len(mine[0]) < end:
            mine[:] = [np.frombuffer(mmap.mmap(fd, end, access=mmap.ACCESS_READ), np.uint8)]
        return mine[0]
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    found = _MAPS.pop(key, None)
    if found is None:
        found = np.frombuffer(mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ), np.uint8)
        if st.st_size <= _POPULATE_MAX:
            # First touches would fault the pages in one at a time (bench/README.md, "Costs the
            # read paths are built around"); a thread maps them in large steps meanwhile.
            threading.Thread(target=_populate, args=(found,), daemon=True,
                             name="multitables-populate").start()
        while len(_MAPS) >= _MAX_MAPS:
            del _MAPS[next(iter(_MAPS))]  # the least recently used
    _MAPS[key] = found  # now the most recently used
    return found


def _populate(image: np.ndarray) -> None:
    """``populate`` at the lowest priority: with the CPU that reads leave idle (on a machine
    whose cores the caller and the workers keep busy, reads fault their pages in as before).

    A call per _POPULATE_STEP, each taking the interpreter's lock again: one call for the whole
    map left a Reader's cold loop on 2 cores 15% slower (bench/README.md, "The caller's CPU, the
    default n_procs and cold starts")."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    for start in range(0, image.size, _POPULATE_STEP):
        if not populate(image, start, start + _POPULATE_STEP):
            populate(image, start + _POPULATE_STEP)  # an older kernel: read the rest ahead
            return


def _truncated(needed: int, size: int) -> OSError:
    return OSError(
        f"the file ends at byte {size} but its HDF5 metadata puts data up to byte {needed} "
        "(truncated while being read?)"
    )


def _whole_rows(sel: Selection) -> bool:
    """Whether every dimension but the first is taken whole and in order."""
    return sel.points is None and all(
        isinstance(e, tuple) and e[0] == 0 and e[1] == 1 and e[2] == n
        for e, n in zip(sel.dims[1:], sel.shape[1:], strict=True)
    )


def row_range(sel: Selection) -> tuple[int, int] | None:
    """``(start, stop)`` when ``sel`` is whole rows ``start:stop``, else None."""
    rows = sel.dims[0] if sel.dims else None
    if isinstance(rows, tuple) and rows[1] == 1 and _whole_rows(sel):
        return rows[0], rows[0] + rows[2]
    return None


def _row_numbers(entry) -> np.ndarray:
    """The sorted rows of a ``Selection.dims`` entry (a progression or an index array)."""
    if isinstance(entry, tuple):
        start, step, count = entry
        return np.arange(start, start + step * count, step, dtype=np.int64)
    return np.asarray(entry, dtype=np.int64)


@per_dataset  # a layout goes with its dataset (and its file descriptor with it)
def _layout(dataset: h5py.Dataset) -> RawRows | None:
    dsid, shape = dataset.id, dataset.shape
    if shape and shape[0] and dataset.file.driver == "fileobj":  # in an object store
        from .remoteread import remote_rows
        return remote_rows(dataset)  # the same reads, by ranged GETs
    if not shape or not shape[0] or dataset.file.driver != "sec2" or dataset.is_virtual:
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

        if not hasattr(dsid, "chunk_iter"):
            return None  # h5py built on HDF5 < 1.12.3: leave it to HDF5
        dsid.chunk_iter(note)
        if (offsets < 0).any():
            return None  # unallocated chunks read as the fill value
    else:
        return None
    fd = os.open(dataset.file.filename, os.O_RDONLY | os.O_CLOEXEC)
    raw = RawRows(fd, row_bytes, chunk_rows, offsets)
    weakref.finalize(raw, os.close, fd)
    return raw
