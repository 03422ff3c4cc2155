# cython: language_level=3, embedsignature=True
"""A read plan for ``dataset[key]``: what to read from the file and how to arrange it (internal).

``multitables._keys._indexing.translate`` makes a :class:`Selection`; a worker applies it
(``multitables._hdf5.hyperslab``). It crosses to the worker with every request, so it spells
itself out cheaply: as int64 words written straight into a stage's header (``put_plain``, read
back by ``take_plain``), and when pickled, with index arrays as their bytes.
"""

import operator

import numpy as np

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int64_t
from libc.string cimport memcmp, memcpy, memset

cnp.import_array()


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

    # The attributes are declared (``cdef readonly``) in _selection.pxd, where the modules that
    # cimport the type read them.

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

    def put_plain(self, object dest, Py_ssize_t offset, Py_ssize_t room, bytes head, tuple shape,
                  Py_ssize_t at):
        """Write a request for this plan at byte ``offset`` of ``dest`` (a writable C-contiguous
        uint8 array: a stage's header): its length (8 bytes), then the ``plain_request`` of
        ``head``, ``at`` and ``shape``, in at most ``room`` bytes in all. False, writing nothing,
        when it does not fit or the plan has no plain spelling (see ``plain_request``)."""
        cdef Py_ssize_t size = _plain_size(self, head, shape)
        cdef char *p
        if size < 0 or 8 + size > room or not (
                cnp.PyArray_Check(dest) and cnp.PyArray_TYPE(dest) == cnp.NPY_UINT8
                and cnp.PyArray_ISCARRAY(dest)) or offset < 0 or (
                offset + 8 + size > cnp.PyArray_NBYTES(dest)):
            return False
        p = <char *>cnp.PyArray_DATA(dest) + offset
        _put(p, size)
        _write_plain(p + 8, size, self, head, shape, at)
        return True

    def plain_request(self, bytes head, tuple shape, Py_ssize_t at):
        """A request for this plan as bytes that ``read_plain`` reads back, with ``head`` (bytes
        the caller gives meaning to), ``at`` and ``shape`` beside it; None when the plan has
        points or index arrays other than 1-D int64 sets and one 1-D order (it is pickled
        then). Spelled out as int64 words, written and read in C loops, because a request's
        plan crosses to a worker with every request: marshal and its tuples took 2 us a side."""
        cdef Py_ssize_t size = _plain_size(self, head, shape)
        if size < 0:
            return None
        data = PyBytes_FromStringAndSize(NULL, size)
        _write_plain(PyBytes_AS_STRING(data), size, self, head, shape, at)
        return data


# The first word of a plan written by _write_plain: this byte, then seven zero bytes. It tells a
# plain request from a pickled one (b"\x80") in a request's bytes.
PLAIN_TAG = b"P"
cdef const char *_TAG = b"P\0\0\0\0\0\0\0"
cdef int64_t _RANGE = -1  # a dims entry (start, step, count) follows; else the count of an array's


cdef bint _is_1d(object a, int typenum):
    return (cnp.PyArray_CheckExact(a) and cnp.PyArray_NDIM(a) == 1
            and cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_ISCARRAY_RO(a))


cdef object _order_of(Selection sel):
    """The one 1-D order of a plan's local key (None for none); False when it has another."""
    lkey = sel.local_key
    if lkey is None:
        return None
    if type(lkey) is not tuple or len(<tuple>lkey) != 1 or not _is_1d((<tuple>lkey)[0],
                                                                      cnp.NPY_INTP):
        return False
    return (<tuple>lkey)[0]


cdef Py_ssize_t _plain_size(Selection sel, bytes head, tuple shape) except -2:
    """Bytes of the plain spelling of a request for ``sel``, or -1 when it has none."""
    cdef Py_ssize_t words
    if sel.points is not None or sizeof(Py_ssize_t) != 8:
        return -1
    order = _order_of(sel)
    if order is False:
        return -1
    # the tag, head's length and words, at, the count of dims entries, four tuples and the
    # order behind their lengths, then the entries
    words = 4 + (len(head) + 7) // 8 + 4 + len(shape) + len(sel.shape) + len(sel.read_shape)
    words += len(sel.result_shape) + 1 + (0 if order is None else cnp.PyArray_DIM(order, 0))
    for e in sel.dims:
        if type(e) is tuple and len(<tuple>e) == 3:
            words += 4
        elif _is_1d(e, cnp.NPY_INT64):
            words += 1 + cnp.PyArray_DIM(e, 0)
        else:
            return -1
    return 8 * words


cdef inline char *_put(char *p, int64_t v) noexcept nogil:
    memcpy(p, &v, 8)
    return p + 8


cdef char *_put_tuple(char *p, tuple t) except NULL:
    p = _put(p, len(t))
    for x in t:
        p = _put(p, x)
    return p


cdef char *_put_array(char *p, object a) except NULL:
    """A 1-D array of 8-byte items behind its length."""
    cdef Py_ssize_t n = cnp.PyArray_DIM(a, 0)
    p = _put(p, n)
    memcpy(p, cnp.PyArray_DATA(a), 8 * n)
    return p + 8 * n


