"""Whole chunks of compressed datasets read raw and decoded by fast libraries, past HDF5's filters.

Internal module. HDF5's filter pipeline decodes a chunk into a buffer of its own, keeps it in the
chunk cache and copies the rows out again, with the codecs it was built with (zlib for deflate).
For datasets chunked in whole rows (``chunks[1:] == shape[1:]``) whose filters are all known, a
worker can instead read each chunk's stored bytes (``read_direct_chunk``) and decode them with a
faster library (libdeflate, ISA-L or zlib-ng for deflate, c-blosc2 for Blosc) straight into the
destination.
``ChunkDecoder.of`` says whether a dataset qualifies; anything unusual (a chunk stored with a
filter skipped, unallocated chunks that read as the fill value, unknown filters, checksums, types
that convert, a codec that fails) keeps the HDF5 path, so results are identical either way.

Going to HDF5 is visible: ``fallbacks`` counts, per process, the reads (and datasets) left to
HDF5 by reason, each reason either ``declined: ...`` (a layout or chunk this module does not
handle: expected) or ``failed: ...`` (a codec that raised or gave the wrong size: corrupt data,
or a bug here); each reason is logged once, at debug level, on the ``multitables`` logger.
``decoded`` counts the chunks decoded here, by codec, so a test can tell that the fast path ran.
"""

from __future__ import annotations

import collections
import ctypes
import glob
import importlib
import logging
import math
import os
import weakref
import zlib
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from .source import per_dataset


