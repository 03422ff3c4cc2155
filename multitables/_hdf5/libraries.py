"""The optional libraries that decode compressed chunks, loaded once per process (internal).

Each is optional: a codec whose library is missing leaves its chunks to HDF5. Where a wheel
ships a C library beside its extension (libdeflate in ``deflate``, c-blosc2 in ``blosc2``),
its C API is loaded too, so that a chunk decodes straight into its destination on a context of
its own. ``MULTITABLES_DEFLATE=libdeflate|isal|zlib-ng|zlib`` picks the deflate library (zlib:
leave deflate to HDF5).

The chosen deflate library and the C libraries are read through functions (``deflate_name()``,
``c_libdeflate()``, ...), not copied at import, so a test can swap them on this module.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import os
import zlib
from typing import Any


def optional(module: str) -> Any:
    """A codec module if it is installed, else None (its chunks then go through HDF5)."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover
        return None


# Deflate decoders, fastest first (bench/README.md, "Decoders", has the figures). libdeflate
# decodes a whole buffer whose decoded size is known, which is what a chunk is.
_DEFLATE_MODULES = {"libdeflate": "deflate", "isal": "isal.isal_zlib", "zlib-ng": "zlib_ng.zlib_ng"}


def _pick_deflate() -> tuple[str | None, Any]:
    """The deflate decoder to use: (name, module), or (None, None) for none faster than zlib."""
    wanted = os.environ.get("MULTITABLES_DEFLATE")
    if wanted is not None and wanted not in (*_DEFLATE_MODULES, "zlib"):
        raise ValueError(f"MULTITABLES_DEFLATE={wanted!r}: expected one of "
                         f"{[*_DEFLATE_MODULES, 'zlib']}")
    if wanted == "zlib":
        return None, None
    for name in [wanted] if wanted else list(_DEFLATE_MODULES):
        module = optional(_DEFLATE_MODULES[name])
        if module is not None:
            return name, module
    return None, None


_deflate_name, _deflate_lib = _pick_deflate()
lzf = optional("lzf")
blosc2 = optional("blosc2")
zstd = optional("zstandard")
lz4 = optional("lz4.block")


def deflate_name() -> str | None:
    """The deflate library in use (a key of the deflate modules), or None: HDF5's zlib."""
    return _deflate_name


def deflate_lib() -> Any:
    """The module of the deflate library in use, or None."""
    return _deflate_lib


def deflate_module(name: str | None) -> Any:
    """The module of deflate library ``name``, or Python's zlib for any other name."""
    return optional(_DEFLATE_MODULES[name]) if name in _DEFLATE_MODULES else zlib


# What a codec raises on data it cannot decode; the chunk then goes through HDF5, which raises
# its own error if the data really is corrupt.
DECODE_ERRORS: tuple[Any, ...] = (ValueError, RuntimeError, zlib.error)
for _name, _module in _DEFLATE_MODULES.items():
    _lib = optional(_module)
    if _lib is not None:
        DECODE_ERRORS += (_lib.DeflateError if _name == "libdeflate" else _lib.error,)
if zstd is not None:
    DECODE_ERRORS += (zstd.ZstdError,)
if lz4 is not None:
    DECODE_ERRORS += (lz4.LZ4BlockError,)


def _load_libdeflate() -> Any:
    """libdeflate's C API, from the extension of the ``deflate`` package (which links it in and
    exports it), or None. Through it a chunk decodes straight into its destination: the
    package's ``zlib_decompress`` returns a new buffer, whose allocation and copy are a cost
    of their own (bench/README.md, "Decoders")."""
    module = optional("deflate")
    if module is None:
        return None
    for path in glob.glob(os.path.join(os.path.dirname(module.__file__), "_deflate*.so")):
        try:
            lib = ctypes.CDLL(path)
            alloc, free = lib.libdeflate_alloc_decompressor, lib.libdeflate_free_decompressor
            zlib_decompress = lib.libdeflate_zlib_decompress
        except (OSError, AttributeError):  # pragma: no cover - another build of the package
            continue
        alloc.argtypes, alloc.restype = [], ctypes.c_void_p
        free.argtypes, free.restype = [ctypes.c_void_p], None
        zlib_decompress.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        zlib_decompress.restype = ctypes.c_int
        return lib
    return None  # pragma: no cover


class Dparams(ctypes.Structure):
    """c-blosc2's blosc2_dparams (typesize is ignored by versions that end before it)."""

    _fields_ = [("nthreads", ctypes.c_int16), ("schunk", ctypes.c_void_p),
                ("postfilter", ctypes.c_void_p), ("postparams", ctypes.c_void_p),
                ("typesize", ctypes.c_int32)]


def _load_c_blosc2() -> Any:
    """The c-blosc2 library that python-blosc2's wheel ships beside its extension, or None."""
    if blosc2 is None:
        return None
    for path in sorted(glob.glob(os.path.join(os.path.dirname(blosc2.__file__), "lib",
                                              "libblosc2.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:  # pragma: no cover
            continue
        lib.blosc2_create_dctx.argtypes = [Dparams]
        lib.blosc2_create_dctx.restype = ctypes.c_void_p
        lib.blosc2_free_ctx.argtypes = [ctypes.c_void_p]
        lib.blosc2_free_ctx.restype = None
        lib.blosc2_decompress_ctx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
                                              ctypes.c_void_p, ctypes.c_int32]
        lib.blosc2_decompress_ctx.restype = ctypes.c_int
        lib.blosc2_schunk_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_bool]
        lib.blosc2_schunk_from_buffer.restype = ctypes.c_void_p
        lib.blosc2_schunk_decompress_chunk.argtypes = [ctypes.c_void_p, ctypes.c_int64,
                                                       ctypes.c_void_p, ctypes.c_int32]
        lib.blosc2_schunk_decompress_chunk.restype = ctypes.c_int
        lib.blosc2_schunk_free.argtypes = [ctypes.c_void_p]
        lib.blosc2_schunk_free.restype = ctypes.c_int
        lib.blosc2_init()  # registers its plugin codecs; starts no thread
        return lib
    return None  # pragma: no cover


_c_libdeflate = _load_libdeflate()
_c_blosc2 = _load_c_blosc2()


def c_libdeflate() -> Any:
    """libdeflate's C API (a ``ctypes.CDLL``), or None where the wheel does not export it."""
    return _c_libdeflate


def c_blosc2() -> Any:
    """The c-blosc2 library shipped with python-blosc2 (a ``ctypes.CDLL``), or None."""
    return _c_blosc2
