# cython: language_level=3
"""What other Cython modules cimport from _selection.pyx (see there)."""


cdef class Selection:
    cdef readonly tuple shape
    cdef readonly tuple dims
    cdef readonly tuple read_shape
    cdef readonly tuple result_shape
    cdef readonly object local_key
    cdef readonly object points
    cdef readonly tuple point_dims
    cdef readonly Py_ssize_t point_axis


# Both report errors as functions returning Python objects do (NULL, checked by the caller).
cdef object _prod(tuple t)
cdef object _count(object entry)
