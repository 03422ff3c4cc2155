"""The rows of a variable-length dataset, read from the file's global heap past HDF5.

Internal module. A variable-length (vlen) dataset stores a 16-byte reference per row: the
sequence's length (uint32), then the address of a global heap collection and an object's index
in it (HDF5 File Format Specification 3.0, "Global Heap" and the variable-length datatype).
Each collection ("GCOL", version 1, its size) is a run of objects (index, reference count,
size, data padded to 8 bytes); index 0 is free space. HDF5 reads a row through its metadata
cache and converts it element by element: 10-20 us a row. ``VlenRows.of`` says whether a
dataset's references lie at known byte offsets (unfiltered, contiguous or chunked, in a local
file opened read-only, 8-byte addresses and lengths) and its values need no conversion (native
or single-byte numbers, opaque bytes, strings); ``take`` then reads references and values from a
read-only map of the file, parsing each collection once, and returns what h5py returns.
Anything else is None, and the caller reads through h5py.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections import OrderedDict
from typing import Any

import h5py
import numpy as np

from ._vlen import (
    NO_OBJECT,
    OK,
    PAST,
    RANGE,
    UNKNOWN,
    gather,
    gather_rows,
    locate,
    pack,
    recall,
    walk,
)
from .rawread import file_map
from .source import per_dataset

__all__ = ["VlenRows", "gather_rows", "pack"]

_REF = np.dtype([("length", "<u4"), ("address", "<u8"), ("index", "<u4")])
_SHIFT, _COUNT = 17, (1 << 17) - 1  # a collection's object count is at most 65536
_HEAD = 16  # bytes of a collection's header and of an object's, with 8-byte lengths
_GCOL = np.frombuffer(b"GCOL\x01", np.uint8)  # signature and version
_SUPERBLOCK = b"\x89HDF\r\n\x1a\n"
# Rows whose objects a process keeps the places of once located, at 16 bytes a row (pages taken
# as rows are met), over the files of _HEAPS (readers still open keep theirs too): locating a
# scattered row costs three cache misses (reference, heap table, object header), looking it up
# again one (bench/README.md, "Tokens handed over packed"). Kept by the file's identity, as the
# heaps are: a file rewritten in place to the same size within one tick of its clock is not
# told apart.
KNOWN_ROWS = 4 << 20
KNOWN_BLOCK = 1024  # rows located together
_NATIVE = h5py.h5t.ORDER_LE if sys.byteorder == "little" else h5py.h5t.ORDER_BE


class VlenRows:
    """Where the references of one vlen dataset's rows lie, and the heap objects seen so far.

    Strings come back as ``bytes`` (cut at a NUL, as h5py's C strings are), other rows as
    arrays of the base dtype; a null reference (address 0: a row never written) as ``b""`` or an
    empty array, as from h5py; an undefined address is an OSError, as from h5py. Every
    collection a read names is checked (signature, sizes inside the file, objects inside the
    collection, the object named present and of the row's length) before a byte is copied: a
    damaged file is an OSError naming the file, dataset and row. One thread at a time: ``take``
    adds to the tables.
    """

    def __init__(self, dataset: h5py.Dataset, dtype: np.dtype | None, chunk_rows: int,
                 chunk_offsets: np.ndarray, base: int, fd: int):
        self.where = f"{dataset.file.filename}, dataset {dataset.name}"
        self.n_rows = dataset.shape[0]
        self.dtype = dtype  # of an array row's elements; None: strings (bytes)
        self.chunk_rows = chunk_rows  # rows per chunk (all rows for contiguous data)
        self.chunk_offsets = chunk_offsets  # file offset of chunk k's first reference
        self.base = base  # where the heap addresses count from (after a userblock)
        self.fd = fd
        self._image = np.frombuffer(b"", np.uint8)  # the file, mapped read-only (_reach)
        self._mine: list[np.ndarray] = []  # its map, where this process keeps none
        self.heaps = _heaps_of(fd, base)
        # Each row's object once located, kept with the heaps for the next epochs (which ask
        # for every row again): its offset + 1 (0 while not located) and size, side by side.
        self._known = _known_of(self.heaps, int(chunk_offsets[0]), self.n_rows)

    @classmethod
    def of(cls, dataset: h5py.Dataset) -> VlenRows | None:
        """The reader of ``dataset``'s rows, or None when they must be read through h5py."""
        return _layout(dataset)

    def take(self, rows: np.ndarray) -> list[Any]:
        """The values of rows ``rows`` (any order, repeats allowed), each its own object."""
        offsets, sizes = self.spans(rows)
        buf = np.empty(int(sizes.sum()), np.uint8)
        gather(self._image, offsets, sizes, buf)
        ends = np.cumsum(sizes)
        if self.dtype is None:
            blob = buf.tobytes()
            cuts = zip((ends - sizes).tolist(), ends.tolist(), strict=True)
            values = [blob[b:e] for b, e in cuts]
            return [v.partition(b"\0")[0] for v in values] if b"\0" in blob else values
        data, size = buf.view(self.dtype), self.dtype.itemsize
        cuts = zip(((ends - sizes) // size).tolist(), (ends // size).tolist(), strict=True)
        return [data[b:e] for b, e in cuts]

    @property
    def image(self) -> np.ndarray:
        """The file, mapped read-only: where ``spans`` point."""
        return self._image

    def spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where the values of rows ``rows`` lie in ``image``: their offsets and sizes in bytes
        (0 and 0 for a row never written)."""
        rows = np.ascontiguousarray(rows, np.int64).reshape(-1)
        size = os.fstat(self.fd).st_size
        if size < len(self._image):  # mapped pages past the end: SIGBUS
            raise OSError(f"{self.where}: the file is shorter than when it was mapped "
                          f"({len(self._image)} bytes; truncated while being read?)")
        if self._known is None:
            return self._locate(rows)
        if not len(self._image):  # rows located by an earlier reader: in this file as it is
            self._reach(size)
        offsets, sizes = np.empty(rows.size, np.int64), np.empty(rows.size, np.int64)
        if recall(self._known, rows, offsets, sizes):
            # The blocks of rows the new ones lie in, located in order: cheaper a row than
            # scattered rows, and the next batches find more of theirs.
            new = self._in_range(rows[offsets < 0])
            blocks = np.unique(new // KNOWN_BLOCK)
            block = (blocks[:, None] * KNOWN_BLOCK + np.arange(KNOWN_BLOCK)).reshape(-1)
            block = block[block < self.n_rows]
            try:
                located = self._locate(block)
            except OSError:  # damage in the block: the rows asked for may still be read
                block = np.unique(new)
                located = self._locate(block)
            self._known[block, 0], self._known[block, 1] = located[0] + 1, located[1]
            recall(self._known, rows, offsets, sizes)
        return offsets, sizes

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``spans`` of ``rows``, from their references and the heap's objects."""
        offsets = np.empty(rows.size, np.int64)
        sizes = np.empty(rows.size, np.int64)
        itemsize = 1 if self.dtype is None else self.dtype.itemsize
        heaps = self.heaps
        for _ in range(4):  # a pass puts right what stopped it for all rows left: a 4th ends
            what, i = locate(self._image, rows, self.n_rows, self.chunk_rows,
                             self.chunk_offsets, heaps.where, heaps.offsets, heaps.sizes,
                             itemsize, offsets, sizes)
            if what == OK:
                return offsets, sizes
            tail = rows[i:]
            if what == RANGE:
                rows = self._in_range(rows)
            elif what == PAST:
                chunk, first = np.divmod(tail, self.chunk_rows)
                self._reach(int((self.chunk_offsets[chunk] + first * _HEAD).max()) + _HEAD)
            elif what == UNKNOWN:
                refs = self._refs(tail)
                addresses = refs["address"]
                new = {a for a in addresses.tolist() if a and a not in heaps.where}
                self._parse(np.array(sorted(new), np.uint64), tail, addresses)
            else:
                ref = self._refs(rows[i : i + 1])[0]
                if what == NO_OBJECT:
                    raise self._damaged(rows[i], f"names object {ref['index']} of the global "
                                        f"heap collection at address {ref['address']}, which "
                                        "holds no such object")
                slot = (heaps.where[int(ref["address"])] >> _SHIFT) + int(ref["index"])
                raise self._damaged(rows[i], f"holds {ref['length']} elements of {itemsize} "
                                    f"bytes but its heap object holds {heaps.sizes[slot]} bytes")
        raise AssertionError(f"{self.where}: rows not located after four passes")

    def _in_range(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` with negative ones counted from the end; IndexError for one out of range."""
        n = self.n_rows
        if (rows < -n).any() or (rows >= n).any():
            bad = rows[(rows < -n) | (rows >= n)][0]
            raise IndexError(f"index {bad} is out of bounds for axis 0 with size {n}")
        return np.where(rows < 0, rows + n, rows)

    def _refs(self, rows: np.ndarray) -> np.ndarray:
        """The references of rows ``rows``."""
        chunk, first = np.divmod(rows, self.chunk_rows)
        return self._read(self.chunk_offsets[chunk] + first * _REF.itemsize).view(_REF)[:, 0]

    def _parse(self, found: np.ndarray, rows: np.ndarray, addresses: np.ndarray) -> None:
        """Add the objects of the collections at ``found`` (heap addresses) to the tables."""

        def fail(k: int, what: str) -> OSError:
            row = rows[np.argmax(addresses == found[k])]
            return self._damaged(row, f"names the global heap collection at address "
                                 f"{found[k]}, which {what}")

        image = self._reach(int(found.max()) + self.base + _HEAD, check=False)
        far = found > np.uint64(max(len(image) - self.base - _HEAD, 0))
        if far.any():
            raise fail(int(np.argmax(far)), f"lies past the end of the file ({len(image)} bytes)")
        at = found.astype(np.int64) + self.base
        head = np.lib.stride_tricks.sliding_window_view(image, _HEAD)[at]
        if (bad := (head[:, :5] != _GCOL).any(axis=1)).any():
            raise fail(int(np.argmax(bad)), "has no GCOL version 1 signature")
        sizes = head[:, 8:].copy().view("<u8")[:, 0]
        if (bad := (sizes < _HEAD) | (sizes > (len(image) - at).astype(np.uint64))).any():
            raise fail(int(np.argmax(bad)), f"claims {sizes[np.argmax(bad)]} bytes, past the "
                       f"end of the file ({len(image)} bytes)")
        objects, damage = walk(image, at, at + sizes.astype(np.int64))
        if objects is None:
            assert damage is not None
            raise fail(damage[0], f"holds a damaged object header at byte {damage[1]}")
        which, index, offsets, sizes = objects.T
        counts = np.ones(found.size, np.int64)
        np.maximum.at(counts, which, index + 1)
        key = np.sort(which * _COUNT + index)
        if (twice := key[1:] == key[:-1]).any():
            raise fail(int(key[1:][twice][0] // _COUNT), "holds two objects of one index")
        heaps = self.heaps
        first = heaps.used + np.cumsum(counts) - counts
        total = heaps.used + int(counts.sum())
        if total > heaps.offsets.size:
            grown = max(total, 2 * heaps.offsets.size, 1024)
            heaps.offsets = np.resize(heaps.offsets, grown)
            heaps.sizes = np.resize(heaps.sizes, grown)
        heaps.offsets[heaps.used : total] = -1
        heaps.offsets[first[which] + index] = offsets
        heaps.sizes[first[which] + index] = sizes
        heaps.used = total
        where = (first << _SHIFT) | counts
        heaps.where.update(zip(found.tolist(), where.tolist(), strict=True))

    def _read(self, at: np.ndarray) -> np.ndarray:
        """The 16 bytes at each file offset ``at``, one row each."""
        image = self._reach(int(at.max()) + _HEAD) if at.size else self._image
        if len(image) < _HEAD:
            return np.empty((0, _HEAD), np.uint8)
        # Rows of a window 16 bytes wide: one fancy index on its first axis, not 16 per row.
        return np.lib.stride_tricks.sliding_window_view(image, _HEAD)[at]

    def _reach(self, end: int, check: bool = True) -> np.ndarray:
        """The map of the file, remapped if it has grown short of ``end``; an error if the
        file ends before ``end`` (mapped pages past a file's end raise SIGBUS) and ``check``."""
        if len(self._image) < end:
            size = os.fstat(self.fd).st_size
            if size > len(self._image):
                # A worker's map is kept for its next jobs and populated ahead (rawread).
                self._image = file_map(self.fd, size, self._mine)
            if check and size < end:
                raise OSError(f"{self.where}: the file ends at byte {size} but its HDF5 "
                              f"metadata puts data up to byte {end} (truncated while being read?)")
        return self._image

    def _damaged(self, row: Any, what: str) -> OSError:
        return OSError(f"{self.where}: row {row} {what} (a damaged file?)")


def _element(ftype: h5py.h5t.TypeID, dtype: np.dtype) -> tuple[bool, np.dtype | None]:
    """Whether the rows' values need no conversion, and their elements' dtype as h5py returns
    them (None: strings, as bytes). HDF5 converts another byte order, precision or padding."""
    if isinstance(ftype, h5py.h5t.TypeStringID):
        return ftype.is_variable_str(), None
    want = h5py.check_vlen_dtype(dtype)
    if not isinstance(ftype, h5py.h5t.TypeVlenID) or want is None:
        return False, None
    base = ftype.get_super()
    if base.get_size() != want.itemsize or want.hasobject:
        return False, None
    if base.get_class() == h5py.h5t.OPAQUE:
        return want.kind == "V" and want.names is None, want
    if base.get_class() not in (h5py.h5t.INTEGER, h5py.h5t.FLOAT) or want.kind not in "iuf":
        return False, None
    # h5py returns the elements of a base of the other byte order unconverted, labelled native:
    # left to h5py, so that both paths agree whatever a later h5py does.
    native = want.newbyteorder("=")
    if want.itemsize > 1 and base.get_order() != _NATIVE:
        return False, None
    return base == h5py.h5t.py_create(native), native


class _Heaps:
    """The global heap collections of one file parsed so far: every vlen dataset of the file
    shares them, and a worker's next jobs over the same file find them (``_heaps_of``)."""

    def __init__(self) -> None:
        # Collection address -> first << _SHIFT | count: object i < count of it is slot
        # first + i of the tables (file offset of its data, -1 when it holds no object i; size).
        self.where: dict[int, int] = {}
        self.offsets = np.empty(0, np.int64)
        self.sizes = np.empty(0, np.int64)
        self.used = 0
        # A dataset's rows located (VlenRows.spans), by the address of its first references.
        self.known: dict[int, np.ndarray] = {}


# The heaps of the files read last, by the file's identity (a changed file is another).
_HEAPS: OrderedDict[tuple[int, ...], _Heaps] = OrderedDict()
_MAX_FILES = 8


def _heaps_of(fd: int, base: int) -> _Heaps:
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, base)
    heaps = _HEAPS.pop(key, None) or _Heaps()
    while len(_HEAPS) >= _MAX_FILES:
        _HEAPS.popitem(last=False)
    _HEAPS[key] = heaps  # the most recently used
    return heaps


def _known_of(heaps: _Heaps, dataset: int, n_rows: int) -> np.ndarray | None:
    """The rows located of the dataset at ``dataset``, kept with ``heaps``; None where the
    files kept hold KNOWN_ROWS rows already."""
    known = heaps.known.get(dataset)
    if known is None:
        if sum(len(k) for h in _HEAPS.values() for k in h.known.values()) + n_rows > KNOWN_ROWS:
            return None
        known = heaps.known[dataset] = np.zeros((n_rows, 2), np.int64)
    return known


@per_dataset  # a reader goes with its dataset (its heap tables and descriptor with it)
def _layout(dataset: h5py.Dataset) -> VlenRows | None:
    file, dsid = dataset.file, dataset.id
    if (dataset.ndim != 1 or not dataset.shape[0] or file.driver != "sec2" or file.mode != "r"
            or dataset.is_virtual or dataset.external):
        return None  # a writer's heap may sit unflushed in HDF5's cache: read-only files only
    fcpl = file.id.get_create_plist()
    plain, dtype = _element(dsid.get_type(), dataset.dtype)
    if not plain or fcpl.get_sizes() != (8, 8):
        return None  # references of another size, or values HDF5 converts
    dcpl = dsid.get_create_plist()
    if dcpl.get_nfilters():
        return None
    n = dataset.shape[0]
    if dcpl.get_layout() == h5py.h5d.CONTIGUOUS:
        offset = dsid.get_offset()
        if offset is None:
            return None  # never written
        chunk_rows, offsets = n, np.array([offset], np.int64)
    elif dcpl.get_layout() == h5py.h5d.CHUNKED and hasattr(dsid, "chunk_iter"):
        chunk_rows = dataset.chunks[0]
        offsets = np.full(-(-n // chunk_rows), -1, np.int64)

        def note(info: Any) -> None:
            offsets[info.chunk_offset[0] // chunk_rows] = info.byte_offset

        dsid.chunk_iter(note)
        if (offsets < 0).any():
            return None  # unallocated chunks: HDF5 supplies the fill value
    else:
        return None
    fd = os.open(file.filename, os.O_RDONLY | os.O_CLOEXEC)
    base = fcpl.get_userblock()  # heap addresses are relative to the superblock
    if os.pread(fd, len(_SUPERBLOCK), base) != _SUPERBLOCK:
        os.close(fd)
        return None
    rows = VlenRows(dataset, dtype, chunk_rows, offsets, base, fd)
    weakref.finalize(rows, os.close, fd)
    return rows
