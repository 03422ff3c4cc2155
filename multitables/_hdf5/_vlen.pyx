# cython: language_level=3, embedsignature=True
"""Global heap primitives of the variable-length reads past HDF5 (internal, for
``multitables._hdf5.vlenread``): the objects of heap collections walked, and objects' bytes
copied out of a file image.

C loops because a collection holds tens of objects that can only be walked one after another
(each header gives the next one's place): numpy steps cost microseconds each, a C step
nanoseconds (bench/bench_vlen.py: a first read of 256 rows, each in a collection not yet seen).
"""

import numpy as np

cimport cython
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy

cdef enum:
    _HEAD = 16  # bytes of a collection's header and of an object's, with 8-byte lengths


cdef inline uint64_t _le(const unsigned char *p, int n) noexcept nogil:
    """The ``n``-byte little-endian unsigned integer at ``p``."""
    cdef uint64_t v = 0
    cdef int i
    for i in range(n - 1, -1, -1):
        v = (v << 8) | p[i]
    return v


@cython.boundscheck(False)
@cython.wraparound(False)
cdef Py_ssize_t _walk(const unsigned char *image, const int64_t[::1] at, const int64_t[::1] end,
                      int64_t[::1] pos, int64_t[::1] live, int64_t *out,
                      int64_t *bad) noexcept nogil:
    """Walk the collections ``image[at[k]:end[k]]`` as HDF5's H5HG__cache_heap_deserialize
    walks one; with ``out``, write each object of index > 0 there as four int64 (collection k,
    index, data offset, size). Returns the number of objects, or -1 with ``bad`` set to the
    collection and offset of a header that overruns its collection (or makes no progress).

    Each header says where the next one is, so one collection's walk is a chain of dependent
    loads, each a cache miss (objects are a row's size apart): the collections are walked side
    by side, one object of each a step, so that the misses of different collections overlap.
    ``pos`` and ``live`` (as long as ``at``) are scratch space."""
    cdef Py_ssize_t n = at.shape[0], m = n, i, j, k, count = 0
    cdef int64_t p, e, need
    cdef uint64_t index, size
    for k in range(n):
        pos[k] = at[k] + _HEAD
        live[k] = k
    while m:
        j = 0
        for i in range(m):
            k = live[i]
            p = pos[k]
            e = end[k]
            if p + _HEAD > e:  # a shorter tail is free space
                continue
            index = _le(image + p, 2)
            size = _le(image + p + 8, 8)
            if size > <uint64_t>(e - p):
                bad[0], bad[1] = k, p
                return -1
            need = <int64_t>size  # index 0 is free space, its size its whole extent
            if index > 0:
                need = _HEAD + (need + 7) // 8 * 8
                if out != NULL:
                    out[4 * count] = k
                    out[4 * count + 1] = <int64_t>index
                    out[4 * count + 2] = p + _HEAD
                    out[4 * count + 3] = <int64_t>size
                count += 1
            if need <= 0 or need > e - p:
                bad[0], bad[1] = k, p
                return -1
            pos[k] = p + need
            if p + need < e:
                live[j] = k
                j += 1
        m = j
    return count


def walk(const unsigned char[::1] image, const int64_t[::1] at, const int64_t[::1] end):
    """The objects of the collections at ``at`` (ending at ``end``) of a file image: an int64
    array of rows (collection k, index, data offset, size), and None; or None and ``(k,
    offset)`` of a damaged object header. Raises ``ValueError`` for a collection outside the
    image or shorter than its header."""
    cdef int64_t bad[2]
    cdef Py_ssize_t n = at.shape[0], i, count
    for i in range(n):
        if not (0 <= at[i] and at[i] + _HEAD <= end[i] <= image.shape[0]):
            raise ValueError(f"collection {i} ({at[i]}:{end[i]}) is outside the image")
    if n == 0:
        return np.empty((0, 4), np.int64), None
    cdef int64_t[::1] pos = np.empty(n, np.int64)
    cdef int64_t[::1] live = np.empty(n, np.int64)
    with nogil:
        count = _walk(&image[0], at, end, pos, live, NULL, bad)
    if count < 0:
        return None, (bad[0], bad[1])
    found = np.empty((count, 4), np.int64)
    cdef int64_t[:, ::1] out = found
    if count:
        with nogil:
            _walk(&image[0], at, end, pos, live, &out[0, 0], bad)
    return found, None


@cython.boundscheck(False)
@cython.wraparound(False)
def gather(const unsigned char[::1] image, const int64_t[::1] offsets,
           const int64_t[::1] sizes, unsigned char[::1] out):
    """Copy ``image[offsets[i]:offsets[i] + sizes[i]]`` for each i, one after another, into
    ``out``. Raises (copying nothing) ``ValueError`` for a span outside ``image`` or an ``out``
    of another length than their total."""
    cdef Py_ssize_t n = offsets.shape[0], i
    cdef int64_t total = 0, at = 0
    for i in range(n):
        if offsets[i] < 0 or sizes[i] < 0 or offsets[i] + sizes[i] > image.shape[0]:
            raise ValueError(f"span {offsets[i]}:{offsets[i] + sizes[i]} is outside the image "
                             f"of {image.shape[0]} bytes")
        total += sizes[i]
    if total != out.shape[0]:
        raise ValueError(f"out holds {out.shape[0]} bytes, the spans {total}")
    with nogil:
        for i in range(n):
            if sizes[i]:
                memcpy(&out[at], &image[offsets[i]], sizes[i])
                at += sizes[i]
