# cython: language_level=3, embedsignature=True
"""Translation of numpy-style keys into plain, picklable read plans (internal).

``translate(key, shape)`` does everything numpy does with ``arr[key]`` except touch data: it
checks the key, raising the exception numpy would raise, in numpy's words, and returns a
:class:`Selection`: a box to read from the file (one regular hyperslab or sorted unique index
set per dataset dimension, or a list of points) and the numpy key that turns that box into the
result. This module never imports h5py; ``multitables._hdf5.hyperslab`` applies the plan in a worker.
"""

import operator

import numpy as np

cimport cython
cimport numpy as cnp
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.stdint cimport int64_t

cnp.import_array()

# numpy's own messages (numpy/_core/src/multiarray/mapping.c).
_INVALID = ("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis (`None`) and "
            "integer or boolean arrays are valid indices")
_NOT_INT_ARRAY = "arrays used as indices must be of integer (or boolean) type"
_MAXDIMS = 64
_INTP_MIN = -(1 << 63)
_INTP_MAX = (1 << 63) - 1

# Index arrays up to this long are sorted by a C insertion sort (see _unique_positions).
cdef enum:
    _SMALL_SORT = 128

# A plan that reads the product of the per-dimension index sets is replaced by a point plan
# when that product exceeds the result by more than this factor (plus a small allowance).
_SUPERSET_FACTOR = 4
_SUPERSET_SLACK = 1024

# Item kinds after parsing a key. A parsed item is ``[kind, value]``; an ellipsis item is
# ``[K_ELLIPSIS, dims it covers, implied]``, ``implied`` true for the one that ``_parse`` adds
# for the dimensions a key leaves out (it has no place in local keys).
cdef enum:
    K_INT, K_SLICE, K_ELLIPSIS, K_NEWAXIS, K_BOOL0, K_ARRAY, K_MASK

# Where numpy puts the broadcast block of the advanced items (index arrays, and integers beside
# them), found by scanning the key (numpy's mapping.c, mapiter_fill_info): at the first advanced
# item when they are all adjacent, else in front.
cdef enum:
    ADV_NONE_SEEN    # no advanced item yet
    ADV_IN_RUN       # in the first run of adjacent advanced items
    ADV_RUN_ENDED    # a basic item followed that run
    ADV_SPLIT        # an advanced item came after the gap: the block goes in front


cdef inline bint _implied(list it):
    """Whether parsed item ``it`` is the ellipsis ``_parse`` adds for dimensions left out."""
    return it[0] == K_ELLIPSIS and it[2]


