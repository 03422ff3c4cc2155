# cython: language_level=3, embedsignature=True
"""The owner of memory handed out as arrays (internal): a Reader's lent results (lending.py),
dask blocks from a pool (dask.py).

numpy points every view of an array at the nearest base that is not an array. A ``Lent`` is
that base: it exports the bytes of ``raw`` (a writable contiguous uint8 array) through the
buffer protocol, keeps ``raw`` alive while it lives, and calls ``on_last()`` when the last view
goes, so the memory can be used again. (A ``weakref.finalize`` on an owner array did the same at
several times the cost.)
"""

cimport numpy as cnp
from cpython.buffer cimport PyBUF_FORMAT
from cpython.ref cimport Py_INCREF

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    # steals a reference to descr
    object PyArray_NewFromDescr(type subtype, cnp.dtype descr, int nd, cnp.npy_intp *dims,
                                cnp.npy_intp *strides, void *data, int flags, object obj)

cdef char *_FORMAT = "B"


cdef class Lent:
    cdef object raw        # the bytes handed out (a stage's mapping, a pooled block)
    cdef object on_last
    cdef char *data
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __cinit__(self, object raw, object on_last):
        cdef unsigned char[::1] view
        if (cnp.PyArray_Check(raw) and cnp.PyArray_TYPE(raw) == cnp.NPY_UINT8
                and cnp.PyArray_NDIM(raw) == 1 and cnp.PyArray_ISCARRAY(raw)):
            # a stage's bytes, once a batch: a typed memoryview costs more than the rest
            self.data = <char *>cnp.PyArray_DATA(raw)
            self.shape[0] = cnp.PyArray_DIM(raw, 0)
        else:
            view = raw  # raises for anything but writable contiguous bytes
            self.data = <char *>&view[0] if view.shape[0] else NULL
            self.shape[0] = view.shape[0]
        self.raw = raw
        self.on_last = on_last
        self.strides[0] = 1

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        buffer.buf = self.data
        buffer.obj = self
        buffer.len = self.shape[0]
        buffer.readonly = 0
        buffer.itemsize = 1
        buffer.format = _FORMAT if flags & PyBUF_FORMAT else NULL
        buffer.ndim = 1
        buffer.shape = self.shape
        buffer.strides = self.strides
        buffer.suboffsets = NULL
        buffer.internal = NULL

    def __releasebuffer__(self, Py_buffer *buffer):
        pass

    def __dealloc__(self):
        on_last, self.on_last = self.on_last, None
        self.raw = None  # the mapping's export goes first: the memory may be closed next
        if on_last is not None:
            try:
                on_last()
            except Exception:
                pass  # at interpreter exit the modules it needs may be gone: the OS frees it



cdef object _array_over(object raw, Py_ssize_t at, cnp.dtype dtype, tuple shape, object base,
                        char **data):
    """An array of ``dtype`` and ``shape`` at byte ``at`` of ``raw`` (a writable C-contiguous
    uint8 array), its base ``base``; ``data`` gets the address. Raises ``ValueError`` for a
    ``raw`` that is not one or too small."""
    cdef cnp.npy_intp dims[32]
    cdef int i, ndim = len(shape)
    cdef Py_ssize_t nbytes = dtype.itemsize
    if ndim > 32:
        raise ValueError(f"{ndim} dimensions are more than 32")
    for i in range(ndim):
        dims[i] = shape[i]
        nbytes *= dims[i]
    if not (cnp.PyArray_Check(raw) and cnp.PyArray_TYPE(raw) == cnp.NPY_UINT8
            and cnp.PyArray_ISCARRAY(raw)) or at < 0 or cnp.PyArray_NBYTES(raw) < at + nbytes:
        raise ValueError(f"raw must be a writable C-contiguous uint8 array of {at + nbytes} "
                         "bytes or more")
    data[0] = <char *>cnp.PyArray_DATA(raw) + at
    Py_INCREF(dtype)  # PyArray_NewFromDescr steals a reference
    array = PyArray_NewFromDescr(cnp.ndarray, dtype, ndim, dims, NULL, data[0],
                                 cnp.NPY_ARRAY_CARRAY, None)
    Py_INCREF(base)  # PyArray_SetBaseObject steals a reference
    cnp.PyArray_SetBaseObject(array, base)
    return array


def view_array(object raw, Py_ssize_t at, cnp.dtype dtype, tuple shape):
    """``raw[at:].view(dtype)`` of ``shape`` (``raw``: a writable C-contiguous uint8 array), in
    one step instead of numpy's several calls: a request's result in its stage."""
    cdef char *data
    return _array_over(raw, at, dtype, shape, raw, &data)


def lent_array(object raw, object on_last, cnp.dtype dtype, tuple shape):
    """An array of ``dtype`` and ``shape`` over the first bytes of ``raw`` (a writable C-contiguous
    uint8 array), owned by a ``Lent`` that calls ``on_last()`` when its last view goes: what
    ``np.frombuffer(Lent(raw, on_last), dtype).reshape(shape)`` gives, in one step (a request's
    ``get()`` makes one per batch)."""
    cdef char *data
    cdef Lent owner = Lent.__new__(Lent, raw, on_last)
    return _array_over(raw, 0, dtype, shape, owner, &data)
