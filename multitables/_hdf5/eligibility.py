"""Which datasets the fast decode path reads, and how: a ``DecodePlan``, or None (internal).

A dataset qualifies when it is chunked in whole rows (``chunks[1:] == shape[1:]``), stored in
the type it is read as, and filtered by at most a shuffle and one compressor from the codec
table that an installed library decodes. Anything else is left to HDF5 as a whole, counted once
per dataset as ``declined: ...`` in ``fallback.fallbacks``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from .._sources.chunkmap import ChunkMap
from .codecs import CODECS, LZF, SHUFFLE, Codec
from .fallback import fall_back


@dataclass(frozen=True)
class DecodePlan:
    """How the chunks of one dataset are read raw and decoded."""

    shape: tuple[int, ...]
    row_bytes: int
    chunk_rows: int
    ok: np.ndarray  # chunk k is allocated and stored with every filter applied
    raw_size: int  # bytes of the largest stored chunk
    codec: Codec | None  # None: shuffled only
    shuffle: int  # element size the HDF5 shuffle filter used; 0: none
    bytes_in: bool  # the codec wants bytes (python-lzf), not a writable view
    name: str  # the codec's, as counted in ``decoded``
    # Another codec like ``codec``, with state of its own, for decoding in several threads.
    remake: Callable[[], Codec] | None = field(default=None, compare=False)


def _declined(what: str) -> Any:
    """A compressed dataset left to HDF5 as a whole (no plan, no pipeline: None), counted once
    per dataset opened."""
    fall_back(f"declined: {what}")
    return None


@dataclass(frozen=True)
class Pipeline:
    """How the stored bytes of chunks of one shape become rows: a codec (None: shuffled
    only) and the shuffle undone after it."""

    codec: Codec | None
    shuffle: int  # element size the HDF5 shuffle filter used; 0: none
    bytes_in: bool  # the codec wants bytes (python-lzf), not a writable view
    name: str  # the codec's, as counted in ``decoded``
    remake: Callable[[], Codec] | None = field(default=None, compare=False)


def pipeline(dtype: np.dtype, chunks: tuple[int, ...],
             filters: list[tuple[int, int, tuple[int, ...]]]) -> Pipeline | None:
    """The ``Pipeline`` of chunks ``chunks`` of ``dtype`` stored through ``filters`` (HDF5's
    (filter id, flags, client values), in pipeline order), or None (counted as declined) when
    no installed library decodes them."""
    nbytes = dtype.itemsize * math.prod(chunks)
    filters = list(filters)
    # HDF5 applies the filters in pipeline order when writing: shuffle, then one compressor.
    shuffle = 0
    if filters[0][0] == SHUFFLE:
        shuffle = filters.pop(0)[2][0] if filters[0][2] else dtype.itemsize
    if len(filters) > 1:
        return _declined("dataset with a checksum, scale-offset or a second compressor")
    if not filters:
        return Pipeline(None, shuffle, False, "none")
    code = filters[0][0]
    spec = CODECS.get(code)
    name = spec.name if spec is not None else f"filter {code}"
    if spec is None or not spec.available():
        return _declined((spec and spec.unavailable)
                         or f"dataset compressed by {name}, which no installed library "
                            "decodes")
    return Pipeline(spec.make(nbytes, chunks, dtype.itemsize), shuffle, code == LZF, name,
                    functools.partial(spec.make, nbytes, chunks, dtype.itemsize))


def plan(dataset: h5py.Dataset, stored: ChunkMap | None = None) -> DecodePlan | None:
    """The plan for reading ``dataset`` past HDF5's filters, or None when HDF5 must read it.
    ``stored``: the dataset's chunk map, when it is known (then its chunk index is not read)."""
    dsid, shape, dtype = dataset.id, dataset.shape, dataset.dtype
    dcpl = dsid.get_create_plist()
    if not shape or dcpl.get_layout() != h5py.h5d.CHUNKED or not dcpl.get_nfilters():
        return None  # nothing to decode: read as stored (rawread, or HDF5)
    if tuple(dataset.chunks[1:]) != tuple(shape[1:]):
        return _declined("dataset chunked across rows")
    if dtype.hasobject or dsid.get_type() != h5py.h5t.py_create(dtype):
        return _declined("dataset of a type HDF5 converts, or of references")
    chunks = tuple(dataset.chunks)
    nbytes = dtype.itemsize * math.prod(chunks)
    found = pipeline(dtype, chunks, [dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters())])
    if found is None:
        return None
    if stored is not None:
        ok, raw_size = mapped_chunks(stored, shape, chunks, nbytes)
    elif not hasattr(dsid, "chunk_iter"):
        return _declined("h5py built on HDF5 < 1.12.3 (no chunk_iter)")
    else:
        ok, raw_size = _stored_chunks(dsid, shape, chunks, nbytes)
    return DecodePlan(tuple(shape), nbytes // chunks[0], chunks[0], ok, raw_size, found.codec,
                      found.shuffle, bytes_in=found.bytes_in, name=found.name,
                      remake=found.remake)