cdef class Selection:
    """A read plan for ``dataset[key]``: what to read from the file and how to arrange it.

    Attributes
    ----------
    shape : tuple of int
        The dataset shape the key was translated against.
    dims : tuple
        One entry per dataset dimension: ``(start, step, count)`` with ``step >= 1`` (a regular
        hyperslab) or a 1-D int64 array of sorted, unique, in-range indices.
    read_shape : tuple of int
        Shape of the box read from the file. In product mode (``points is None``) it is the
        per-dimension counts of ``dims``; in point mode see ``point_axis``.
    result_shape : tuple of int
        ``numpy_array[key].shape``.
    local_key : tuple or None
        numpy key that turns the box into the result; None when the result is the box
        reshaped to ``result_shape`` (also for empty results, which read nothing).
    points : ndarray or None
        Point mode: int64 array (M, len(point_dims)) of unique coordinates over
        ``point_dims``, sorted in C order. The box then has M along ``point_axis`` and the
        counts of the other dimensions' hyperslabs, in dataset order, around it.
    point_dims : tuple of int
        Dataset dimensions covered by ``points`` (empty in product mode).
    point_axis : int
        Axis of the box that enumerates ``points`` (-1 in product mode).
    """

    cdef readonly tuple shape
    cdef readonly tuple dims
    cdef readonly tuple read_shape
    cdef readonly tuple result_shape
    cdef readonly object local_key
    cdef readonly object points
    cdef readonly tuple point_dims
    cdef readonly Py_ssize_t point_axis

    def __init__(self, tuple shape, tuple dims, tuple read_shape, tuple result_shape,
                 local_key, points=None, tuple point_dims=(), Py_ssize_t point_axis=-1):
        self.shape = shape
        self.dims = dims
        self.read_shape = read_shape
        self.result_shape = result_shape
        self.local_key = local_key
        self.points = points
        self.point_dims = point_dims
        self.point_axis = point_axis

    def __reduce__(self):
        # Index arrays travel as their bytes: numpy's own pickling of an array costs more than
        # the rest of a request's message (bench/README.md, "Costs the read paths are built
        # around").
        lkey = self.local_key
        return (_selection, (self.shape, tuple([_pack(e) for e in self.dims]), self.read_shape,
                             self.result_shape,
                             None if lkey is None else tuple([_pack(k) for k in lkey]),
                             _pack(self.points), self.point_dims, self.point_axis))

    @property
    def size(self):
        """Number of elements in the result."""
        return _prod(self.result_shape)

    @property
    def read_size(self):
        """Number of elements read from the file."""
        return _prod(self.read_shape)

    def nbytes(self, itemsize):
        """Bytes of the result for elements of ``itemsize`` bytes."""
        return _prod(self.result_shape) * operator.index(itemsize)

    def __repr__(self):
        mode = "product" if self.points is None else f"points={len(self.points)}"
        return (f"Selection(shape={self.shape}, read_shape={self.read_shape}, "
                f"result_shape={self.result_shape}, {mode}, "
                f"local_key={'None' if self.local_key is None else '...'})")

    def plain(self):
        """The plan as a tuple of ints, tuples and bytes (for ``marshal``), or None when it has
        points or index arrays other than 1-D int64 sets and one 1-D order: see ``from_plain``.
        Spelled out here because a request's plan crosses to a worker with every request."""
        cdef list dims = []
        if self.points is not None:
            return None
        for e in self.dims:
            if type(e) is tuple:
                dims.append(e)
            elif _is_1d(e, np.int64):
                dims.append((<object>e).tobytes())
            else:
                return None
        order = None
        lkey = self.local_key
        if lkey is not None:
            if len(<tuple>lkey) != 1 or not _is_1d((<tuple>lkey)[0], np.intp):
                return None
            order = (<tuple>lkey)[0].tobytes()
        return (self.shape, tuple(dims), self.read_shape, self.result_shape, order)


cdef bint _is_1d(object a, object dtype):
    return type(a) is np.ndarray and (<object>a).ndim == 1 and (<object>a).dtype == dtype


def from_plain(tuple plain):
    """The ``Selection`` that ``Selection.plain`` spelled out (index arrays read-only)."""
    shape, dims, read_shape, result_shape, order = plain
    return Selection(shape, tuple([e if type(e) is tuple else np.frombuffer(e, np.int64)
                                   for e in dims]),
                     read_shape, result_shape,
                     None if order is None else (np.frombuffer(order, np.intp),))


_PACKED = "multitables._keys._indexing.array"


cdef object _pack(object x):
    """An index array as ``(_PACKED, bytes, dtype, shape)``; anything else as it is."""
    if type(x) is np.ndarray and x.dtype.kind in "biu":
        return (_PACKED, x.tobytes(), x.dtype.str, x.shape)
    return x


cdef object _unpack(object x):
    if type(x) is tuple and len(<tuple>x) == 4 and (<tuple>x)[0] == _PACKED:
        return np.frombuffer(x[1], x[2]).reshape(x[3])  # read-only: plans are never changed
    return x


def _selection(shape, dims, read_shape, result_shape, local_key, points, point_dims,
               point_axis):
    """A pickled ``Selection`` rebuilt (see ``Selection.__reduce__``)."""
    return Selection(shape, tuple([_unpack(e) for e in dims]), read_shape, result_shape,
                     None if local_key is None else tuple([_unpack(k) for k in local_key]),
                     _unpack(points), point_dims, point_axis)


cdef object _prod(tuple t):
    cdef object n = 1
    for x in t:
        n *= x
    return n


def _shape_str(shape):
    """A shape as numpy prints it in indexing errors: ``(2,)``, ``(2,3)``."""
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ",".join(str(s) for s in shape) + ")"


# The C loops below take the address of int64 arrays made contiguous here: taking a typed
# memoryview costs a measurable share of a small plan, which takes several.
cdef inline const int64_t *_int64_data(object contiguous):
    return <const int64_t *>cnp.PyArray_DATA(contiguous)


