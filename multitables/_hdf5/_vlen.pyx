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
from libc.string cimport memcpy, memset

cdef extern from *:
    void prefetch "__builtin_prefetch" (const void *address) noexcept nogil

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


cdef inline bint _inside(int64_t offset, int64_t size, int64_t limit) noexcept nogil:
    """Whether ``offset:offset + size`` lies in ``0:limit`` (the sum is never formed: no
    overflow lets a span far past the end pass)."""
    return 0 <= offset <= limit and 0 <= size <= limit - offset


def _outside(offset, size, unit, limit):
    """The message for a span outside an image (Python's integers: no overflow)."""
    return (f"span {offset * unit}:{(offset + size) * unit} is outside the image of {limit} "
            "bytes")


cdef void _copy_spans(const unsigned char *image, const int64_t *offsets,
                      const int64_t *sizes, Py_ssize_t n, unsigned char *out) noexcept nogil:
    """Copy ``image[offsets[i]:offsets[i] + sizes[i]]`` for each i, one after another, to
    ``out``, loading a few spans ahead: scattered spans are cache misses."""
    cdef Py_ssize_t i
    for i in range(n):
        if i + 4 < n and sizes[i + 4]:
            prefetch(image + offsets[i + 4])
        if sizes[i]:
            memcpy(out, image + offsets[i], sizes[i])
            out += sizes[i]


@cython.boundscheck(False)
@cython.wraparound(False)
def gather(const unsigned char[::1] image, const int64_t[::1] offsets,
           const int64_t[::1] sizes, unsigned char[::1] out):
    """Copy ``image[offsets[i]:offsets[i] + sizes[i]]`` for each i, one after another, into
    ``out``. Raises (copying nothing) ``ValueError`` for a span outside ``image`` or an ``out``
    of another length than their total."""
    cdef Py_ssize_t n = offsets.shape[0], i
    cdef int64_t total = 0
    for i in range(n):
        if not _inside(offsets[i], sizes[i], image.shape[0]):
            raise ValueError(_outside(offsets[i], sizes[i], 1, image.shape[0]))
        total += sizes[i]
    if total != out.shape[0]:
        raise ValueError(f"out holds {out.shape[0]} bytes, the spans {total}")
    if total:
        with nogil:
            _copy_spans(&image[0], &offsets[0], &sizes[0], n, &out[0])


# What ``locate`` found at the row it stopped at (``OK``: every row located).
OK, PAST, UNKNOWN, NO_OBJECT, WRONG_SIZE, RANGE = range(6)


