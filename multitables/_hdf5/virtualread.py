"""Rows of a virtual dataset read from its sources through the fast read paths (internal).

HDF5 reads a virtual dataset by mapping each selection to its sources and reading those through
its own per-element path: a compressed source through its filters and chunk cache, an
unfiltered one without ``pread`` past HDF5. Where every mapping of a virtual dataset is a block
of whole rows of a source of the same row shape and dtype (what ``h5py.VirtualLayout`` makes of
files stacked along the first axis), ``VirtualRows`` resolves the mapping once and reads a range
of rows as the ranges of its sources, each through ``read_selection`` (``rawread``'s ``pread``,
``decode``'s codecs), and rows no source maps as the fill value. Anything else (strided or
partial mappings, unlimited ones, printf-style source names, a source that is missing, of
another shape or dtype, or shorter than its mapping, a prefix from ``HDF5_VDS_PREFIX``, a
virtual dataset not in a local file) is left to HDF5, so results are identical either way.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .._keys._indexing import translate
from .source import per_dataset


@dataclass(frozen=True)
class Mapping:
    """Virtual rows ``start:stop`` are rows ``source_start`` onwards of a source."""

    start: int
    stop: int
    file_name: str  # as the virtual dataset names it ("." for its own file)
    dset_name: str
    source_start: int
    whole: bool = False  # the source's every row, however many it holds: exactly these


class VirtualRows:
    """Ranges of rows of one virtual dataset, read from its sources (opened on first use, kept
    as long as the virtual dataset is open)."""

    def __init__(self, dataset: h5py.Dataset, mappings: list[Mapping]):
        self.n_rows = dataset.shape[0]
        self.mappings = sorted(mappings, key=lambda m: m.start)
        self.fill = np.asarray(dataset.fillvalue, dataset.dtype)
        self._own = dataset.file  # for sources in its own file ("."); closed with it
        self._base = os.path.dirname(os.path.abspath(os.fsdecode(dataset.file.filename)))
        self._row_shape, self._dtype = dataset.shape[1:], dataset.dtype
        self._files: dict[str, h5py.File] = {}
        self._sources: dict[tuple[str, str], h5py.Dataset | None] = {}
        weakref.finalize(self, _close_all, self._files)

    @classmethod
    def of(cls, dataset: h5py.Dataset) -> VirtualRows | None:
        """The resolved mapping of virtual ``dataset``; None for a dataset that is not
        virtual, or one whose mapping HDF5 must read."""
        return _virtual_rows(dataset)

    def read_rows(self, start: int, stop: int, out: np.ndarray,
                  read: Callable[[Any, Any, np.ndarray], None]) -> bool:
        """Rows ``start:stop`` into ``out`` (C-contiguous, those rows), each source's part by
        ``read(source, selection, out_part)``; False when a source cannot be opened as it
        was described (HDF5 then reads the rows: ``out`` may hold part of them)."""
        row = start
        for m in self.mappings:
            if m.stop <= row:
                continue
            if m.start >= stop:
                break
            if m.start > row:  # no source maps these rows
                out[row - start : m.start - start] = self.fill
                row = m.start
            end = min(stop, m.stop)
            source = self._source(m)
            if source is None:
                return False
            first = m.source_start + row - m.start
            read(source, translate((slice(first, first + end - row),), source.shape),
                 out[row - start : end - start])
            row = end
        if row < stop:
            out[row - start : stop - start] = self.fill
        return True

    def _source(self, m: Mapping) -> h5py.Dataset | None:
        key = (m.file_name, m.dset_name)
        if key in self._sources:
            return self._sources[key]
        found = None
        try:
            if m.file_name == ".":
                found = self._own[m.dset_name]
            else:
                path = _source_path(self._base, m.file_name)
                if path is not None:
                    if path not in self._files:
                        self._files[path] = h5py.File(path, "r")
                    found = self._files[path][m.dset_name]
        except (OSError, KeyError):
            found = None
        n = m.stop - m.start
        if not isinstance(found, h5py.Dataset) or found.dtype != self._dtype or \
                found.shape[1:] != self._row_shape or found.shape[0] < m.source_start + n or \
                (m.whole and found.shape[0] != n):
            found = None  # as HDF5 would not read it: let HDF5 say what it reads instead
        self._sources[key] = found
        return found


def _close_all(files: dict[str, h5py.File]) -> None:
    for f in files.values():
        f.close()
    files.clear()


def _source_path(base: str, name: str) -> str | None:
    """The file HDF5 opens for source file ``name`` of a virtual dataset in directory
    ``base``: an absolute name as it is, else the name beside the virtual dataset's file,
    else relative to the working directory; None where it is not found."""
    if os.path.isabs(name):
        return name if os.path.exists(name) else None
    for path in (os.path.join(base, name), os.path.abspath(name)):
        if os.path.exists(path):
            return path
    return None


@per_dataset
def _virtual_rows(dataset: h5py.Dataset) -> VirtualRows | None:
    dcpl = dataset.id.get_create_plist()
    if dcpl.get_layout() != h5py.h5d.VIRTUAL or not dataset.shape or \
            os.environ.get("HDF5_VDS_PREFIX") or dataset.dtype.hasobject or \
            dataset.file.driver != "sec2":
        return None  # (a file in an object store: its sources are not local files)
    shape = dataset.shape
    mappings = []
    for i in range(dcpl.get_virtual_count()):
        file_name, dset_name = dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i)
        if "%" in file_name or "%" in dset_name:
            return None  # printf-style names: a mapping per block, left to HDF5
        rows = _row_block(dcpl.get_virtual_vspace(i), shape)
        if rows is None:
            return None
        src_space = dcpl.get_virtual_srcspace(i)
        if src_space.get_simple_extent_type() != h5py.h5s.SIMPLE:
            # No extent: all of the source, as long as it is when read (checked on opening).
            if src_space.get_select_type() != h5py.h5s.SEL_ALL:
                return None
            mappings.append(Mapping(rows[0], rows[1], file_name, dset_name, 0, whole=True))
            continue
        src_rows = _row_block(src_space, src_space.shape)
        if src_rows is None or src_rows[1] - src_rows[0] != rows[1] - rows[0] \
                or tuple(src_space.shape[1:]) != tuple(shape[1:]):
            return None
        mappings.append(Mapping(rows[0], rows[1], file_name, dset_name, src_rows[0]))
    mappings.sort(key=lambda m: m.start)
    if any(a.stop > b.start for a, b in zip(mappings, mappings[1:], strict=False)):
        return None  # overlapping mappings: HDF5 decides which source wins
    return VirtualRows(dataset, mappings)


def _row_block(space: h5py.h5s.SpaceID, shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(start, stop)`` when ``space`` selects rows ``start:stop`` whole in every other
    dimension of ``shape``; None for any other selection."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:
        return (0, shape[0]) if shape else None
    if kind != h5py.h5s.SEL_HYPERSLABS or not space.is_regular_hyperslab():
        return None
    start, stride, count, block = space.get_regular_hyperslab()
    extents = []
    for s, st, c, b in zip(start, stride, count, block, strict=True):
        if c >= h5py.h5s.UNLIMITED or b >= h5py.h5s.UNLIMITED:
            return None
        if c > 1 and st != b:
            return None  # gaps between blocks
        extents.append((int(s), int(s) + int(c) * int(b)))
    if any(e != (0, n) for e, n in zip(extents[1:], shape[1:], strict=True)):
        return None
    return extents[0] if extents else None