cdef int64_t _progression_step(const int64_t *a, Py_ssize_t n) noexcept nogil:
    """Step of ``a`` if it is strictly increasing with a constant step, else 0 (n >= 2)."""
    cdef Py_ssize_t i
    cdef int64_t step = a[1] - a[0]
    if step <= 0:
        return 0
    for i in range(2, n):
        if a[i] - a[i - 1] != step:
            return 0
    return step


cdef bint _strictly_increasing(const int64_t *a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(1, n):
        if a[i] <= a[i - 1]:
            return False
    return True


cdef tuple _dim_plan(object a):
    """Plan one dimension indexed by in-range int64 array ``a``: (dims entry, local positions).

    The entry is a ``(start, step, count)`` tuple when the unique values form a progression,
    else the sorted unique array; positions index the entry's values and have ``a``'s shape.
    """
    cdef int64_t step
    cdef Py_ssize_t n
    cdef bint flat_already = (cnp.PyArray_Check(a) and cnp.PyArray_NDIM(a) == 1
                              and cnp.PyArray_TYPE(a) == cnp.NPY_INT64
                              and cnp.PyArray_IS_C_CONTIGUOUS(a))
    # a batch's rows come flat already: the conversions are Python calls
    flat = a if flat_already else np.ascontiguousarray(a.reshape(-1), dtype=np.int64)
    n = cnp.PyArray_DIM(flat, 0)
    if n == 0:
        return (0, 1, 0), a
    if n == 1 or _strictly_increasing(_int64_data(flat), n):
        u = flat
        pos = None
    else:
        u, pos = _unique_positions(flat)
        if not flat_already:
            pos = pos.reshape(a.shape)
    n = u.shape[0]
    if n == 1:
        return (int(u[0]), 1, 1), np.zeros(a.shape, np.intp)
    step = _progression_step(_int64_data(u), n)
    if step:
        start = int(u[0])
        if pos is None:
            pos = (a - start) // step if step > 1 or start else a
        return (start, int(step), n), pos
    if pos is None:
        pos = np.arange(n).reshape(a.shape)
    return u, pos


@cython.boundscheck(False)
@cython.wraparound(False)
cdef tuple _unique_positions(object flat):
    """``np.unique(flat, return_inverse=True)`` (a contiguous 1-D int64 array) in one sort and a
    C loop: numpy's costs tens of microseconds on a 64-row batch."""
    cdef const int64_t *values = _int64_data(flat)
    cdef Py_ssize_t i, j, k = -1, n = flat.shape[0]
    cdef int64_t v
    cdef Py_ssize_t small[_SMALL_SORT]
    cdef Py_ssize_t *order = small
    if n <= _SMALL_SORT:
        # A batch's rows: an insertion sort of their positions by value, in place of numpy's
        # argsort (a call, an array and a conversion).
        for i in range(n):
            v = values[i]
            j = i
            while j > 0 and values[small[j - 1]] > v:
                small[j] = small[j - 1]
                j -= 1
            small[j] = i
    else:
        sorted_positions = flat.argsort().astype(np.intp, copy=False)
        order = <Py_ssize_t *>cnp.PyArray_DATA(sorted_positions)
    cdef cnp.npy_intp dim = n
    unique_array = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT64, 0)
    pos_array = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INTP, 0)
    cdef int64_t *unique = <int64_t *>cnp.PyArray_DATA(unique_array)
    cdef Py_ssize_t *pos = <Py_ssize_t *>cnp.PyArray_DATA(pos_array)
    for i in range(n):
        v = values[order[i]]
        if k < 0 or v != unique[k]:
            k += 1
            unique[k] = v
        pos[order[i]] = k
    if k + 1 == n:  # no repeats (a batch's rows): the slice is a Python call
        return unique_array, pos_array
    return unique_array[:k + 1], pos_array


