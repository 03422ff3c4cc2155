# cython: language_level=3, embedsignature=True
"""Translation of numpy-style keys into plain, picklable read plans (internal).

``translate(key, shape)`` does everything numpy does with ``arr[key]`` except touch data: it
checks the key, raising the exception numpy would raise, in numpy's words, and returns a
:class:`Selection`: a box to read from the file (one regular hyperslab or sorted unique index
set per dataset dimension, or a list of points) and the numpy key that turns that box into the
result. This module never imports h5py; ``multitables._hdf5.hyperslab`` applies the plan in a worker.

Here are the front door and its fast paths (a block of rows, a batch of row numbers); the
general translation's phases live beside it, one module each: ``_keyitems`` parses a key,
``_plan`` plans it, ``_indexsets`` holds the C loops over index arrays, and ``_selection`` the
plan itself.
"""

import operator

import numpy as np

cimport cython
cimport numpy as cnp
from libc.stdint cimport int64_t

from multitables._keys._indexsets cimport _dim_plan, _int_list
from multitables._keys._keyitems cimport _parse
from multitables._keys._plan cimport (
    _basic_selection, _broadcast_index_arrays, _check_result_rank, _place_block,
    _plan_basic_items, _product_selection,
)
# The type under another name: a cimported name is not one of the module's Python names, and
# importers take ``Selection`` and the plain requests' reader from here.
from multitables._keys._selection cimport Selection as _Selection, _count, _prod

from multitables._keys._selection import PLAIN_TAG, Selection, read_plain, take_plain

cnp.import_array()

# A plan that reads the product of the per-dimension index sets is replaced by a point plan
# when that product exceeds the result by more than this factor (plus a small allowance).
_SUPERSET_FACTOR = 4
_SUPERSET_SLACK = 1024


def translate(key, shape):
    """Translate numpy key ``key`` for an array of ``shape`` into a :class:`Selection`.

    Raises what ``numpy.empty(shape)[key]`` raises, with numpy's message.

    >>> sel = translate((slice(None, None, -2), [3, 1, 3]), (10, 5))
    >>> sel.dims, sel.result_shape
    (((1, 2, 5), (1, 2, 2)), (5, 3))
    >>> sel.local_key
    (slice(None, None, -1), array([1, 0, 1]))
    """
    cdef tuple shp = tuple([operator.index(s) for s in shape])
    if shp:
        first = key
        if type(key) is tuple:
            # (rows,) and (rows, ...) select what rows alone does: the 2.0.1 spelling of a batch
            # is ds[rows, ...]
            if len(<tuple>key) == 1 or (len(<tuple>key) == 2 and (<tuple>key)[1] is Ellipsis
                                         and (<tuple>key)[0] is not Ellipsis):
                first = (<tuple>key)[0]
        if type(first) is slice:
            return _slice_selection(shp, first)
        rows = _row_array(first)
        if rows is not None:
            sel = _rows_selection(shp, rows, type(first) is list and type(rows) is np.ndarray
                                  and (<object>rows).dtype == np.int64)
            if sel is not None:
                return sel
    return _translate(key, shp)


cdef _Selection _slice_selection(tuple shp, slice key):
    """``translate`` of one slice on the first dimension (a block of rows), as the general code
    plans it."""
    start, stop, step = key.indices(shp[0])
    count = len(range(start, stop, step))
    rest = shp[1:]
    if count == 0:
        dim = (0, 1, 0)
    elif count == 1:
        dim = (start, 1, 1)
    elif step > 0:
        dim = (start, step, count)
    else:
        dim = (start + (count - 1) * step, -step, count)
    local = None if step > 0 or count < 2 or 0 in rest else (slice(None, None, -1),)
    return _Selection(shp, (dim,) + tuple([(0, 1, s) for s in rest]), (dim[2],) + rest,
                     (count,) + rest, local)


cdef object _row_array(object key):
    """``key`` as a 1-D array of row numbers, when it is one index array (a random batch, the
    commonest key by far) of signed (or narrow unsigned) integers; else None."""
    if type(key) is list:
        rows = _int_list(<list>key)
        if rows is not None:
            return rows
        key = np.asarray(key)
    if not isinstance(key, np.ndarray) or key.ndim != 1 or not key.shape[0]:
        return None
    kind = key.dtype.kind
    if kind == "i" or (kind == "u" and key.dtype.itemsize < 8):
        return key
    return None


@cython.boundscheck(False)
@cython.wraparound(False)
cdef _Selection _rows_selection(tuple shp, object key, bint fresh=False):
    """``translate`` of one 1-D index array on the first dimension, as the general code plans
    it, without its parser: the bounds checked and negative rows turned in one C loop, then the
    general ``_dim_plan``. None when the general code must do it: an index out of bounds (it
    raises numpy's error) or an empty result (it plans those alike)."""
    # a copy: the caller may reuse theirs (_int_list's array is new already)
    rows = key if fresh else np.array(key, dtype=np.int64)
    cdef int64_t *a = <int64_t *>cnp.PyArray_DATA(rows)
    cdef Py_ssize_t i, n = rows.shape[0]
    cdef int64_t size = shp[0], v
    cdef bint increasing = True
    rest = shp[1:]
    if 0 in rest:
        return None
    for i in range(n):
        v = a[i]
        if v < 0:
            v += size
            if v < 0:
                return None
            a[i] = v
        elif v >= size:
            return None
        if i and v <= a[i - 1]:
            increasing = False
    dim, pos = _dim_plan(rows)
    # Rows in increasing order are the box as it is read (the general code's _is_identity).
    return _Selection(shp, (dim,) + tuple([(0, 1, s) for s in rest]), (_count(dim),) + rest,
                     (n,) + rest, None if increasing else (pos,))


def _translate(key, tuple shp):
    """The general translation: any key numpy takes, parsed (``_keyitems``), then planned in
    five steps (``_plan``)."""
    cdef Py_ssize_t ndim = len(shp), d, consec
    cdef bint moved
    cdef list items = _parse(key, ndim)
    cdef list dims = [None] * ndim
    cdef list local = []          # local item per key item (None for implicit ellipsis)
    cdef list fancy = []          # (key item index, dataset dim or -1, int array) per index array
    cdef list item_dim = []       # first dataset dim of each item

    _check_result_rank(items, shp)
    if not _plan_basic_items(items, shp, dims, local, fancy, item_dim):
        return _basic_selection(shp, dims, items, local)
    bshape, arrays = _broadcast_index_arrays(fancy, shp)
    result_shape, consec, moved = _place_block(items, item_dim, dims, shp, bshape)
    if _prod(result_shape) == 0:
        for d in range(ndim):
            if dims[d] is None:
                dims[d] = (0, 1, 0)
        return _Selection(shp, tuple(dims), tuple([_count(e) for e in dims]), result_shape, None)
    return _product_selection(shp, dims, items, item_dim, local, arrays, bshape, consec, moved,
                              result_shape, _SUPERSET_FACTOR, _SUPERSET_SLACK)
