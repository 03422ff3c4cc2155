"""What the command line tells a user to do (internal): layout warnings, the break-even against
plain h5py, and the calls to make. Plain functions of measured or stored facts, tested apart
from any file or timing.
"""

from __future__ import annotations

import math
from typing import Any

# A random row of a compressed dataset decodes its whole chunk: past this many rows decoded per
# row wanted, say so.
RANDOM_AMPLIFICATION = 16
# Streaming pays a fixed cost per chunk (an HDF5 lookup, a decode call): below this, it shows.
TINY_CHUNK_BYTES = 64 << 10
# The chunk sizes suggested: for random access at most this much, and fewer rows than the warning
# takes (a random row then decodes a few rows, not a whole chunk of many); for streaming, what a
# default block holds.
RANDOM_CHUNK_BYTES = 64 << 10
STREAM_CHUNK_BYTES = 1 << 20


def _rows_for(nbytes: int, row_bytes: int, n_rows: int) -> int:
    return max(1, min(n_rows, nbytes // max(1, row_bytes)))


def _repack(filename: str, path: str, rows: int, shape: tuple[int, ...]) -> str:
    chunk = "x".join(str(n) for n in (rows, *shape[1:]))
    if "://" in filename:  # h5repack reads local files only: a copy first
        return f"h5repack -l {path}:CHUNK={chunk} <a local copy of {filename}> rechunked.h5"
    return f"h5repack -l {path}:CHUNK={chunk} {filename} rechunked.h5"


def layout_warnings(filename: str, entry: dict[str, Any]) -> list[str]:
    """Warnings about ``entry`` (one of ``info.describe``'s dicts): chunk layouts that hurt random
    access or streaming, and the rows a default queue leaves to ``get_remainder``."""
    path, shape, chunks = entry["path"], entry["shape"], entry["chunks"]
    if not shape or not shape[0]:
        return []
    row_bytes = entry["nbytes"] // shape[0]
    found = []
    if chunks:
        chunk_bytes = entry["dtype"].itemsize * math.prod(chunks)
        rows_per_chunk = chunks[0]
        if entry["filters"] != "none" and rows_per_chunk >= RANDOM_AMPLIFICATION:
            rows = max(1, min(RANDOM_AMPLIFICATION // 2, rows_per_chunk // 2,
                              _rows_for(RANDOM_CHUNK_BYTES, row_bytes, shape[0])))
            found.append(
                f"{path}: random access decodes a whole chunk per row: {chunk_bytes:,} bytes "
                f"for a row of {row_bytes:,} ({rows_per_chunk} rows per chunk); the Loader's "
                f"chunk-aware shuffle reads whole chunks, so training needs no rechunking. For "
                f"random access, rechunk: {_repack(filename, path, rows, shape)}"
            )
        n_chunks = math.prod(-(-s // c) for s, c in zip(shape, chunks, strict=True))
        if chunk_bytes < TINY_CHUNK_BYTES and n_chunks > 1:
            rows = _rows_for(STREAM_CHUNK_BYTES, row_bytes, shape[0])
            found.append(
                f"{path}: tiny chunks ({chunk_bytes:,} bytes, {n_chunks:,} of them): streaming "
                f"pays a fixed cost per chunk. For streaming, rechunk: "
                f"{_repack(filename, path, rows, shape)}"
            )
    if entry.get("remainder"):
        found.append(
            f"{path}: get_queue({path!r}) streams {shape[0] - entry['remainder']:,} of "
            f"{shape[0]:,} rows in blocks of {entry['block_size']:,}; the last "
            f"{entry['remainder']:,} go to streamer.get_remainder({path!r}, "
            f"{entry['block_size']}), or pass remainder=True"
        )
    return found


def shuffle_note(entry: dict[str, Any]) -> str | None:
    """For a compressed (or virtual) dataset, ``entry`` of ``info.describe``: why the Loader's
    default shuffle of it is not uniform, and what a uniform one costs; None where it is."""
    shape = entry["shape"]
    if entry["filters"] == "none" or not shape or not shape[0]:
        return None
    return (f"{entry['path']}: the Loader's default shuffle here mixes windows of chunks (each "
            f"decoded once), not uniformly as on unfiltered data; window={shape[0]} shuffles "
            f"uniformly, holding {entry['nbytes'] / 1e6:,.1f} MB of decoded rows in memory")


def break_even_bytes(startup_s: float, h5py_mb_s: float, steady_mb_s: float) -> float | None:
    """Bytes per pass above which multitables (``startup_s`` to start, then ``steady_mb_s``)
    finishes before plain h5py (``h5py_mb_s`` from the start); None if it never does."""
    if steady_mb_s <= h5py_mb_s or h5py_mb_s <= 0:
        return None
    return startup_s / (1 / (h5py_mb_s * 1e6) - 1 / (steady_mb_s * 1e6))


def verdict(nbytes: int, h5py_mb_s: float, best_mb_s: float, startup_s: float,
            pass_s: float) -> list[str]:
    """Whether multitables or plain h5py is the better choice for passes of ``nbytes``, and where
    the break-even lies. ``pass_s`` is the best setting's time for the measured pass, start-up
    included; ``startup_s`` is the time to a queue's first block."""
    steady_s = max(pass_s - startup_s, 1e-9)
    steady = nbytes / steady_s / 1e6
    even = break_even_bytes(startup_s, h5py_mb_s, steady)
    lines = [f"start-up: a new queue's first block after {startup_s * 1e3:,.0f} ms; past it, "
             f"{steady:,.0f} MB/s ({best_mb_s:,.0f} MB/s over the whole pass, start-up "
             f"included, as in the table), against plain h5py's {h5py_mb_s:,.0f} MB/s"]
    if best_mb_s < h5py_mb_s:
        lines.append(f"plain h5py is the better choice for passes of {nbytes / 1e6:,.1f} MB: "
                     "worker start-up outweighs the parallel reads")
        if even is None:
            lines.append("multitables does not catch up at any size on this dataset here")
        else:
            lines.append(f"multitables pays off from about {even / 1e6:,.1f} MB per pass (or "
                         "when one Streamer serves several passes: its workers stand by)")
    else:
        ratio = f"multitables is {best_mb_s / h5py_mb_s:.2f}x plain h5py here"
        lines.append(ratio if even is None else
                     f"{ratio}; it pays off above about {even / 1e6:,.1f} MB per pass")
    return lines


def calls(filename: str, path: str, n_procs: int, block_size: int,
          uniform_shuffle: bool = True) -> list[str]:
    """The calls to make with the chosen ``n_procs`` and ``block_size``; ``uniform_shuffle``:
    whether the Loader's default shuffle of the dataset is uniform (unfiltered data)."""
    read_ahead = 2 * n_procs + 1
    return [
        "streaming:",
        f"    streamer = multitables.Streamer({filename!r})",
        f"    queue = streamer.get_queue({path!r}, n_procs={n_procs}, block_size={block_size}, "
        f"read_ahead={read_ahead})",
        "random access (two requests in flight per worker keep every worker busy):",
        f"    reader = multitables.Reader({filename!r}, n_procs={n_procs})",
        f"    pool = reader.get_dataset({path!r}).create_stage_pool(ROWS_PER_REQUEST, "
        f"{2 * n_procs})",
        "training:",
        f"    loader = multitables.Loader({filename!r}, [{path!r}], batch_size=BATCH, "
        f"shuffle=True, n_procs={n_procs})",
    ] + ([] if uniform_shuffle else [
        "    # compressed: the default shuffle mixes windows of chunks, each decoded once (not "
        "uniform); window=N_ROWS is uniform, with every row decoded in memory"])
