# cython: language_level=3, embedsignature=True
"""Row primitives of the worker-side reads (internal): runs of consecutive rows, for the
hyperslab unions HDF5 reads (``multitables._hdf5.hyperslab``), and rows gathered from a file image,
for the reads past HDF5 (``multitables._hdf5.rawread``).

Both are C loops because numpy takes 10 to 20 times as long on the small index sets of random
access (figures in bench/README.md, "Costs the read paths are built around").
"""

import numpy as np

cimport cython
from libc.stdint cimport int64_t
from libc.string cimport memcpy

cdef extern from "<unistd.h>" nogil:
    long sysconf(int name)
    int _SC_PAGESIZE

cdef extern from "<sys/mman.h>" nogil:
    int madvise(void *addr, size_t length, int advice)
    int MADV_WILLNEED

cdef enum:
    _MADV_POPULATE_READ = 22  # Linux 5.14; older kernels say EINVAL
    _POPULATE_STEP = 32 << 20  # bytes a call: a close() of the map waits at most one step


@cython.boundscheck(False)
@cython.wraparound(False)
def runs(const int64_t[::1] u):
    """Runs of consecutive values in sorted unique ``u``: ``(starts, lengths)`` int64 arrays.

    >>> runs(np.array([1, 2, 3, 7, 9, 10]))
    (array([1, 7, 9]), array([3, 1, 2]))
    """
    cdef Py_ssize_t n = u.shape[0], i, k = 0
    starts = np.empty(n, np.int64)
    lengths = np.empty(n, np.int64)
    cdef int64_t[::1] s = starts
    cdef int64_t[::1] ln = lengths
    if n == 0:
        return starts, lengths
    with nogil:
        s[0] = u[0]
        ln[0] = 1
        for i in range(1, n):
            if u[i] == u[i - 1] + 1:
                ln[k] += 1
            else:
                k += 1
                s[k] = u[i]
                ln[k] = 1
    return starts[:k + 1], lengths[:k + 1]


@cython.boundscheck(False)
@cython.wraparound(False)
def gather_rows(const unsigned char[::1] src, unsigned char[::1] dst, const int64_t[::1] rows,
                const int64_t[::1] chunk_offsets, int64_t chunk_rows, int64_t row_bytes):
    """Copy rows ``rows`` (any order, repeats allowed) of a file image ``src`` into ``dst``.

    Row ``r`` lies at ``chunk_offsets[r // chunk_rows] + (r % chunk_rows) * row_bytes``;
    consecutive rows of one chunk move in one memcpy. Raises (copying nothing) ``ValueError``
    when ``dst`` or ``src`` is too short, ``IndexError`` for a row outside the layout.
    """
    cdef Py_ssize_t n = rows.shape[0], i = 0, j
    cdef int64_t chunk, first, count, offset, need = 0
    if dst.shape[0] < n * row_bytes:
        raise ValueError(f"dst holds {dst.shape[0]} bytes, {n} rows need {n * row_bytes}")
    for i in range(n):
        if rows[i] < 0 or rows[i] // chunk_rows >= chunk_offsets.shape[0]:
            raise IndexError(f"row {rows[i]} is outside the layout")
        offset = chunk_offsets[rows[i] // chunk_rows] + (rows[i] % chunk_rows + 1) * row_bytes
        need = max(need, offset)
    if need > src.shape[0]:
        raise ValueError(f"src holds {src.shape[0]} bytes, the rows lie up to byte {need}")
    i = 0
    with nogil:
        while i < n:
            chunk = rows[i] // chunk_rows
            first = rows[i] % chunk_rows
            j = i + 1
            while (j < n and rows[j] == rows[j - 1] + 1 and rows[j] // chunk_rows == chunk):
                j += 1
            count = j - i
            memcpy(&dst[i * row_bytes], &src[chunk_offsets[chunk] + first * row_bytes],
                   count * row_bytes)
            i = j


def populate(const unsigned char[::1] image, Py_ssize_t start=0, Py_ssize_t stop=-1):
    """Map the pages of ``image[start:stop]`` (a file map, page-aligned at its start) into this
    process now, in calls of 32 MiB without the GIL: one system call maps thousands of pages,
    where first touches fault them in one at a time. Pages not in the page cache are read.
    Falls back to ``MADV_WILLNEED`` (read ahead, not mapped) where the kernel lacks
    ``MADV_POPULATE_READ``; returns whether the pages were mapped."""
    cdef Py_ssize_t n = image.shape[0], at, step
    cdef int r = 0
    cdef const unsigned char *base
    if stop < 0 or stop > n:
        stop = n
    start -= start % sysconf(_SC_PAGESIZE)
    if start >= stop:
        return True
    base = &image[0]
    with nogil:
        at = start
        while at < stop:
            step = min(<Py_ssize_t>_POPULATE_STEP, stop - at)
            r = madvise(<void *>(base + at), step, _MADV_POPULATE_READ)
            if r != 0:
                break
            at += step
        if r != 0:
            madvise(<void *>(base + at), stop - at, MADV_WILLNEED)
    return r == 0
