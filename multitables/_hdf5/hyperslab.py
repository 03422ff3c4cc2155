"""Worker-side reading of a translated selection from an h5py dataset (internal).

The parent turns a numpy key into a :class:`~multitables._keys._indexing.Selection` with
``translate``; a worker hands it to :func:`read_selection`, which builds the HDF5 dataspace
selections with h5py's low-level API and reads with as few ``H5Dread`` calls as it can: one
for a regular hyperslab or a union of up to ``_MAX_SLABS`` hyperslabs, then a numpy gather
(the selection's ``local_key``) when the result is not the box read as it lies.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref

import numpy as np
from h5py import h5s, h5t

from multitables._hdf5._rows import runs
from multitables._hdf5.decode import ChunkDecoder
from multitables._hdf5.rawread import RawRows, row_range
from multitables._hdf5.virtualread import VirtualRows
from multitables._keys._indexing import Selection

try:
    # h5py's Cython selector adds one hyperslab per index in a C loop, where select_hyperslab
    # calls from Python cost more with every slab the union holds (bench/README.md, "Costs the
    # read paths are built around"). It is internal to h5py (present since 3.0), so its
    # absence is tolerated.
    from h5py._selector import Selector as _Selector
except ImportError:  # pragma: no cover
    _Selector = None

def _memory_type(dtype: np.dtype):
    """The HDF5 memory type of ``dtype`` (h5py builds it anew at every call, at a cost a
    small read notices).

    Cached only for dtypes without metadata: numpy's dtype equality ignores it, and h5py keeps
    string encodings and enums there.
    """
    if _has_metadata(dtype):
        return h5t.py_create(dtype)
    return _cached_memory_type(dtype)


@functools.lru_cache(maxsize=64)
def _cached_memory_type(dtype: np.dtype):
    return h5t.py_create(dtype)


def _has_metadata(dtype: np.dtype) -> bool:
    if dtype.metadata:
        return True
    if dtype.subdtype is not None:
        return _has_metadata(dtype.subdtype[0])
    return any(_has_metadata(dtype[name]) for name in dtype.names or ())


@functools.lru_cache(maxsize=64)
def _memory_space(shape: tuple[int, ...]):
    """A whole-array memory dataspace; shared, so callers never change its selection."""
    return h5s.create_simple(shape)


# Keyed weakly: an entry goes with its dataset, so a later dataset never gets a stale space.
_FILE_SPACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _file_space(dsid):
    """A reusable file dataspace of ``dsid`` (one per read costs what a small read notices);
    every use replaces its selection."""
    space = _FILE_SPACES.get(dsid)
    if space is None:
        space = _FILE_SPACES[dsid] = dsid.get_space()
    return space


# Hyperslabs per H5Dread. HDF5 builds a union in more than linear time (bench/README.md, "Costs
# the read paths are built around"), so larger unions are read in batches.
_MAX_SLABS = 256
# Points per H5Dread when a selection is read point by point (bounds the coordinate array).
_MAX_POINTS = 1 << 20
# In point mode, each point gets its own hyperslab when it covers at least this many
# elements; smaller ones are cheaper as an H5Sselect_elements point list.
_MIN_SLAB_ELEMENTS = 8


def field_dtype(dtype: np.dtype, field: str | None) -> np.dtype:
    """The dtype of ``field`` in compound ``dtype`` (``dtype`` itself when ``field`` is None).

    A subarray field keeps its shape: read one, and the result gains ``.shape`` trailing
    dimensions of ``.base`` elements.

    >>> field_dtype(np.dtype([("x", "<f4"), ("img", "u1", (2, 3))]), "img")
    dtype(('u1', (2, 3)))
    """
    dtype = np.dtype(dtype)
    if field is None:
        return dtype
    names = dtype.names or ()
    if field not in names:
        raise ValueError(f"no field {field!r} in dataset; fields are {names}")
    return dtype[field]


def result_layout(sel: Selection, dtype: np.dtype, field: str | None = None):
    """``(shape, dtype)`` of the array :func:`read_selection` fills for ``sel``."""
    fdt = field_dtype(dtype, field)
    return tuple(sel.result_shape) + fdt.shape, fdt.base


def read_selection(dataset, sel: Selection, out: np.ndarray, field: str | None = None) -> None:
    """Read ``dataset[key]`` (as translated into ``sel``) into ``out``.

    ``out`` is C-contiguous and writeable, of shape ``sel.result_shape`` (plus the field's
    subarray shape) and the dataset's dtype as stored (or the field's base dtype).
    """
    shape, dtype = result_layout(sel, dataset.dtype, field)
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(
            f"out has shape {out.shape} and dtype {out.dtype}, but the selection "
            f"needs shape {shape} and dtype {dtype}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    if out.size == 0:
        return
    if field is None:
        mem_dtype = out.dtype
        view = out
    else:
        # A compound of the one field lies in memory exactly as the field does.
        mem_dtype = np.dtype([(field, field_dtype(dataset.dtype, field))])
        view = out.reshape(-1).view(mem_dtype).reshape(sel.result_shape)
    # Past HDF5 where the layout allows (identical results): unfiltered rows straight from the
    # file (rawread), ranges of compressed rows decoded by faster codecs (decode).
    raw = RawRows.of(dataset) if field is None else None
    if raw is not None and sel.local_key is not None and raw.gather(sel, out):
        return
    if raw is None and field is None and sel.local_key is None:
        rows = row_range(sel)
        # A virtual dataset's rows from its sources, each through these same paths.
        virtual = VirtualRows.of(dataset) if rows is not None else None
        if virtual is not None and rows is not None and virtual.read_rows(
                rows[0], rows[1], out, read_selection):
            return
        decoder = ChunkDecoder.of(dataset) if rows is not None and virtual is None else None
        if decoder is not None and rows is not None and decoder.read_rows(rows[0], rows[1], out):
            return
    box = view if sel.local_key is None else _scratch(sel.read_shape, mem_dtype)
    if raw is None or not raw.read(sel, box):
        _read_box(dataset.id, sel, box, _memory_type(mem_dtype))
    if sel.local_key is not None:
        view[...] = box[sel.local_key]


_SCRATCH = np.empty(0, np.uint8)


def _scratch(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A reused buffer for boxes that are rearranged into ``out``: a fresh large array costs a
    page fault per 4 KiB, more than reading into it."""
    global _SCRATCH
    nbytes = math.prod(shape) * dtype.itemsize
    if _SCRATCH.nbytes < nbytes:
        _SCRATCH = np.empty(nbytes, np.uint8)
    return _SCRATCH[:nbytes].view(dtype).reshape(shape)


