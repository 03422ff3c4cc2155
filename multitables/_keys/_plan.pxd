# cython: language_level=3
"""What _indexing cimports from _plan.pyx (see there): the steps of the general translation."""

from multitables._keys._selection cimport Selection

# Those returning Python objects report errors as NULL, checked by the caller; those returning
# C values say ``except -1``.
cdef int _check_result_rank(list items, tuple shp) except -1
cdef bint _plan_basic_items(list items, tuple shp, list dims, list local, list fancy,
                            list item_dim) except -1
cdef Selection _basic_selection(tuple shp, list dims, list items, list local)
cdef tuple _broadcast_index_arrays(list fancy, tuple shp)
cdef tuple _place_block(list items, list item_dim, list dims, tuple shp, tuple bshape)
cdef Selection _product_selection(tuple shp, list dims, list items, list item_dim, list local,
                                  dict arrays, tuple bshape, Py_ssize_t consec, bint moved,
                                  tuple result_shape, object factor, object slack)