def _optional(module: str) -> Any:
    """A codec module if it is installed, else None (its chunks then go through HDF5)."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover
        return None


# Deflate decoders, fastest first. Whole 1 MiB chunks of the bench files (gzip level 4), one core
# of the 2-core development machine: libdeflate 369 MB/s (float32) and 604 MB/s (uint8 images,
# before unshuffling), ISA-L 323 and 479, zlib-ng ~1.5x zlib, zlib 183 and 211. libdeflate
# decodes a whole buffer whose decoded size is known, which is what a chunk is.
# MULTITABLES_DEFLATE=libdeflate|isal|zlib-ng|zlib picks one (zlib: leave deflate to HDF5).
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
        module = _optional(_DEFLATE_MODULES[name])
        if module is not None:
            return name, module
    return None, None


_deflate_name, _deflate_lib = _pick_deflate()
_lzf = _optional("lzf")
_blosc2 = _optional("blosc2")
_zstd = _optional("zstandard")
_lz4 = _optional("lz4.block")

DEFLATE, SHUFFLE, LZF, LZ4, BLOSC, ZSTD, BLOSC2 = 1, 2, 32000, 32004, 32001, 32015, 32026

# What a codec raises on data it cannot decode; the chunk then goes through HDF5, which raises
# its own error if the data really is corrupt.
_DECODE_ERRORS: tuple[Any, ...] = (ValueError, RuntimeError, zlib.error)
for _name, _module in _DEFLATE_MODULES.items():
    _lib = _optional(_module)
    if _lib is not None:
        _DECODE_ERRORS += (_lib.DeflateError if _name == "libdeflate" else _lib.error,)
if _zstd is not None:
    _DECODE_ERRORS += (_zstd.ZstdError,)
if _lz4 is not None:
    _DECODE_ERRORS += (_lz4.LZ4BlockError,)


class _Undecodable(Exception):
    """A chunk this module does not decode after all: ``args[0]`` is the reason, one of a few
    fixed texts (a key of ``fallbacks``)."""


fallbacks: collections.Counter[str] = collections.Counter()
"""Reads (and, ``declined: dataset ...``, datasets) left to HDF5 in this process, by reason."""
decoded: collections.Counter[str] = collections.Counter()
"""Chunks decoded by this module in this process, by codec (``none``: shuffle only)."""

_log = logging.getLogger("multitables")


def _fall_back(reason: str) -> None:
    """Count a read left to HDF5 for ``reason``, logging the first one of each reason."""
    if reason not in fallbacks:
        _log.debug("chunks read through HDF5 (%s); further ones are counted in "
                   "multitables.decode.fallbacks", reason)
    fallbacks[reason] += 1


def _reset_counts() -> None:
    fallbacks.clear()
    decoded.clear()


# A forked worker counts its own reads.
os.register_at_fork(after_in_child=_reset_counts)


# A codec turns a chunk's stored bytes into its decoded bytes (exactly ``nbytes`` of them): it
# writes them into ``into`` and returns it, or returns a bytes object of its own.
Codec = Callable[[memoryview, np.ndarray], "np.ndarray | bytes"]


class ChunkDecoder:
    """Reads of rows of one chunked, compressed dataset, chunk by chunk, decoded outside HDF5.

    One ``read_direct_chunk`` and one decode per chunk; chunks that the rows cover whole are
    decoded straight into the destination, partial ones into a scratch chunk first.
    """

    def __init__(self, dsid, shape: tuple[int, ...], row_bytes: int, chunk_rows: int,
                 ok: np.ndarray, raw_size: int, codec: Codec | None, shuffle: int,
                 bytes_in: bool, name: str = "none"):
        # Weakly: the cache is keyed weakly by this id, so a strong reference would keep both.
        self._dsid = weakref.ref(dsid)
        self.n_rows = shape[0]
        self.row_bytes = row_bytes
        self.chunk_rows = chunk_rows
        self.chunk_bytes = row_bytes * chunk_rows
        self.ok = ok  # chunk k is allocated and stored with every filter applied
        self._tail = (0,) * (len(shape) - 1)
        self._raw = np.empty(raw_size, np.uint8)
        self._bytes_in = bytes_in  # the codec wants bytes (python-lzf), not a writable view
        self._codec = codec
        self.name = name  # the codec's, as counted in ``decoded``
        self._shuffle = shuffle  # element size the HDF5 shuffle filter used; 0: none
        self._scratch = np.empty(self.chunk_bytes, np.uint8)  # a chunk read in part
        # Which chunk the scratch holds: blocks that do not fall on chunk boundaries share their
        # edge chunks with the next block, which then is not decoded twice.
        self._scratch_chunk = -1
        self._shuffled = np.empty(self.chunk_bytes if codec and shuffle else 0, np.uint8)

    @classmethod
    def of(cls, dataset: h5py.Dataset) -> ChunkDecoder | None:
        """The decoder of ``dataset``, or None when it must be read through HDF5."""
        return _decoder(dataset)

    def read_rows(self, start: int, stop: int, out: np.ndarray) -> bool:
        """Fill ``out`` (C-contiguous, shape ``(stop - start, *shape[1:])``, the dataset's dtype)
        with rows ``start:stop``; False when some chunk must go through HDF5 (``out`` then holds
        nothing or part of the rows, to be overwritten)."""
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"rows {start}:{stop} are out of bounds for axis 0 with size "
                             f"{self.n_rows}")
        rb, cr = self.row_bytes, self.chunk_rows
        if not out.flags.c_contiguous or out.nbytes != (stop - start) * rb:
            raise ValueError(f"out must be a C-contiguous array of {(stop - start) * rb} bytes "
                             f"for rows {start}:{stop}, not {out.nbytes} bytes "
                             f"(contiguous: {out.flags.c_contiguous})")
        if start == stop:
            return True
        if not self.ok[start // cr : (stop - 1) // cr + 1].all():
            _fall_back("declined: a chunk stored with a filter skipped, or never written")
            return False
        dest = out.reshape(-1).view(np.uint8)
        dsid = self._dsid()
        if dsid is None or not dsid.valid:
            raise ValueError("the dataset of this decoder is closed")
        at, row = 0, start
        try:
            while row < stop:
                chunk, first = divmod(row, cr)
                n = min(stop - row, cr - first)
                if n == cr:
                    self._decode(dsid, chunk, dest[at : at + self.chunk_bytes])
                else:
                    if chunk != self._scratch_chunk:
                        self._scratch_chunk = -1
                        self._decode(dsid, chunk, self._scratch)
                        self._scratch_chunk = chunk
                    dest[at : at + n * rb] = self._scratch[first * rb : (first + n) * rb]
                at += n * rb
                row += n
        except _Undecodable as exc:
            _fall_back(exc.args[0])
            return False
        except _DECODE_ERRORS as exc:
            _fall_back(f"failed: {self.name} raised {type(exc).__name__}")
            return False
        return True

    def _decode(self, dsid, chunk: int, dest: np.ndarray) -> None:
        """Chunk ``chunk``, decoded into ``dest`` (``chunk_bytes`` bytes)."""
        offsets = (chunk * self.chunk_rows, *self._tail)
        if self._bytes_in:
            mask, raw = dsid.read_direct_chunk(offsets)
        else:
            mask, raw = dsid.read_direct_chunk(offsets, out=self._raw)
        if mask:
            raise _Undecodable("declined: a chunk stored with a filter skipped")
        if self._codec is None:
            data = raw
        else:
            data = self._codec(raw, self._shuffled if self._shuffle else dest)
        if len(data) != self.chunk_bytes:
            raise _Undecodable(f"failed: {self.name} gave a chunk of the wrong size")
        decoded[self.name] += 1
        if self._shuffle:
            _unshuffle(np.frombuffer(data, np.uint8), dest, self._shuffle)
        elif data is not dest:
            dest[:] = np.frombuffer(data, np.uint8)


def _unshuffle(src: np.ndarray, dest: np.ndarray, size: int) -> None:
    """Undo HDF5's shuffle filter: byte ``j`` of every element was stored in plane ``j``."""
    n = len(src) // size
    if size == 1 or n <= 1:
        dest[:] = src
        return
    body = n * size
    if size <= 16:
        # One strided copy per byte plane: ~4 GB/s, where a transposed copyto of the whole
        # (size, n) array runs at 0.7-2.7 GB/s for sizes 2-8.
        for j in range(size):
            dest[j:body:size] = src[j * n : (j + 1) * n]
    else:
        np.copyto(dest[:body].reshape(n, size), src[:body].reshape(size, n).T)
    dest[body:] = src[body:]  # HDF5 leaves the bytes past the last whole element in place


def inflate(raw: Any, nbytes: int) -> bytes | bytearray | np.ndarray:
    """A zlib stream (an HDF5 deflate chunk) decoded by the decoder this module uses: exactly
    ``nbytes`` bytes, else ``ValueError``. For benchmarks that measure the decode limit."""
    try:
        data = _deflate_codec(nbytes)(memoryview(raw), np.empty(nbytes, np.uint8))
    except (_Undecodable, *_DECODE_ERRORS) as exc:
        raise ValueError(f"the stream does not decode to {nbytes} bytes: {exc}") from exc
    if len(data) != nbytes:
        raise ValueError(f"the stream decodes to {len(data)} bytes, not {nbytes}")
    return data


def _load_libdeflate() -> Any:
    """libdeflate's C API, from the extension of the ``deflate`` package (which links it in and
    exports it), or None. Through it a chunk decodes straight into its destination: the
    package's ``zlib_decompress`` returns a new buffer, whose allocation and copy cost 7-25% of
    a 1 MiB chunk's decode here."""
    module = _optional("deflate")
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


_c_libdeflate = _load_libdeflate()
# libdeflate_result: what a decode that did not succeed found.
_LIBDEFLATE_RESULTS = {1: "bad data", 2: "fewer bytes than a chunk", 3: "more bytes than a chunk"}


def _deflate_codec(nbytes: int, name: str | None = None) -> Codec:
    name = name or _deflate_name
    if name == "libdeflate" and _c_libdeflate is not None:
        lib = _c_libdeflate
        decompressor = lib.libdeflate_alloc_decompressor()
        if not decompressor:
            raise MemoryError("libdeflate could not allocate a decompressor")

        def into_place(raw, into):
            if into.nbytes != nbytes or not into.flags.c_contiguous:  # C writes nbytes there
                raise _Undecodable("declined: a destination not of the chunk's size and layout")
            src = np.frombuffer(raw, np.uint8)
            # No actual-size pointer: libdeflate then insists on exactly nbytes.
            result = lib.libdeflate_zlib_decompress(decompressor, src.ctypes.data, src.nbytes,
                                                    into.ctypes.data, nbytes, None)
            if result:
                raise _Undecodable(f"failed: libdeflate found {_LIBDEFLATE_RESULTS.get(result)}")
            return into

        weakref.finalize(into_place, lib.libdeflate_free_decompressor, decompressor)
        return into_place
    if name == "libdeflate":
        libdeflate = _optional("deflate")

        def whole(raw, into):
            # Decodes at most nbytes: a longer stream raises DeflateError (a fallback).
            return libdeflate.zlib_decompress(raw, nbytes)

        return whole
    lib = _optional(_DEFLATE_MODULES[name]) if name in _DEFLATE_MODULES else zlib

    def decode(raw, into):
        obj = lib.decompressobj()
        data = obj.decompress(raw, nbytes + 1)
        if not obj.eof:
            raise _Undecodable("failed: deflate stream longer than a chunk, or cut short")
        return data

    return decode


def _lzf_codec(nbytes: int) -> Codec:
    def decode(raw, into):
        data = _lzf.decompress(raw, nbytes)
        if data is None:
            raise _Undecodable("failed: lzf data longer than a chunk")
        return data

    return decode


def _zstd_codec(nbytes: int) -> Codec:
    dctx = _zstd.ZstdDecompressor()

    def decode(raw, into):
        return dctx.decompress(raw, max_output_size=nbytes)

    return decode


def _lz4_codec(nbytes: int) -> Codec:
    """hdf5plugin's LZ4 chunks: total size (8 bytes) and block size (4), both big-endian, then
    each block as its compressed size (4) and bytes, stored as is when that saved nothing."""

    def decode(raw, into):
        total, block = int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:12], "big")
        if total != nbytes or block <= 0:
            raise _Undecodable("failed: lz4 header does not match the chunk")
        at, pos = 0, 12
        while at < total:
            size = min(block, total - at)
            stored = int.from_bytes(raw[pos : pos + 4], "big")
            pos += 4
            part = raw[pos : pos + stored]
            if stored == size:
                into[at : at + size] = part
            else:
                into[at : at + size] = np.frombuffer(
                    _lz4.decompress(part, uncompressed_size=size), np.uint8)
            at, pos = at + size, pos + stored
        return into

    return decode