def _read_box(dsid, sel: Selection, buf: np.ndarray, mtype) -> None:
    """Fill ``buf`` (C-contiguous, ``sel.read_size`` elements) with the selection's box."""
    if not sel.read_shape:
        fspace = dsid.get_space()
        fspace.select_all()
        dsid.read(h5s.create(h5s.SCALAR), fspace, buf, mtype)
    elif sel.points is None:
        _read_product(dsid, sel, buf, mtype)
    else:
        _read_points(dsid, sel, buf, mtype)


def _read_batches(dsid, buf, mtype, read_shape, axis, edges, per_batch, select) -> None:
    """Read the box in batches of units along ``axis``: unit ``u`` fills box positions
    ``edges[u]:edges[u + 1]``, and ``select(fspace, u0, u1)`` selects units ``u0:u1`` in the
    file in the box's C order."""
    fspace = dsid.get_space()
    nunits = len(edges) - 1
    if nunits <= per_batch:
        select(fspace, 0, nunits)
        dsid.read(h5s.create_simple(read_shape), fspace, buf, mtype)
        return
    mspace = h5s.create_simple(read_shape)
    start = [0] * len(read_shape)
    count = list(read_shape)
    for u0 in range(0, nunits, per_batch):
        u1 = min(nunits, u0 + per_batch)
        select(fspace, u0, u1)
        start[axis] = edges[u0]
        count[axis] = edges[u1] - edges[u0]
        mspace.select_hyperslab(tuple(start), tuple(count))
        dsid.read(mspace, fspace, buf, mtype)


