# cython: language_level=3, embedsignature=True
"""A numpy key split into classified items, checked as numpy's prepare_index checks it
(internal).

``_parse`` is the first phase of the general translation (``_indexing._translate``); the item
kinds and the layout of an item are declared in ``_keyitems.pxd``.
"""

import operator

import numpy as np

# numpy's own messages (numpy/_core/src/multiarray/mapping.c).
_INVALID = ("only integers, slices (`:`), ellipsis (`...`), numpy.newaxis (`None`) and "
            "integer or boolean arrays are valid indices")
_NOT_INT_ARRAY = "arrays used as indices must be of integer (or boolean) type"
_INTP_MIN = -(1 << 63)
_INTP_MAX = (1 << 63) - 1


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