cdef list _parse(object key, Py_ssize_t ndim):
    """Classify each item of ``key`` as numpy's prepare_index does; returns [kind, value]."""
    cdef list items = []
    cdef Py_ssize_t used = 0, k
    cdef bint seen_ellipsis = False
    seq = key if isinstance(key, tuple) else (key,)
    for obj in seq:
        if type(obj) is int:
            if not _INTP_MIN <= obj <= _INTP_MAX:
                raise IndexError(_INVALID)
            items.append([K_INT, obj])
            used += 1
            continue
        if isinstance(obj, slice):
            items.append([K_SLICE, obj])
            used += 1
            continue
        if obj is Ellipsis:
            if seen_ellipsis:
                raise IndexError("an index can only have a single ellipsis ('...')")
            seen_ellipsis = True
            items.append([K_ELLIPSIS, 0, False])
            continue
        if obj is None:
            items.append([K_NEWAXIS, None])
            continue
        is_array = isinstance(obj, np.ndarray)
        if not is_array and not isinstance(obj, (bool, np.bool_)):
            try:
                v = operator.index(obj)
            except TypeError:
                pass
            else:
                if not _INTP_MIN <= v <= _INTP_MAX:
                    raise IndexError(_INVALID)
                items.append([K_INT, v])
                used += 1
                continue
        arr = obj if is_array else np.asarray(obj)
        if not is_array and arr.size == 0:
            arr = arr.astype(np.intp)
        kind = arr.dtype.kind
        if kind == "b":
            if arr.ndim == 0:
                items.append([K_BOOL0, bool(arr)])
            else:
                items.append([K_MASK, arr])
                used += arr.ndim
        elif kind == "i" or kind == "u":
            if arr.ndim == 0:
                v = int(arr)
                if not _INTP_MIN <= v <= _INTP_MAX:
                    raise IndexError(_INVALID)
                items.append([K_INT, v])
            else:
                items.append([K_ARRAY, arr])
            used += 1
        else:
            raise IndexError(_NOT_INT_ARRAY if is_array else _INVALID)
    if used > ndim:
        raise IndexError(f"too many indices for array: array is {ndim}-dimensional, "
                         f"but {used} were indexed")
    for k in range(len(items)):
        if items[k][0] == K_ELLIPSIS:
            items[k][1] = ndim - used
            break
    else:
        if used < ndim:
            items.append([K_ELLIPSIS, ndim - used, True])
    return items


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


cdef Selection _slice_selection(tuple shp, slice key):
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
    return Selection(shp, (dim,) + tuple([(0, 1, s) for s in rest]), (dim[2],) + rest,
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


cdef object _int_list(list key):
    """A non-empty list of Python ints as a new int64 array, in one C loop (``np.asarray``
    discovers the type of every item first, at several times the cost); None for anything else
    (bools, numpy scalars, nested lists, ints past int64), which numpy's conversion handles."""
    cdef Py_ssize_t i, n = len(key)
    cdef int overflow = 0
    cdef long long v
    cdef cnp.npy_intp dim = n
    if n == 0:
        return None
    rows = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT64, 0)
    cdef int64_t *a = <int64_t *>cnp.PyArray_DATA(rows)
    for i in range(n):
        item = key[i]
        if type(item) is not int:
            return None
        v = PyLong_AsLongLongAndOverflow(item, &overflow)
        if overflow:
            return None
        a[i] = v
    return rows


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Selection _rows_selection(tuple shp, object key, bint fresh=False):
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
    return Selection(shp, (dim,) + tuple([(0, 1, s) for s in rest]), (_count(dim),) + rest,
                     (n,) + rest, None if increasing else (pos,))


def _translate(key, tuple shp):
    """The general translation: any key numpy takes, in five steps (the functions below)."""
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
        return Selection(shp, tuple(dims), tuple([_count(e) for e in dims]), result_shape, None)
    return _product_selection(shp, dims, items, item_dim, local, arrays, bshape, consec, moved,
                              result_shape)


# The steps of _translate. Those returning Python objects report errors as every such cdef
# function does (NULL, checked by the caller); those returning C values say ``except -1``.