def _stored_chunks(dsid, shape: tuple[int, ...], chunks: tuple[int, ...],
                   nbytes: int) -> tuple[np.ndarray, int]:
    """Which chunks are stored with every filter applied, and the largest one's size."""
    n_chunks = -(-shape[0] // chunks[0])
    ok = np.zeros(n_chunks, bool)
    sizes = [0]

    def note(info):
        k = info.chunk_offset[0] // chunks[0]
        if k < n_chunks:
            ok[k] = info.filter_mask == 0
            sizes.append(info.size)

    dsid.chunk_iter(note)
    if shape[0] % chunks[0] and ok[-1] and _stored_raw(dsid, chunks, n_chunks, nbytes):
        # A file made with H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS stores a partial edge chunk
        # unfiltered with a filter mask of 0 (h5py cannot ask for the option): when the last
        # chunk's size is that of raw data, let HDF5 read it.
        ok[-1] = False
    return ok, max(sizes)


def mapped_chunks(stored: ChunkMap, shape: tuple[int, ...], chunks: tuple[int, ...],
                  nbytes: int) -> tuple[np.ndarray, int]:
    """``_stored_chunks`` from a chunk map."""
    k = stored.chunk_offsets[:, 0] // chunks[0] if len(stored) else np.zeros(0, np.int64)
    return chunks_ok(k, stored.filter_masks, stored.sizes, shape[0], chunks[0], nbytes)


def chunks_ok(k: np.ndarray, masks: np.ndarray, sizes: np.ndarray, n_rows: int,
              chunk_rows: int, nbytes: int) -> tuple[np.ndarray, int]:
    """Which chunks of rows are stored with every filter applied, given each stored chunk's
    number ``k``, filter mask and size, and the largest one's size."""
    n_chunks = -(-n_rows // chunk_rows)
    ok = np.zeros(n_chunks, bool)
    inside = k < n_chunks
    ok[k[inside]] = masks[inside] == 0
    if n_rows % chunk_rows and ok[-1]:
        last = np.flatnonzero(k == n_chunks - 1)
        ok[-1] = not (len(last) and int(sizes[last[0]]) == nbytes)  # see _stored_chunks
    return ok, int(sizes.max()) if len(sizes) else 0


def decodable(dtype: np.dtype, filters: list[tuple[int, int, tuple[int, ...]]]) -> bool:
    """Whether ``pipeline`` decodes chunks of ``dtype`` stored through ``filters`` (without
    making a codec)."""
    filters = list(filters)
    if filters and filters[0][0] == SHUFFLE:
        filters.pop(0)
    if len(filters) > 1:
        return False
    spec = CODECS.get(filters[0][0]) if filters else None
    return not filters or (spec is not None and spec.available())


def _stored_raw(dsid, chunks: tuple[int, ...], n_chunks: int, nbytes: int) -> bool:
    info = dsid.get_chunk_info_by_coord(((n_chunks - 1) * chunks[0],) + (0,) * (len(chunks) - 1))
    return info.byte_offset is not None and info.size == nbytes