@cython.boundscheck(False)
@cython.wraparound(False)
def locate(const unsigned char[::1] image, const int64_t[::1] rows, int64_t n_rows,
           int64_t chunk_rows,
           const int64_t[::1] chunk_offsets, dict where, const int64_t[::1] table_offsets,
           const int64_t[::1] table_sizes, int64_t itemsize, int64_t[::1] offsets,
           int64_t[::1] sizes):
    """The file offset and size of each row's heap object, into ``offsets`` and ``sizes``: row
    r's 16-byte reference lies at ``chunk_offsets[r // chunk_rows] + r % chunk_rows * 16`` of
    ``image``; ``where`` maps a collection's address to ``first << 17 | count``, its objects
    being entries ``first + index`` of the tables. A null reference is an empty object.

    Returns ``(OK, n)``, or ``(what, i)`` at the first row i that stops it: its reference lies
    ``PAST`` the image, or names a collection not in ``where`` (``UNKNOWN``), an object the
    collection does not hold (``NO_OBJECT``) or one of another size than the row's length in
    elements of ``itemsize`` bytes (``WRONG_SIZE``), or the row is not in ``range(n_rows)``
    (``RANGE``)."""
    cdef Py_ssize_t n = rows.shape[0], i
    cdef int64_t row, at, w, slot, size, limit = image.shape[0]
    cdef uint64_t length, address, index
    cdef const unsigned char *p
    cdef object found
    # Three passes, each loading what the next needs for every row first, so that the cache
    # misses of scattered rows overlap rather than follow one another: the references, then
    # the entries of the tables they name, then (for the caller's copy) the objects.
    for i in range(n):
        row = rows[i]
        if not 0 <= row < n_rows:
            return RANGE, i
        at = chunk_offsets[row // chunk_rows] + row % chunk_rows * _HEAD
        if 0 <= at and at + _HEAD <= limit:
            prefetch(&image[at])
    for i in range(n):  # offsets and sizes hold each row's entry and length meanwhile
        row = rows[i]
        at = chunk_offsets[row // chunk_rows] + row % chunk_rows * _HEAD
        if at < 0 or at + _HEAD > limit:
            return PAST, i
        p = &image[at]
        length, address, index = _le(p, 4), _le(p + 4, 8), _le(p + 12, 4)
        if address == 0:  # never written: read as empty (H5T vlen isnull)
            offsets[i] = -1
            continue
        found = where.get(address)
        if found is None:
            return UNKNOWN, i
        w = found
        if index >= <uint64_t>(w & ((1 << 17) - 1)):
            return NO_OBJECT, i
        slot = (w >> 17) + <int64_t>index
        offsets[i] = slot
        sizes[i] = <int64_t>length * itemsize
        prefetch(&table_offsets[slot])
        prefetch(&table_sizes[slot])
    for i in range(n):
        slot = offsets[i]
        if slot < 0:
            offsets[i] = sizes[i] = 0
            continue
        if table_offsets[slot] < 0:
            return NO_OBJECT, i
        size = table_sizes[slot]
        if sizes[i] != size:
            return WRONG_SIZE, i
        offsets[i] = table_offsets[slot]
        if size:
            prefetch(&image[offsets[i]])  # for the copy that follows
    return OK, n


@cython.boundscheck(False)
@cython.wraparound(False)
def gather_rows(const unsigned char[::1] image, const int64_t[::1] offsets,
                const int64_t[::1] sizes, const int64_t[::1] dest, unsigned char[:, ::1] out,
                const unsigned char[::1] fill, int64_t unit=1):
    """Copy ``image[offsets[i]:offsets[i] + sizes[i]]`` to the start of row ``dest[i]`` of
    ``out`` (row i when ``dest`` is None) for each i, cut to the row's width, and fill the rest
    of the row with ``fill`` repeated (one element's bytes). Offsets and sizes count ``unit``
    bytes. Raises (copying nothing) ``ValueError`` for a span outside ``image``, a row outside
    ``out`` or a width that is not whole elements."""
    cdef Py_ssize_t n = offsets.shape[0], i, k, width = out.shape[1], step = fill.shape[0]
    cdef int64_t size, limit = image.shape[0], rows = out.shape[0]
    cdef bint same = True, direct = dest is None
    cdef unsigned char *row
    if step == 0 or width % step:
        raise ValueError(f"rows of {width} bytes are not whole elements of {step} bytes")
    if unit < 1:
        raise ValueError(f"offsets and sizes count units of {unit} bytes")
    if (not direct and dest.shape[0] != n) or sizes.shape[0] != n or (direct and n > rows):
        raise ValueError(f"{n} offsets, {sizes.shape[0]} sizes, "
                         f"{n if direct else dest.shape[0]} rows for {rows}")
    for i in range(n):
        if not _inside(offsets[i], sizes[i], limit // unit):
            raise ValueError(_outside(offsets[i], sizes[i], unit, limit))
        if not direct and not 0 <= dest[i] < rows:
            raise ValueError(f"row {dest[i]} is outside the {rows} rows")
    if width == 0:
        return
    for k in range(1, step):
        same = same and fill[k] == fill[0]
    with nogil:
        for i in range(n):
            if i + 4 < n and sizes[i + 4]:
                prefetch(&image[offsets[i + 4] * unit])
            row = &out[i if direct else dest[i], 0]
            size = min(sizes[i] * unit, width)
            if size:
                memcpy(row, &image[offsets[i] * unit], size)
            if same:
                memset(row + size, fill[0], width - size)
            else:
                k = size
                while k < width:
                    memcpy(row + k, &fill[0], step)
                    k += step


@cython.boundscheck(False)
@cython.wraparound(False)
def recall(const int64_t[:, ::1] known, const int64_t[::1] rows, int64_t[::1] offsets,
           int64_t[::1] sizes):
    """The offsets and sizes of rows ``rows`` located before: ``known[r, 0] - 1`` and
    ``known[r, 1]`` for row r (counted from the end when negative). Returns the number of rows
    not found (never located: ``known[r, 0] == 0``, or out of range), whose offsets are -1."""
    cdef Py_ssize_t n = rows.shape[0], i, missing = 0
    cdef int64_t row, n_rows = known.shape[0]
    if offsets.shape[0] != n or sizes.shape[0] != n or known.shape[1] != 2:
        raise ValueError("rows, offsets and sizes differ in length, or known is not (rows, 2)")
    with nogil:
        for i in range(n):
            row = rows[i]
            if row < 0:
                row += n_rows
            if 0 <= row < n_rows and known[row, 0] > 0:
                offsets[i] = known[row, 0] - 1
                sizes[i] = known[row, 1]
            else:
                offsets[i] = -1
                missing += 1
    return missing


@cython.boundscheck(False)
@cython.wraparound(False)
def pack(const unsigned char[::1] image, const int64_t[::1] offsets, const int64_t[::1] sizes,
         const int64_t[::1] dest, unsigned char[::1] values, int64_t at,
         int64_t[::1] starts, int64_t[::1] lengths, int64_t unit):
    """Copy ``image[offsets[i]:offsets[i] + sizes[i]]`` (bytes) for each i, one after another,
    into ``values`` from byte ``at``, noting where each goes and its length, in elements of
    ``unit`` bytes, at ``starts[j]`` and ``lengths[j]``, j being ``dest[i]`` (i itself when
    ``dest`` is None). Returns where the copies end and the longest length; copies nothing
    (notes all the same) when they would pass the end of ``values``. Raises (noting nothing)
    ``ValueError`` for a span outside ``image`` or not whole elements, or a ``dest`` outside
    the places."""
    cdef Py_ssize_t n = offsets.shape[0], i
    cdef int64_t first = at, limit = image.shape[0], places = starts.shape[0], j, longest = 0
    cdef bint direct = dest is None
    if (sizes.shape[0] != n or (not direct and dest.shape[0] != n) or lengths.shape[0] != places
            or (direct and places < n) or at < 0 or unit < 1 or at % unit):
        raise ValueError(f"{n} offsets and {sizes.shape[0]} sizes for {places} places from {at}")
    for i in range(n):
        if not _inside(offsets[i], sizes[i], limit):
            raise ValueError(_outside(offsets[i], sizes[i], 1, limit))
        if sizes[i] % unit:
            raise ValueError(f"a span of {sizes[i]} bytes is not whole elements of {unit}")
        if not direct and not 0 <= dest[i] < places:
            raise ValueError(f"row {dest[i]} is outside the {places} places")
    with nogil:
        for i in range(n):
            j = i if direct else dest[i]
            starts[j] = at // unit
            lengths[j] = sizes[i] // unit
            longest = max(longest, lengths[j])
            at += sizes[i]
        if at > first and at <= values.shape[0]:
            _copy_spans(&image[0], &offsets[0], &sizes[0], n, &values[0] + first)
    return at, longest