cdef int _check_result_rank(list items, tuple shp) except -1:
    """Step 1: the result's rank bound and the boolean masks' shapes, as numpy's prepare_index
    checks them."""
    cdef Py_ssize_t d = 0, j
    nres = 0
    fancy_nd = 0
    for it in items:
        kind = it[0]
        if kind == K_MASK:
            for j in range(it[1].ndim):
                m = it[1].shape[j]
                if m > 0 and m != shp[d + j]:
                    raise IndexError(
                        f"boolean index did not match indexed array along axis {d + j}; "
                        f"size of axis is {shp[d + j]} but size of corresponding boolean "
                        f"axis is {m}")
            d += it[1].ndim
            fancy_nd = max(fancy_nd, 1)
        elif kind == K_ARRAY:
            d += 1
            fancy_nd = max(fancy_nd, it[1].ndim)
        elif kind == K_BOOL0:
            fancy_nd = max(fancy_nd, 1)
        elif kind == K_ELLIPSIS:
            d += it[1]
            nres += it[1]
        elif kind == K_NEWAXIS:
            nres += 1
        else:
            if kind == K_SLICE:
                nres += 1
            d += 1
    if nres + fancy_nd > _MAXDIMS:
        raise IndexError(f"number of dimensions must be within [0, {_MAXDIMS}], "
                         f"indexing result would have {nres + fancy_nd}")
    return 0


cdef bint _plan_basic_items(list items, tuple shp, list dims, list local, list fancy,
                            list item_dim) except -1:
    """Step 2: the basic items in key order (ints bounds-checked, slices resolved into
    ``dims``), each item's local key and first dimension appended to ``local`` and
    ``item_dim``, the index arrays collected in ``fancy``. Whether there are any."""
    cdef Py_ssize_t d = 0, i, j, n
    cdef bint has_fancy = False
    for i, it in enumerate(items):
        kind = it[0]
        item_dim.append(d)
        if kind == K_INT:
            n = shp[d]
            v = it[1]
            if not -n <= v < n:
                raise IndexError(f"index {v} is out of bounds for axis {d} with size {n}")
            if v < 0:
                v += n
            dims[d] = (v, 1, 1)
            local.append(0)
            d += 1
        elif kind == K_SLICE:
            start, stop, step = it[1].indices(shp[d])
            count = len(range(start, stop, step))
            if count == 0:
                dims[d] = (0, 1, 0)
                local.append(slice(None))
            elif count == 1:
                dims[d] = (start, 1, 1)
                local.append(slice(None))
            elif step > 0:
                dims[d] = (start, step, count)
                local.append(slice(None))
            else:
                dims[d] = (start + (count - 1) * step, -step, count)
                local.append(slice(None, None, -1))
            d += 1
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                dims[d + j] = (0, 1, shp[d + j])
            local.append(None if _implied(it) else Ellipsis)
            d += it[1]
        elif kind == K_NEWAXIS:
            local.append(None)
        elif kind == K_BOOL0:
            has_fancy = True
            local.append(it[1])
            fancy.append((i, -1, np.zeros(1 if it[1] else 0, np.int64)))
        elif kind == K_ARRAY:
            has_fancy = True
            local.append(None)
            fancy.append((i, d, it[1]))
            d += 1
        else:  # K_MASK
            has_fancy = True
            local.append(None)
            for j, comp in enumerate(np.nonzero(it[1])):
                fancy.append((i, d + j, comp))
            d += it[1].ndim
    return has_fancy


cdef tuple _broadcast_index_arrays(list fancy, tuple shp):
    """Step 3: the index arrays broadcast, then bounds-checked (numpy skips that when the
    result is empty): ``(broadcast shape, {dataset dim: int64 array, in range, non-negative})``."""
    cdef Py_ssize_t d, n
    shapes = [f[2].shape for f in fancy]
    try:
        bshape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise IndexError("shape mismatch: indexing arrays could not be broadcast together "
                         "with shapes " + "".join(_shape_str(s) + " " for s in shapes)) from None
    bsize = _prod(bshape)
    cdef dict arrays = {}
    for f in fancy:
        d = f[1]
        if d < 0:
            continue
        a = f[2]
        if a.dtype != np.int64:
            a = a.astype(np.int64, casting="unsafe")
        if bsize and a.size:
            n = shp[d]
            lo = a.min()
            hi = a.max()
            if lo < -n or hi >= n:
                bad = a.reshape(-1)[np.flatnonzero((a < -n) | (a >= n))[0]]
                raise IndexError(f"index {bad} is out of bounds for axis {d} with size {n}")
            if lo < 0:
                a = np.where(a < 0, a + n, a)
        arrays[d] = a
    return bshape, arrays


