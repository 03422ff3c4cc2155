# cython: language_level=3, embedsignature=True
"""The owner of memory handed out as arrays (internal): a Reader's lent results (lending.py),
dask blocks from a pool (dask.py).

numpy points every view of an array at the nearest base that is not an array. A ``Lent`` is
that base: it exports the bytes of ``raw`` (a writable contiguous uint8 array) through the
buffer protocol, keeps ``raw`` alive while it lives, and calls ``on_last()`` when the last view
goes, so the memory can be used again. (A ``weakref.finalize`` on an owner array did the same at
several times the cost.)
"""

from cpython.buffer cimport PyBUF_FORMAT

cdef char *_FORMAT = "B"


cdef class Lent:
    cdef object raw        # the bytes handed out (a stage's mapping, a pooled block)
    cdef object on_last
    cdef char *data
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __cinit__(self, object raw, object on_last):
        cdef unsigned char[::1] view = raw  # raises for anything but writable contiguous bytes
        self.raw = raw
        self.on_last = on_last
        self.data = <char *>&view[0] if view.shape[0] else NULL
        self.shape[0] = view.shape[0]
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