class _Dparams(ctypes.Structure):
    """c-blosc2's blosc2_dparams (typesize is ignored by versions that end before it)."""

    _fields_ = [("nthreads", ctypes.c_int16), ("schunk", ctypes.c_void_p),
                ("postfilter", ctypes.c_void_p), ("postparams", ctypes.c_void_p),
                ("typesize", ctypes.c_int32)]


def _load_c_blosc2() -> Any:
    """The c-blosc2 library that python-blosc2's wheel ships beside its extension, or None."""
    if _blosc2 is None:
        return None
    for path in sorted(glob.glob(os.path.join(os.path.dirname(_blosc2.__file__), "lib",
                                              "libblosc2.so*"))):
        try:
            lib = ctypes.CDLL(path)
        except OSError:  # pragma: no cover
            continue
        lib.blosc2_create_dctx.argtypes = [_Dparams]
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


_c_blosc2 = _load_c_blosc2()


def _blosc_decompressor() -> Callable[[Any, np.ndarray], int]:
    """``decompress(chunk, into)``: bytes written, on a one-thread context of its own.

    Never on c-blosc2's global context (``blosc2.decompress``): once ``blosc2.set_nthreads``
    has started its thread pool in a process, a forked worker waits for ever on threads it does
    not have. A context made per call (``blosc2.decompress2``) costs ~3% of a 1 MiB chunk's
    decode, so each decoder keeps one, through the library the wheel ships where it does.
    """
    if _c_blosc2 is None:
        def fresh_context(raw, into):
            nbytes = _blosc2.get_cbuffer_sizes(raw)[0]
            if nbytes != into.nbytes:
                return -1  # decompress2 writes what the header says, whatever room dst has
            _blosc2.decompress2(raw, dst=into, nthreads=1)
            return nbytes
        return fresh_context
    lib = _c_blosc2
    ctx = lib.blosc2_create_dctx(_Dparams(nthreads=1, typesize=8))
    if not ctx:
        raise MemoryError("c-blosc2 could not create a decompression context")

    def decompress(raw, into):
        src = np.frombuffer(raw, np.uint8)
        return lib.blosc2_decompress_ctx(ctx, src.ctypes.data, src.nbytes, into.ctypes.data,
                                         into.nbytes)

    weakref.finalize(decompress, lib.blosc2_free_ctx, ctx)
    return decompress