cdef tuple _place_block(list items, list item_dim, list dims, tuple shp, tuple bshape):
    """Step 4: where numpy puts the broadcast block (see ADV_NONE_SEEN), and so the result's
    shape: ``(result shape, result axes before the block when it is not moved, moved)``."""
    cdef Py_ssize_t consec = 0, i, j
    status = ADV_NONE_SEEN
    nres = 0
    for it in items:
        kind = it[0]
        if kind == K_INT or kind == K_ARRAY or kind == K_MASK or kind == K_BOOL0:
            if status == ADV_NONE_SEEN:
                consec = nres
                status = ADV_IN_RUN
            elif status == ADV_RUN_ENDED:
                status = ADV_SPLIT
                consec = 0
        elif status == ADV_IN_RUN:
            status = ADV_RUN_ENDED
        if kind == K_SLICE or kind == K_NEWAXIS:
            nres += 1
        elif kind == K_ELLIPSIS:
            nres += it[1]
    pre = []
    post = []
    for i, it in enumerate(items):
        kind = it[0]
        if kind == K_SLICE:
            c = dims[item_dim[i]][2]
            (pre if len(pre) < consec else post).append(c)
        elif kind == K_NEWAXIS:
            (pre if len(pre) < consec else post).append(1)
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                (pre if len(pre) < consec else post).append(shp[item_dim[i] + j])
    return tuple(pre) + bshape + tuple(post), consec, status == ADV_SPLIT


cdef Selection _product_selection(tuple shp, list dims, list items, list item_dim, list local,
                                  dict arrays, tuple bshape, Py_ssize_t consec, bint moved,
                                  tuple result_shape):
    """Step 5: the product plan (per-dimension unique sets, positions within them), or the
    point plan when the product would read too much more than the result."""
    cdef Py_ssize_t i
    local_arrays = {}
    for d, a in arrays.items():
        dims[d], local_arrays[d] = _dim_plan(a)
    read_shape = tuple([_count(e) for e in dims])
    nontrivial = [d for d in arrays if _count(dims[d]) > 1]
    if (len(nontrivial) > 1
            and _prod(read_shape) > _SUPERSET_FACTOR * _prod(result_shape) + _SUPERSET_SLACK):
        return _point_selection(shp, dims, items, item_dim, local, arrays, bshape,
                                consec, moved, result_shape)
    lkey = []
    for i, it in enumerate(items):
        kind = it[0]
        if kind == K_ARRAY:
            lkey.append(local_arrays[item_dim[i]])
        elif kind == K_MASK:
            lkey.append(_submask(it[1], dims, item_dim[i]))
        elif not _implied(it):
            lkey.append(local[i])
    if _is_identity(items, item_dim, dims, local, local_arrays, nontrivial, bshape, moved):
        return Selection(shp, tuple(dims), read_shape, result_shape, None)
    return Selection(shp, tuple(dims), read_shape, result_shape, tuple(lkey))


cdef object _submask(object mask, list dims, Py_ssize_t d0):
    """The part of boolean ``mask`` (on dims ``d0``...) that lies in the box.

    Every True element is in the box, and restricting to sorted index sets keeps their C
    order, so the box indexed by this mask gives what the array indexed by ``mask`` gives,
    for a byte per box element instead of eight per True element and dimension.
    """
    sub = mask
    for j in range(mask.ndim):
        e = dims[d0 + j]
        if isinstance(e, tuple):
            sub = sub[(slice(None),) * j + (slice(e[0], e[0] + e[1] * e[2], e[1]),)]
        else:
            sub = np.take(sub, e, axis=j)
    return sub


cdef object _count(object entry):
    return entry[2] if isinstance(entry, tuple) else entry.shape[0]


cdef Selection _basic_selection(tuple shp, list dims, list items, list local):
    """Plan for keys without arrays: a single regular hyperslab per dimension."""
    result = []
    lkey = []
    reverse = False
    d = 0
    for i, it in enumerate(items):
        kind = it[0]
        if kind == K_SLICE:
            result.append(dims[d][2])
            reverse = reverse or local[i].step is not None
            d += 1
        elif kind == K_INT:
            d += 1
        elif kind == K_NEWAXIS:
            result.append(1)
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                result.append(shp[d + j])
            d += it[1]
        if not _implied(it):
            lkey.append(local[i])
    read_shape = tuple([e[2] for e in dims])
    result_shape = tuple(result)
    if not reverse or 0 in read_shape:
        return Selection(shp, tuple(dims), read_shape, result_shape, None)
    return Selection(shp, tuple(dims), read_shape, result_shape, tuple(lkey))


