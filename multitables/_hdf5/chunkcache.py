"""HDF5's chunk cache, sized for the way each front door's workers read (internal).

A worker opens its file with the user's ``h5py.File`` options; where the user set no cache size
(``rdcc_nbytes``, ``rdcc_nslots``), ``chunk_cache`` adds the one its reads need. The cache only
pays for chunks read twice: HDF5 decodes a compressed chunk into it once, and each later read
of the chunk's rows copies from it. Uncompressed chunks that it cannot hold bypass it, with
one copy fewer, and so do the chunks of the fast decode path (``decode``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Streamer (blocks): a slot's chunks twice over (a block that does not fall on chunk boundaries
# shares its edge chunks with the next, read by another worker's slot) plus this much room.
STREAM_SPARE_BYTES = 16 << 20
# Hash slots: HDF5 advises a prime about 100 times the chunks the cache holds; this one serves
# caches of up to about a thousand chunks (small chunks, or large slots).
STREAM_NSLOTS = 100_003
# Loader (batches of whole chunks): a unit's compressed chunks twice over, plus one MiB.
LOAD_SPARE_BYTES = 1 << 20
# Reader (random requests): unfiltered rows are read past HDF5 (rawread); the cache serves
# compressed chunks, which random requests often revisit: a few dozen 1 MiB chunks.
RANDOM_BYTES = 32 << 20
RANDOM_NSLOTS = 10_007  # a prime, HDF5's 100 per chunk for up to a hundred chunks


def chunk_cache(file_kwargs: Mapping[str, Any], reads: str, unit_bytes: int | None = None
                ) -> dict[str, Any]:
    """``file_kwargs`` with a chunk cache for ``reads`` where the caller set none.

    ``reads``: ``"stream"`` (a Streamer's blocks), ``"batches"`` (a Loader's units),
    ``"random"`` (a Reader's requests) or ``"once"`` (dask: every chunk read by one task only,
    so no cache). ``unit_bytes``: for ``stream`` and ``batches``, the bytes of compressed rows
    one read spans; None when nothing read is compressed (no cache).
    """
    if reads == "random":
        ours = {"rdcc_nbytes": RANDOM_BYTES, "rdcc_nslots": RANDOM_NSLOTS}
    elif reads == "once" or unit_bytes is None:
        ours = {"rdcc_nbytes": 0}
    elif reads == "stream":
        ours = {"rdcc_nbytes": 2 * unit_bytes + STREAM_SPARE_BYTES, "rdcc_nslots": STREAM_NSLOTS}
    elif reads == "batches":
        ours = {"rdcc_nbytes": 2 * unit_bytes + LOAD_SPARE_BYTES}
    else:
        raise ValueError(f"reads must be 'stream', 'batches', 'random' or 'once', not {reads!r}")
    if reads != "random" and "rdcc_nbytes" in file_kwargs:
        return dict(file_kwargs)  # the user sized the cache: their slots, or HDF5's
    return {**ours, **file_kwargs}
