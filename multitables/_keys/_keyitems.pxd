# cython: language_level=3
"""What other Cython modules cimport from _keyitems.pyx (see there)."""

# Item kinds after parsing a key. A parsed item is ``[kind, value]``; an ellipsis item is
# ``[K_ELLIPSIS, dims it covers, implied]``, ``implied`` true for the one that ``_parse`` adds
# for the dimensions a key leaves out (it has no place in local keys).
cdef enum:
    K_INT, K_SLICE, K_ELLIPSIS, K_NEWAXIS, K_BOOL0, K_ARRAY, K_MASK


cdef inline bint _implied(list it) except -1:
    """Whether parsed item ``it`` is the ellipsis ``_parse`` adds for dimensions left out."""
    return it[0] == K_ELLIPSIS and it[2]


# Raises numpy's IndexError for a key numpy refuses (NULL, checked by the caller).
cdef list _parse(object key, Py_ssize_t ndim)
