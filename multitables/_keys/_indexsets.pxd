# cython: language_level=3
"""What other Cython modules cimport from _indexsets.pyx (see there)."""

cimport numpy as cnp
from libc.stdint cimport int64_t


# The C loops take the address of int64 arrays made contiguous by their caller: taking a typed
# memoryview costs a measurable share of a small plan, which takes several. Defined here so
# that every module inlines it.
cdef inline const int64_t *_int64_data(object contiguous) noexcept:
    return <const int64_t *>cnp.PyArray_DATA(contiguous)


# Pure C loops: cannot fail.
cdef int64_t _progression_step(const int64_t *a, Py_ssize_t n) noexcept nogil
cdef bint _strictly_increasing(const int64_t *a, Py_ssize_t n) noexcept nogil

# Python objects: errors reported as NULL, checked by the caller.
cdef tuple _dim_plan(object a)
cdef tuple _unique_positions(object flat)
cdef object _int_list(list key)