def _decompress_frame(frame: Any, into: np.ndarray) -> int:
    """The one chunk of a Blosc2 frame, through a super-chunk that the shipped library builds
    over it (and a context of its own, made in this process): for the codecs and filters that
    read the frame's metadata (ZFP, NDCELL, NDMEAN), which a bare context cannot decode."""
    if _c_blosc2 is None:
        return -1
    lib, src = _c_blosc2, np.frombuffer(frame, np.uint8)
    schunk = lib.blosc2_schunk_from_buffer(src.ctypes.data, src.nbytes, False)
    if not schunk:
        return -1
    try:
        return lib.blosc2_schunk_decompress_chunk(schunk, 0, into.ctypes.data, into.nbytes)
    finally:
        lib.blosc2_schunk_free(schunk)


def _blosc_codec(nbytes: int) -> Codec:
    decompress = _blosc_decompressor()

    def decode(raw, into):
        # c-blosc2 reads Blosc 1 chunks.
        if int.from_bytes(raw[4:8], "little") != nbytes or decompress(raw, into) != nbytes:
            raise _Undecodable("failed: blosc chunk does not decode to the chunk's size")
        return into

    return decode


def _blosc2_codec(nbytes: int, chunks: tuple[int, ...], itemsize: int) -> Codec:
    """hdf5plugin's Blosc2 chunks: a frame of one chunk; for several dimensions a b2nd array
    whose blocks tile the chunk, put back in row-major order when they do not span its rows."""
    # numpy copies unsigned integers faster than void items of the same size
    item = np.dtype(f"u{itemsize}" if itemsize in (1, 2, 4, 8) else f"V{itemsize}")

    decompress = _blosc_decompressor()

    def decode(raw, into):
        frame = _blosc2.schunk_from_cframe(raw, copy=False)
        if frame.nchunks != 1:
            raise _Undecodable("declined: blosc2 frame of several chunks")
        meta = frame.meta
        tiled = "b2nd" in meta
        if tiled:
            _, ndim, shape, chunkshape, blocks = meta["b2nd"][:5]
            if tuple(shape) != chunks or tuple(chunkshape) != chunks:
                raise _Undecodable("declined: blosc2 b2nd shape other than the chunk's")
            grid = [-(-c // b) for c, b in zip(chunks, blocks, strict=True)]
            padded = math.prod(grid) * math.prod(blocks) * itemsize
            # Blocks spanning whole rows and tiling the chunk exactly are already row-major.
            tiled = grid[1:] != [1] * (ndim - 1) or padded != nbytes
        dest = np.empty(padded, np.uint8) if tiled else into
        # The frame's own decompress_chunk runs on a context that may wait for threads a
        # forked worker does not have (see _blosc_decompressor); its chunk is a Blosc2 chunk.
        if frame.chunksize != dest.nbytes:
            raise _Undecodable("failed: blosc2 frame's chunk size is not the chunk's")
        if (decompress(frame.get_chunk(0), dest) != dest.nbytes
                and _decompress_frame(raw, dest) != dest.nbytes):
            raise _Undecodable("failed: blosc2 chunk does not decode to the chunk's size")
        if tiled:
            tiles = dest.view(item).reshape(*grid, *blocks)
            order = [a for d in range(ndim) for a in (d, ndim + d)]
            whole = tiles.transpose(order).reshape([g * b for g, b in
                                                    zip(grid, blocks, strict=True)])
            into.view(item).reshape(chunks)[...] = whole[tuple(slice(c) for c in chunks)]
        return into

    return decode


def _stored_raw(dsid, chunks: tuple[int, ...], n_chunks: int, nbytes: int) -> bool:
    info = dsid.get_chunk_info_by_coord(((n_chunks - 1) * chunks[0],) + (0,) * (len(chunks) - 1))
    return info.byte_offset is not None and info.size == nbytes




def _codec(code: int, nbytes: int, chunks: tuple[int, ...], itemsize: int) -> Codec | None:
    if code == DEFLATE:
        return _deflate_codec(nbytes)
    if code == LZF and _lzf is not None:
        return _lzf_codec(nbytes)
    if code == BLOSC and _blosc2 is not None:
        return _blosc_codec(nbytes)
    if code == BLOSC2 and _blosc2 is not None:
        return _blosc2_codec(nbytes, chunks, itemsize)
    if code == ZSTD and _zstd is not None:
        return _zstd_codec(nbytes)
    if code == LZ4 and _lz4 is not None:
        return _lz4_codec(nbytes)
    return None


_FILTER_NAMES = {DEFLATE: "deflate", LZF: "lzf", LZ4: "lz4", BLOSC: "blosc", ZSTD: "zstd",
                 BLOSC2: "blosc2"}


def _declined(what: str) -> ChunkDecoder | None:
    """A compressed dataset left to HDF5 as a whole (no decoder): counted once per dataset
    opened."""
    _fall_back(f"declined: {what}")
    return None


@per_dataset  # a decoder goes with its dataset, as rawread's layouts do
def _decoder(dataset: h5py.Dataset) -> ChunkDecoder | None:
    dsid, shape, dtype = dataset.id, dataset.shape, dataset.dtype
    dcpl = dsid.get_create_plist()
    if not shape or dcpl.get_layout() != h5py.h5d.CHUNKED or not dcpl.get_nfilters():
        return None  # nothing to decode: read as stored (rawread, or HDF5)
    if tuple(dataset.chunks[1:]) != tuple(shape[1:]):
        return _declined("dataset chunked across rows")
    if dtype.hasobject or dsid.get_type() != h5py.h5t.py_create(dtype):
        return _declined("dataset of a type HDF5 converts, or of references")
    chunks = tuple(dataset.chunks)
    row_bytes = dtype.itemsize * math.prod(shape[1:])
    nbytes = row_bytes * chunks[0]
    filters = [dcpl.get_filter(i)[:3] for i in range(dcpl.get_nfilters())]
    # HDF5 applies the filters in pipeline order when writing: shuffle, then one compressor.
    shuffle = 0
    if filters[0][0] == SHUFFLE:
        shuffle = filters.pop(0)[2][0] if filters[0][2] else dtype.itemsize
    if len(filters) > 1:
        return _declined("dataset with a checksum, scale-offset or a second compressor")
    codec, name = None, "none"
    if filters:
        code = filters[0][0]
        name = _FILTER_NAMES.get(code, f"filter {code}")
        if code == DEFLATE and _deflate_lib is None:
            return _declined("deflate without a faster library than HDF5's zlib")
        codec = _codec(code, nbytes, chunks, dtype.itemsize)
        if codec is None:
            return _declined(f"dataset compressed by {name}, which no installed library decodes")
    n_chunks = -(-shape[0] // chunks[0])
    ok = np.zeros(n_chunks, bool)
    sizes = [0]

    def note(info):
        k = info.chunk_offset[0] // chunks[0]
        if k < n_chunks:
            ok[k] = info.filter_mask == 0
            sizes.append(info.size)

    if not hasattr(dsid, "chunk_iter"):
        return _declined("h5py built on HDF5 < 1.12.3 (no chunk_iter)")
    dsid.chunk_iter(note)
    if shape[0] % chunks[0] and ok[-1] and _stored_raw(dsid, chunks, n_chunks, nbytes):
        # A file made with H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS stores a partial edge chunk
        # unfiltered with a filter mask of 0 (h5py cannot ask for the option): when the last
        # chunk's size is that of raw data, let HDF5 read it.
        ok[-1] = False
    return ChunkDecoder(dsid, shape, row_bytes, chunks[0], ok, max(sizes), codec, shuffle,
                        bytes_in=codec is not None and filters[0][0] == LZF, name=name)
