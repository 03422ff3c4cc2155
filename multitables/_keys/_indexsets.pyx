# cython: language_level=3, embedsignature=True
"""Index arrays turned into a dimension's sorted unique index set, in C loops (internal).

A batch of row numbers is the commonest key by far; these loops plan it in a few microseconds
where numpy's ``unique`` alone costs tens. Declared in ``_indexsets.pxd`` with how each reports
errors, for ``_indexing`` and ``_plan`` to cimport.
"""

import numpy as np

cimport cython
cimport numpy as cnp
from cpython.long cimport PyLong_AsLongLongAndOverflow
from libc.stdint cimport int64_t, uint64_t

cnp.import_array()

# Index arrays up to this long are sorted as values and positions packed into one word (see
# _unique_positions): a position takes _POSITION_BITS, a value the rest.
cdef enum:
    _SMALL_SORT = 128
    _POSITION_BITS = 7
    _POSITION_MASK = 127


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
    cdef Py_ssize_t i, k = -1, n = flat.shape[0]
    cdef int64_t v
    cdef cnp.npy_intp dim = n
    unique_array = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INT64, 0)
    pos_array = cnp.PyArray_EMPTY(1, &dim, cnp.NPY_INTP, 0)
    cdef int64_t *unique = <int64_t *>cnp.PyArray_DATA(unique_array)
    cdef Py_ssize_t *pos = <Py_ssize_t *>cnp.PyArray_DATA(pos_array)
    cdef const Py_ssize_t *order
    cdef uint64_t key
    if n <= _SMALL_SORT and _pack_keys(values, n, <uint64_t *>unique):
        # A batch's rows: each value and its position in one word, sorted as plain integers by
        # numpy's vectorised sort in place (a comparison sort of random rows mispredicts a
        # branch per step: twice the time), then split again.
        cnp.PyArray_Sort(unique_array, 0, cnp.NPY_QUICKSORT)
        for i in range(n):
            key = (<uint64_t *>unique)[i]
            v = <int64_t>(key >> _POSITION_BITS)
            if k < 0 or v != unique[k]:
                k += 1
            unique[k] = v  # k <= i: the keys still to read lie past it
            pos[key & _POSITION_MASK] = k
    else:
        sorted_positions = flat.argsort().astype(np.intp, copy=False)
        order = <Py_ssize_t *>cnp.PyArray_DATA(sorted_positions)
        for i in range(n):
            v = values[order[i]]
            if k < 0 or v != unique[k]:
                k += 1
                unique[k] = v
            pos[order[i]] = k
    if k + 1 == n:  # no repeats (a batch's rows): the slice is a Python call
        return unique_array, pos_array
    return unique_array[:k + 1], pos_array


cdef bint _pack_keys(const int64_t *values, Py_ssize_t n, uint64_t *keys) noexcept nogil:
    """``keys[i] = values[i] << _POSITION_BITS | i``: sorted, they give the values in order and
    where each came from (equal values by position). False, leaving ``keys`` half written, for a
    value that does not fit in the bits left (n <= _SMALL_SORT): the keys are sorted as int64,
    so the sign bit stays clear."""
    cdef Py_ssize_t i
    for i in range(n):
        if <uint64_t>values[i] >> (63 - _POSITION_BITS):
            return False
        keys[i] = (<uint64_t>values[i] << _POSITION_BITS) | <uint64_t>i
    return True


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

