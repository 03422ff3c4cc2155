"""The codec table: each HDF5 compression filter this package decodes itself, by filter id, with
its name, the libraries that decode it and the factory of its decoder (internal).

The fast decode path (``decode``) looks a dataset's filter up here; ``python -m multitables info``
names filters from the same table.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import libraries as libs
from .fallback import Undecodable

# HDF5 filter ids: registered with The HDF Group (hdf5plugin's filters among them).
DEFLATE, SHUFFLE, LZF, LZ4, BLOSC, ZSTD, BLOSC2 = 1, 2, 32000, 32004, 32001, 32015, 32026

# A codec turns a chunk's stored bytes into its decoded bytes (exactly ``nbytes`` of them): it
# writes them into ``into`` and returns it, or returns a bytes object of its own.
Codec = Callable[[memoryview, np.ndarray], "np.ndarray | bytes"]


@dataclass(frozen=True)
class CodecSpec:
    """One compression filter: how it is named and shown, and how its chunks are decoded."""

    name: str  # as counted in ``fallback.decoded`` and named in fallback reasons
    libraries: tuple[str, ...]  # the packages that decode it here (any one of them)
    available: Callable[[], bool]  # whether one of them is installed in this process
    # ``make(nbytes, chunks, itemsize)``: a decoder of chunks of that shape and size
    make: Callable[[int, tuple[int, ...], int], Codec]
    bytes_in: bool = False  # its codec wants bytes (python-lzf), not a writable view
    # Why it is left to HDF5 when ``available()`` is False, if not for want of a library.
    unavailable: str = ""
    # How ``info`` shows it with its filter values (None, or a None from it: HDF5's name).
    show: Callable[[Sequence[int]], str | None] | None = None


# libdeflate_result: what a decode that did not succeed found.
_LIBDEFLATE_RESULTS = {1: "bad data", 2: "fewer bytes than a chunk", 3: "more bytes than a chunk"}


def deflate_codec(nbytes: int, name: str | None = None) -> Codec:
    """A decoder of deflate chunks of ``nbytes`` by library ``name`` (default: the one in use)."""
    name = name or libs.deflate_name()
    if name == "libdeflate" and libs.c_libdeflate() is not None:
        return _libdeflate_into_place(nbytes)
    if name == "libdeflate":
        libdeflate = libs.optional("deflate")

        def whole(raw, into):
            # Decodes at most nbytes: a longer stream raises DeflateError (a fallback).
            return libdeflate.zlib_decompress(raw, nbytes)

        return whole
    lib = libs.deflate_module(name)

    def decode(raw, into):
        obj = lib.decompressobj()
        data = obj.decompress(raw, nbytes + 1)
        if not obj.eof:
            raise Undecodable("failed: deflate stream longer than a chunk, or cut short")
        return data

    return decode


def _libdeflate_into_place(nbytes: int) -> Codec:
    """libdeflate through its C API, with a decompressor of its own, straight into ``into``."""
    lib = libs.c_libdeflate()
    decompressor = lib.libdeflate_alloc_decompressor()
    if not decompressor:
        raise MemoryError("libdeflate could not allocate a decompressor")

    def into_place(raw, into):
        if into.nbytes != nbytes or not into.flags.c_contiguous:  # C writes nbytes there
            raise Undecodable("declined: a destination not of the chunk's size and layout")
        src = np.frombuffer(raw, np.uint8)
        # No actual-size pointer: libdeflate then insists on exactly nbytes.
        result = lib.libdeflate_zlib_decompress(decompressor, src.ctypes.data, src.nbytes,
                                                into.ctypes.data, nbytes, None)
        if result:
            raise Undecodable(f"failed: libdeflate found {_LIBDEFLATE_RESULTS.get(result)}")
        return into

    weakref.finalize(into_place, lib.libdeflate_free_decompressor, decompressor)
    return into_place


def _lzf_codec(nbytes: int) -> Codec:
    def decode(raw, into):
        data = libs.lzf.decompress(raw, nbytes)
        if data is None:
            raise Undecodable("failed: lzf data longer than a chunk")
        return data

    return decode


def _zstd_codec(nbytes: int) -> Codec:
    dctx = libs.zstd.ZstdDecompressor()

    def decode(raw, into):
        return dctx.decompress(raw, max_output_size=nbytes)

    return decode


def _lz4_codec(nbytes: int) -> Codec:
    """hdf5plugin's LZ4 chunks: total size (8 bytes) and block size (4), both big-endian, then
    each block as its compressed size (4) and bytes, stored as is when that saved nothing."""

    def decode(raw, into):
        total, block = int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:12], "big")
        if total != nbytes or block <= 0:
            raise Undecodable("failed: lz4 header does not match the chunk")
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
                    libs.lz4.decompress(part, uncompressed_size=size), np.uint8)
            at, pos = at + size, pos + stored
        return into

    return decode


def _blosc_decompressor() -> Callable[[Any, np.ndarray], int]:
    """``decompress(chunk, into)``: bytes written, on a one-thread context of its own.

    Never on c-blosc2's global context (``blosc2.decompress``): once ``blosc2.set_nthreads``
    has started its thread pool in a process, a forked worker waits for ever on threads it does
    not have. A context made per call (``blosc2.decompress2``) has a cost of its own
    (bench/README.md, "Decoders"), so each decoder keeps one, through the library the wheel
    ships where it does.
    """
    lib = libs.c_blosc2()
    if lib is None:
        def fresh_context(raw, into):
            nbytes = libs.blosc2.get_cbuffer_sizes(raw)[0]
            if nbytes != into.nbytes:
                return -1  # decompress2 writes what the header says, whatever room dst has
            libs.blosc2.decompress2(raw, dst=into, nthreads=1)
            return nbytes
        return fresh_context
    ctx = lib.blosc2_create_dctx(libs.Dparams(nthreads=1, typesize=8))
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
    lib = libs.c_blosc2()
    if lib is None:
        return -1
    src = np.frombuffer(frame, np.uint8)
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
            raise Undecodable("failed: blosc chunk does not decode to the chunk's size")
        return into

    return decode


def _blosc2_codec(nbytes: int, chunks: tuple[int, ...], itemsize: int) -> Codec:
    """hdf5plugin's Blosc2 chunks: a frame of one chunk; for several dimensions a b2nd array
    whose blocks tile the chunk, put back in row-major order when they do not span its rows."""
    # numpy copies unsigned integers faster than void items of the same size
    item = np.dtype(f"u{itemsize}" if itemsize in (1, 2, 4, 8) else f"V{itemsize}")

    decompress = _blosc_decompressor()

    def decode(raw, into):
        frame = libs.blosc2.schunk_from_cframe(raw, copy=False)
        if frame.nchunks != 1:
            raise Undecodable("declined: blosc2 frame of several chunks")
        meta = frame.meta
        tiled = "b2nd" in meta
        if tiled:
            _, ndim, shape, chunkshape, blocks = meta["b2nd"][:5]
            if tuple(shape) != chunks or tuple(chunkshape) != chunks:
                raise Undecodable("declined: blosc2 b2nd shape other than the chunk's")
            grid = [-(-c // b) for c, b in zip(chunks, blocks, strict=True)]
            padded = math.prod(grid) * math.prod(blocks) * itemsize
            # Blocks spanning whole rows and tiling the chunk exactly are already row-major.
            tiled = grid[1:] != [1] * (ndim - 1) or padded != nbytes
        dest = np.empty(padded, np.uint8) if tiled else into
        # The frame's own decompress_chunk runs on a context that may wait for threads a
        # forked worker does not have (see _blosc_decompressor); its chunk is a Blosc2 chunk.
        if frame.chunksize != dest.nbytes:
            raise Undecodable("failed: blosc2 frame's chunk size is not the chunk's")
        if (decompress(frame.get_chunk(0), dest) != dest.nbytes
                and _decompress_frame(raw, dest) != dest.nbytes):
            raise Undecodable("failed: blosc2 chunk does not decode to the chunk's size")
        if tiled:
            tiles = dest.view(item).reshape(*grid, *blocks)
            order = [a for d in range(ndim) for a in (d, ndim + d)]
            whole = tiles.transpose(order).reshape([g * b for g, b in
                                                    zip(grid, blocks, strict=True)])
            into.view(item).reshape(chunks)[...] = whole[tuple(slice(c) for c in chunks)]
        return into

    return decode


def _show_deflate(values: Sequence[int]) -> str:
    return f"gzip({values[0]})" if values else "gzip"  # its one value is the level


_BLOSC_COMPRESSORS = ["blosclz", "lz4", "lz4hc", "snappy", "zlib", "zstd"]


def _show_blosc(values: Sequence[int]) -> str | None:
    if len(values) < 7:
        return None
    # values 4..6 are the level, the shuffle and the compressor
    codec = (_BLOSC_COMPRESSORS[values[6]] if values[6] < len(_BLOSC_COMPRESSORS)
             else str(values[6]))
    shuffle = {1: ",shuffle", 2: ",bitshuffle"}.get(values[5], "")
    return f"blosc({codec},{values[4]}{shuffle})"


CODECS: dict[int, CodecSpec] = {
    DEFLATE: CodecSpec(
        "deflate", ("deflate", "isal", "zlib-ng"), lambda: libs.deflate_lib() is not None,
        lambda nbytes, chunks, itemsize: deflate_codec(nbytes),
        unavailable="deflate without a faster library than HDF5's zlib", show=_show_deflate),
    LZF: CodecSpec("lzf", ("python-lzf",), lambda: libs.lzf is not None,
                   lambda nbytes, chunks, itemsize: _lzf_codec(nbytes), bytes_in=True),
    LZ4: CodecSpec("lz4", ("lz4",), lambda: libs.lz4 is not None,
                   lambda nbytes, chunks, itemsize: _lz4_codec(nbytes)),
    BLOSC: CodecSpec("blosc", ("blosc2",), lambda: libs.blosc2 is not None,
                     lambda nbytes, chunks, itemsize: _blosc_codec(nbytes), show=_show_blosc),
    ZSTD: CodecSpec("zstd", ("zstandard",), lambda: libs.zstd is not None,
                    lambda nbytes, chunks, itemsize: _zstd_codec(nbytes)),
    BLOSC2: CodecSpec("blosc2", ("blosc2",), lambda: libs.blosc2 is not None, _blosc2_codec),
}
"""The filters decoded outside HDF5, by HDF5 filter id."""