cdef int _write_plain(char *p, Py_ssize_t size, Selection sel, bytes head, tuple shape,
                      Py_ssize_t at) except -1:
    """Write the ``size`` bytes that _plain_size counted (which checked that ``sel`` has them)."""
    cdef Py_ssize_t n = len(head)
    cdef char *start = p
    memcpy(p, _TAG, 8)
    p = _put(p + 8, n)
    if n % 8:
        memset(p + n - n % 8, 0, 8)  # the last word's padding: the bytes are the same every time
    memcpy(p, PyBytes_AS_STRING(head), n)
    p += 8 * ((n + 7) // 8)
    p = _put(p, at)
    p = _put_tuple(p, shape)
    p = _put_tuple(p, sel.shape)
    p = _put(p, len(sel.dims))
    for e in sel.dims:
        if type(e) is tuple:
            p = _put(p, _RANGE)
            p = _put(p, (<tuple>e)[0])
            p = _put(p, (<tuple>e)[1])
            p = _put(p, (<tuple>e)[2])
        else:
            p = _put_array(p, e)
    p = _put_tuple(p, sel.read_shape)
    p = _put_tuple(p, sel.result_shape)
    order = _order_of(sel)
    p = _put(p, _RANGE) if order is None else _put_array(p, order)
    if p - start != size:  # the two must agree: a request's room was checked against size
        raise AssertionError(f"a plain request took {p - start} bytes, not {size}")
    return 0


ctypedef struct _Words:
    # a cursor over the int64 words of a plain request, checked against its end
    const char *p
    const char *end


cdef int64_t _take(_Words *w) except? -3:
    cdef int64_t v
    if w.end - w.p < 8:
        raise ValueError("a plain request ends early")
    memcpy(&v, w.p, 8)
    w.p += 8
    return v


cdef tuple _take_tuple(_Words *w):
    cdef Py_ssize_t i, n = _take(w)
    cdef object x
    if n < 0 or (w.end - w.p) // 8 < n:
        raise ValueError("a plain request ends early")
    t = PyTuple_New(n)
    for i in range(n):
        x = _take(w)
        Py_INCREF(x)  # PyTuple_SET_ITEM steals a reference
        PyTuple_SET_ITEM(t, i, x)
    return t


cdef object _take_array(_Words *w, Py_ssize_t n, int typenum):
    cdef cnp.npy_intp dim = n
    if n < 0 or (w.end - w.p) // 8 < n:
        raise ValueError("a plain request ends early")
    a = cnp.PyArray_EMPTY(1, &dim, typenum, 0)
    memcpy(cnp.PyArray_DATA(a), w.p, 8 * n)
    w.p += 8 * n
    return a


cdef tuple _read_plain(const char *p, Py_ssize_t size):
    cdef _Words w
    cdef Py_ssize_t i, n
    cdef int64_t kind, start, step, count
    cdef object entry
    cdef Selection sel = Selection.__new__(Selection)
    if size < 8 or memcmp(p, _TAG, 8):
        raise ValueError("not a plain request")
    w.p = p + 8
    w.end = p + size
    n = _take(&w)
    if n < 0 or (w.end - w.p) // 8 < (n + 7) // 8:
        raise ValueError("a plain request ends early")
    head = PyBytes_FromStringAndSize(w.p, n)
    w.p += 8 * ((n + 7) // 8)
    at = _take(&w)
    shape = _take_tuple(&w)
    sel.shape = _take_tuple(&w)
    n = _take(&w)
    if n < 0 or (w.end - w.p) // 8 < n:
        raise ValueError("a plain request ends early")
    dims = PyTuple_New(n)
    for i in range(n):
        kind = _take(&w)
        if kind == _RANGE:
            start = _take(&w)
            step = _take(&w)
            count = _take(&w)
            entry = (start, step, count)
        else:
            entry = _take_array(&w, kind, cnp.NPY_INT64)
        Py_INCREF(entry)
        PyTuple_SET_ITEM(dims, i, entry)
    sel.dims = dims
    sel.read_shape = _take_tuple(&w)
    sel.result_shape = _take_tuple(&w)
    kind = _take(&w)
    sel.local_key = None if kind == _RANGE else (_take_array(&w, kind, cnp.NPY_INTP),)
    sel.points = None
    sel.point_dims = ()
    sel.point_axis = -1
    return head, at, shape, sel


def read_plain(const unsigned char[::1] data):
    """``(head, at, shape, Selection)`` from the bytes ``Selection.plain_request`` made."""
    return _read_plain(<const char *>&data[0] if data.shape[0] else NULL, data.shape[0])


def take_plain(object header, Py_ssize_t offset, Py_ssize_t room):
    """``read_plain`` of the request that ``Selection.put_plain`` wrote at byte ``offset`` of
    ``header`` in at most ``room`` bytes; None when the request there has other bytes (a
    pickle's)."""
    cdef const char *p
    cdef int64_t size
    if not (cnp.PyArray_Check(header) and cnp.PyArray_TYPE(header) == cnp.NPY_UINT8
            and cnp.PyArray_ISCARRAY_RO(header)) or offset < 0 or room < 8 or (
            offset + room > cnp.PyArray_NBYTES(header)):
        raise ValueError(f"no request area of {room} bytes at {offset} in the header")
    p = <const char *>cnp.PyArray_DATA(header) + offset
    memcpy(&size, p, 8)
    if size < 0 or size > room - 8:
        raise ValueError(f"a request of {size} bytes in an area of {room}")
    if size < 8 or memcmp(p + 8, _TAG, 8):
        return None
    return _read_plain(p + 8, size)


_PACKED = "multitables._keys._selection.array"


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
    """Product of the ints in ``t`` (a Python int: no overflow)."""
    cdef object n = 1
    for x in t:
        n *= x
    return n


cdef object _count(object entry):
    """Number of indices in a ``Selection.dims`` entry."""
    return entry[2] if isinstance(entry, tuple) else entry.shape[0]
