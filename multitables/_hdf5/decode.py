"""Whole chunks of compressed datasets read raw and decoded by fast libraries, past HDF5's filters.

Internal module. HDF5's filter pipeline decodes a chunk into a buffer of its own, keeps it in the
chunk cache and copies the rows out again, with the codecs it was built with (zlib for deflate).
For datasets chunked in whole rows whose filters are all known (``eligibility``), a worker can
instead read each chunk's stored bytes (``read_direct_chunk``) and decode them with a faster
library (``codecs``: libdeflate, ISA-L or zlib-ng for deflate, c-blosc2 for Blosc) straight into
the destination.
``ChunkDecoder.of`` says whether a dataset qualifies; anything unusual (a chunk stored with a
filter skipped, unallocated chunks that read as the fill value, unknown filters, checksums, types
that convert, a codec that fails) keeps the HDF5 path, so results are identical either way, and
is counted in ``fallback.fallbacks``; ``fallback.decoded`` counts the chunks decoded here.
"""

from __future__ import annotations

import weakref
from typing import Any

import h5py
import numpy as np

from .codecs import deflate_codec
from .eligibility import DecodePlan, plan
from .fallback import Undecodable, decoded, fall_back
from .libraries import DECODE_ERRORS
from .source import per_dataset


class ChunkDecoder:
    """Reads of rows of one chunked, compressed dataset, chunk by chunk, decoded outside HDF5.

    One ``read_direct_chunk`` and one decode per chunk; chunks that the rows cover whole are
    decoded straight into the destination, partial ones into a scratch chunk first.
    """

    def __init__(self, dsid, plan: DecodePlan):
        # Weakly: the cache is keyed weakly by this id, so a strong reference would keep both.
        self._dsid = weakref.ref(dsid)
        self.n_rows = plan.shape[0]
        self.row_bytes = plan.row_bytes
        self.chunk_rows = plan.chunk_rows
        self.chunk_bytes = plan.row_bytes * plan.chunk_rows
        self.ok = plan.ok  # chunk k is allocated and stored with every filter applied
        self._tail = (0,) * (len(plan.shape) - 1)
        self._raw = np.empty(plan.raw_size, np.uint8)
        self._bytes_in = plan.bytes_in  # the codec wants bytes (python-lzf), not a writable view
        self._codec = plan.codec
        self.name = plan.name  # the codec's, as counted in ``decoded``
        self._shuffle = plan.shuffle  # element size the shuffle filter used; 0: none
        self._scratch = np.empty(self.chunk_bytes, np.uint8)  # a chunk read in part
        # Which chunk the scratch holds: blocks that do not fall on chunk boundaries share their
        # edge chunks with the next block, which then is not decoded twice.
        self._scratch_chunk = -1
        self._shuffled = np.empty(self.chunk_bytes if plan.codec and plan.shuffle else 0,
                                 np.uint8)

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
            fall_back("declined: a chunk stored with a filter skipped, or never written")
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
        except Undecodable as exc:
            fall_back(exc.args[0])
            return False
        except DECODE_ERRORS as exc:
            fall_back(f"failed: {self.name} raised {type(exc).__name__}")
            return False
        return True

    def _stored(self, dsid, chunk: int) -> tuple[int, Any]:
        """The filter mask and stored bytes of chunk ``chunk``."""
        offsets = (chunk * self.chunk_rows, *self._tail)
        if self._bytes_in:
            return dsid.read_direct_chunk(offsets)
        return dsid.read_direct_chunk(offsets, out=self._raw)

    def _decode(self, dsid, chunk: int, dest: np.ndarray) -> None:
        """Chunk ``chunk``, decoded into ``dest`` (``chunk_bytes`` bytes)."""
        mask, raw = self._stored(dsid, chunk)
        if mask:
            raise Undecodable("declined: a chunk stored with a filter skipped")
        if self._codec is None:
            data = raw
        else:
            data = self._codec(raw, self._shuffled if self._shuffle else dest)
        place(data, dest, self._shuffle, self.name)


def place(data: Any, dest: np.ndarray, shuffle: int, name: str) -> None:
    """A chunk as ``name`` decoded it (``data``) into ``dest``: unshuffled by ``shuffle`` bytes,
    or copied unless decoded there; Undecodable if it is not ``dest``'s size."""
    if len(data) != dest.nbytes:
        raise Undecodable(f"failed: {name} gave a chunk of the wrong size")
    decoded[name] += 1
    if shuffle:
        unshuffle(np.frombuffer(data, np.uint8), dest, shuffle)
    elif data is not dest:
        dest[:] = np.frombuffer(data, np.uint8)


def unshuffle(src: np.ndarray, dest: np.ndarray, size: int) -> None:
    """Undo HDF5's shuffle filter: byte ``j`` of every element was stored in plane ``j``."""
    n = len(src) // size
    if size == 1 or n <= 1:
        dest[:] = src
        return
    body = n * size
    if size <= 16:
        # One strided copy per byte plane: several times faster than a transposed copyto of the
        # whole (size, n) array for sizes 2-8 (bench/README.md, "Decoders").
        for j in range(size):
            dest[j:body:size] = src[j * n : (j + 1) * n]
    else:
        np.copyto(dest[:body].reshape(n, size), src[:body].reshape(size, n).T)
    dest[body:] = src[body:]  # HDF5 leaves the bytes past the last whole element in place


def inflate(raw: Any, nbytes: int) -> bytes | bytearray | np.ndarray:
    """A zlib stream (an HDF5 deflate chunk) decoded by the decoder this module uses: exactly
    ``nbytes`` bytes, else ``ValueError``. For benchmarks that measure the decode limit."""
    try:
        data = deflate_codec(nbytes)(memoryview(raw), np.empty(nbytes, np.uint8))
    except (Undecodable, *DECODE_ERRORS) as exc:
        raise ValueError(f"the stream does not decode to {nbytes} bytes: {exc}") from exc
    if len(data) != nbytes:
        raise ValueError(f"the stream decodes to {len(data)} bytes, not {nbytes}")
    return data


@per_dataset  # a decoder goes with its dataset, as rawread's layouts do
def _decoder(dataset: h5py.Dataset) -> ChunkDecoder | None:
    if dataset.file.driver == "fileobj":  # in an object store: chunks by ranged GETs
        from .remoteread import remote_decoder
        return remote_decoder(dataset)
    found = plan(dataset)
    return None if found is None else ChunkDecoder(dataset.id, found)