cdef bint _is_identity(list items, list item_dim, list dims, list local, dict local_arrays,
                       list nontrivial, tuple bshape, bint moved) except -1:
    """Whether the product plan's result is its box in the same order (so no gather)."""
    if len(nontrivial) > 1:
        return False
    for i, it in enumerate(items):
        if it[0] == K_SLICE and local[i].step is not None:
            return False
    if nontrivial:
        d = nontrivial[0]
        pos = local_arrays[d]
        n = _count(dims[d])
        if _prod(bshape) != n or pos.size != n:
            return False
        if not np.array_equal(pos.reshape(-1), np.arange(n)):
            return False
    elif _prod(bshape) != 1:
        return False
    # Dimensions of size > 1 must keep their order: the fancy block sits at the first
    # advanced item's dimension, or in front when the advanced items are not adjacent.
    order = []
    fancy_at = None
    if nontrivial:
        fancy_at = nontrivial[0]
        if moved:
            order.append(fancy_at)
    for i, it in enumerate(items):
        kind = it[0]
        d = item_dim[i]
        if kind == K_SLICE and dims[d][2] > 1:
            order.append(d)
        elif kind == K_ELLIPSIS:
            for j in range(it[1]):
                if dims[d + j][2] > 1:
                    order.append(d + j)
        elif fancy_at is not None and not moved and kind in (K_ARRAY, K_MASK) and (
                d <= fancy_at < d + (it[1].ndim if kind == K_MASK else 1)):
            order.append(fancy_at)
    return order == sorted(order)


cdef Selection _point_selection(tuple shp, list dims, list items, list item_dim, list local,
                                dict arrays, tuple bshape, Py_ssize_t consec, bint moved,
                                tuple result_shape):
    """Plan reading the unique points of the advanced dims times the other dims' hyperslabs.

    Integer items join the points (numpy treats them as advanced here, too). The box holds
    the points on one axis, placed where numpy puts the broadcast block, so the local key
    needs a single index array.
    """
    pdims = sorted(list(arrays) + [item_dim[i] for i, it in enumerate(items) if it[0] == K_INT])
    pshape = [shp[d] for d in pdims]
    coords = []
    for d in pdims:
        if d in arrays:
            coords.append(np.broadcast_to(arrays[d], bshape).reshape(-1))
        else:
            coords.append(np.full(_prod(bshape), dims[d][0], np.int64))
    try:
        codes = np.ravel_multi_index(coords, pshape)
    except ValueError:  # more cells than an int64 can number
        pts, inv = np.unique(np.stack(coords, axis=1), axis=0, return_inverse=True)
    else:
        ucodes, inv = np.unique(codes, return_inverse=True)
        pts = np.stack(np.unravel_index(ucodes, pshape), axis=1).astype(np.int64)
    inv = inv.reshape(bshape)
    for j, d in enumerate(pdims):
        dims[d] = np.unique(pts[:, j])
    other = [d for d in range(len(shp)) if d not in pdims]
    if moved:
        axis = 0
    else:
        axis = sum(1 for d in other if d < pdims[0])
    read_shape = [dims[d][2] for d in other]
    read_shape.insert(axis, pts.shape[0])
    lkey = []
    for i, it in enumerate(items):
        kind = it[0]
        d = item_dim[i]
        if kind == K_SLICE or kind == K_NEWAXIS:
            lkey.append(local[i])
        elif kind == K_ELLIPSIS:
            lkey.extend([slice(None)] * it[1])
        elif len(lkey) == (0 if moved else consec) and inv is not None:
            lkey.append(inv)
            inv = None
    if inv is not None:
        lkey.insert(0 if moved else len(lkey), inv)
    return Selection(shp, tuple(dims), tuple(read_shape), result_shape, tuple(lkey),
                     pts, tuple(pdims), axis)