def _read_product(dsid, sel: Selection, buf, mtype) -> None:
    """Product mode: the union over runs of each index set, times the regular hyperslabs."""
    dims = sel.dims
    start = [e[0] if isinstance(e, tuple) else 0 for e in dims]
    count = [e[2] if isinstance(e, tuple) else 1 for e in dims]
    stride = [e[1] if isinstance(e, tuple) else 1 for e in dims]
    block = [1] * len(dims)
    slabs = {}
    for d, e in enumerate(dims):
        if not isinstance(e, tuple):
            s, n = runs(e)
            slabs[d] = list(zip(s.tolist(), n.tolist(), strict=True))
    if not slabs:
        fspace = _file_space(dsid)
        fspace.select_hyperslab(tuple(start), tuple(count), tuple(stride))
        dsid.read(_memory_space(sel.read_shape), fspace, buf, mtype)
        return
    if len(slabs) == 1 and _Selector is not None:
        # One index set: h5py builds the union in C, and one H5Dread reads it all.
        args = tuple(
            slice(e[0], e[0] + e[1] * e[2], e[1]) if isinstance(e, tuple) else e for e in dims
        )
        fspace = _Selector(dsid.get_space()).make_selection(args).id
        dsid.read(_memory_space(sel.read_shape), fspace, buf, mtype)
        return
    # Split along the index set with the most runs; the others are combined in every batch.
    split = max(slabs, key=lambda d: len(slabs[d]))
    others = [d for d in slabs if d != split]
    combos = list(itertools.product(*(slabs[d] for d in others)))
    edges = np.concatenate([[0], np.cumsum([n for _, n in slabs[split]])]).tolist()

    def select(space, u0, u1):
        space.select_none()
        for s, n in slabs[split][u0:u1]:
            start[split] = s
            block[split] = n
            for combo in combos:
                for d, (s2, n2) in zip(others, combo, strict=True):
                    start[d] = s2
                    block[d] = n2
                space.select_hyperslab(
                    tuple(start), tuple(count), tuple(stride), tuple(block), h5s.SELECT_OR
                )

    per_batch = max(1, _MAX_SLABS // len(combos))
    _read_batches(dsid, buf, mtype, sel.read_shape, split, edges, per_batch, select)


def _read_points(dsid, sel: Selection, buf, mtype) -> None:
    """Point mode: each unique point of the advanced dims, times the other dims' hyperslabs."""
    dims, pdims, axis, points = sel.dims, sel.point_dims, sel.point_axis, sel.points
    assert points is not None  # point mode
    other = [d for d in range(len(dims)) if d not in pdims]
    inner = math.prod(dims[d][2] for d in other)
    # A union of slabs comes back in the file's C order, which is the box's when every
    # other dim of more than one element lies before the points (and before the point axis
    # in the box) or after all of them.
    slab_order = all(
        dims[d][2] == 1 or (d < pdims[0] and j < axis) or (d > pdims[-1] and j >= axis)
        for j, d in enumerate(other)
    )
    edges = list(range(len(points) + 1))
    if slab_order and inner >= _MIN_SLAB_ELEMENTS:
        start = [e[0] if isinstance(e, tuple) else 0 for e in dims]
        count = [e[2] if isinstance(e, tuple) else 1 for e in dims]
        stride = [e[1] if isinstance(e, tuple) else 1 for e in dims]
        plist = points.tolist()

        def select_slabs(space, u0, u1):
            space.select_none()
            for p in plist[u0:u1]:
                for d, v in zip(pdims, p, strict=True):
                    start[d] = v
                space.select_hyperslab(
                    tuple(start), tuple(count), tuple(stride), None, h5s.SELECT_OR
                )

        _read_batches(dsid, buf, mtype, sel.read_shape, axis, edges, _MAX_SLABS, select_slabs)
        return
    # Point list in the box's C order: broadcast each dim's coordinates over the box.
    rank = len(dims)
    nbox = len(sel.read_shape)

    def select(space, u0, u1):
        bshape = list(sel.read_shape)
        bshape[axis] = u1 - u0
        coords = np.empty(tuple(bshape) + (rank,), np.uint64)
        for j, d in enumerate(pdims):
            col = points[u0:u1, j].reshape([-1 if k == axis else 1 for k in range(nbox)])
            coords[..., d] = col
        for j, d in enumerate(other):
            s, st, c = dims[d]
            k = j if j < axis else j + 1
            coords[..., d] = np.arange(s, s + st * c, st).reshape(
                [-1 if i == k else 1 for i in range(nbox)]
            )
        space.select_elements(coords.reshape(-1, rank))

    _read_batches(
        dsid, buf, mtype, sel.read_shape, axis, edges, max(1, _MAX_POINTS // max(inner, 1)), select
    )
