# cython: language_level=3, embedsignature=True
"""A read plan for ``dataset[key]``: what to read from the file and how to arrange it (internal).

``multitables._keys._indexing.translate`` makes a :class:`Selection`; a worker applies it
(``multitables._hdf5.hyperslab``). It crosses to the worker with every request, so it spells
itself out cheaply: ``plain()`` for ``marshal``, and index arrays pickled as their bytes.
"""

import operator

import numpy as np


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
