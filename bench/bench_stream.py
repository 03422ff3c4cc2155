"""Streaming whole datasets: h5py in one process vs multitables' queue and generator vs PyTorch.

    python bench/bench_stream.py [--files f32 f32_gzip ...] [--rounds 5] [--size-mb 1024]

For each benchmark file, every reader streams the whole dataset in blocks of the same size (whole
chunks of about 1 MiB), round-robin over the rounds. Two limits are measured in the same rounds:
a numpy copy of the same bytes (memory bandwidth), and for compressed files the single-core decode
rate of the same chunks (raw chunks read with ``read_direct_chunk``, decoded in this process, only
the decoding timed), times the core count. See bench/README.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

import common
import datafiles
import h5py
import numpy as np

import multitables
from multitables._hdf5.decode import inflate
from multitables._tools import measure as m

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
TARGETS = {  # (reader, over, at least): the bars of the Streamer issue, per file
    "f32": [("mt queue n_procs=2", "h5py read_direct", 1.5),
            ("mt queue n_procs=2, first pass", "h5py read_direct", 1.5),
            ("mt generator n_procs=2", "mt queue n_procs=2", 0.85),
            ("limit: generator's consumer", "mt queue n_procs=2", 0.85)],
    "f32_gzip": [("mt queue n_procs=2", "h5py read_direct", 1.85),
                 ("mt queue n_procs=2, first pass", "h5py read_direct", 1.85)],
    "f32_blosc": [("mt queue n_procs=2", "h5py read_direct", 2.2),
                  ("mt queue n_procs=2, first pass", "h5py read_direct", 2.2)],
}


# ------------------------------------------------------------------------------------------ limits


def numpy_copy(nbytes: int) -> Callable[[], tuple[int, float]]:
    """Copy ``nbytes`` between two 256 MiB buffers (more than any cache), 1 MiB at a time.

    The buffers live only during the call (touched before the clock starts), so they do not
    weigh on the process that the other readers run in (a fork copies its page tables).
    """
    size = min(nbytes, 256 * m.MiB)

    def run() -> tuple[int, float]:
        src = np.ones(size, np.uint8)
        dst = np.ones(size, np.uint8)
        t0 = time.perf_counter()
        done = 0
        while done < nbytes:
            n = min(size, nbytes - done)
            for off in range(0, n, m.MiB):
                np.copyto(dst[off:off + m.MiB], src[off:off + m.MiB])
            done += n
        return done, time.perf_counter() - t0

    return run


def consumer_rows(nbytes: int, row_shape: tuple[int, ...], dtype: np.dtype
                  ) -> Callable[[], tuple[int, float]]:
    """What a generator's consumer must do at least, in one process from private memory: copy
    each block of about 1 MiB out of a source buffer and loop over its rows (as ``mt_generator``
    does). No generator can beat this rate, whatever its workers do."""
    row_bytes = max(1, int(np.prod(row_shape)) * dtype.itemsize)
    rows = max(1, m.MiB // row_bytes)
    size = min(nbytes, 256 * m.MiB) // (rows * row_bytes) * rows

    def run() -> tuple[int, float]:
        src = np.ones((max(size, rows),) + tuple(row_shape), dtype)
        t0 = time.perf_counter()
        total = pending = 0
        while total + pending < nbytes:
            for start in range(0, len(src), rows):
                for row in src[start:start + rows].copy():
                    pending += row.nbytes
                    if pending >= m.MiB:
                        total += pending
                        pending = 0
        return total + pending, time.perf_counter() - t0

    return run


def _unshuffle(buf: bytes, itemsize: int) -> bytes:
    """HDF5's shuffle filter stores byte j of every element together; put them back."""
    a = np.frombuffer(buf, np.uint8)
    return a.reshape(itemsize, -1).T.tobytes()


def _decoders(ds: h5py.Dataset) -> list[Callable[[bytes, int], bytes]] | str:
    """One decoder per filter, in the order they were applied when writing; or why there is none."""
    plist = ds.id.get_create_plist()
    out: list[Callable[[bytes, int], bytes]] = []
    for i in range(plist.get_nfilters()):
        code = plist.get_filter(i)[0]
        if code == h5py.h5z.FILTER_DEFLATE:
            out.append(inflate)  # the deflate decoder multitables uses (libdeflate first)
        elif code == h5py.h5z.FILTER_SHUFFLE:
            out.append(lambda b, n, s=ds.dtype.itemsize: _unshuffle(b, s))
        elif code == h5py.h5z.FILTER_LZF:
            try:
                import lzf  # python-lzf on PyPI
            except ImportError:
                return "no lzf decoder (pip install python-lzf)"
            out.append(lambda b, n: lzf.decompress(b, n))
        elif code == 32001:  # Blosc (hdf5plugin writes Blosc 1 frames, which blosc2 reads)
            try:
                import blosc2
            except ImportError:
                return "no blosc decoder (pip install blosc2)"
            blosc2.set_nthreads(1)  # single-core rate; the core count multiplies it
            out.append(lambda b, n: blosc2.decompress(b))
        else:
            return f"no decoder for filter {code}"
    return out


def _decode(chunk: bytes, mask: int, decoders: list, nbytes: int) -> bytes:
    for i in reversed(range(len(decoders))):
        if not mask & (1 << i):  # a set bit: HDF5 skipped this filter for this chunk
            chunk = decoders[i](chunk, nbytes)
    return chunk


def decode_rate(filename: str, path: str) -> tuple[Callable[[], tuple[int, float]], str]:
    """A reader that decodes every chunk in this process and times only the decoding.

    Checks its own output against h5py's on the first chunk. Where a filter has no Python decoder,
    falls back to: one-process h5py read time minus the raw chunk read time, and says so.
    """
    with h5py.File(filename, "r") as f:
        ds = f[path]
        decoders = _decoders(ds)
        chunk_nbytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
        block = m.default_block_size(ds.shape, ds.dtype, ds.chunks)
        if not isinstance(decoders, str):
            info = ds.id.get_chunk_info(0)
            mask, raw = ds.id.read_direct_chunk(info.chunk_offset)
            first = np.frombuffer(_decode(raw, mask, decoders, chunk_nbytes), ds.dtype)
            rows = ds.chunks[0]
            if not np.array_equal(first.reshape((rows,) + ds.shape[1:]), ds[:rows]):
                raise AssertionError(f"{filename}: decoded chunk differs from h5py's")

    def raw_chunks(ds: h5py.Dataset):
        for i in range(ds.id.get_num_chunks()):
            yield ds.id.read_direct_chunk(ds.id.get_chunk_info(i).chunk_offset)

    def decoded() -> tuple[int, float]:
        total, secs = 0, 0.0
        with h5py.File(filename, "r") as f:
            for mask, raw in raw_chunks(f[path]):
                t0 = time.perf_counter()
                out = _decode(raw, mask, decoders, chunk_nbytes)
                secs += time.perf_counter() - t0
                total += len(out)
        return total, secs

    def estimated() -> tuple[int, float]:
        with h5py.File(filename, "r") as f:
            t0 = time.perf_counter()
            for _ in raw_chunks(f[path]):
                pass
            raw_secs = time.perf_counter() - t0
        t0 = time.perf_counter()
        total = m.h5py_read_direct(filename, path, block)
        return total, time.perf_counter() - t0 - raw_secs

    if isinstance(decoders, str):
        return estimated, f"estimated as h5py read minus raw chunk read ({decoders})"
    return decoded, "read_direct_chunk + Python decoders, decoding timed"


def _decode_share(filename: str, path: str, share: int, procs: int, barrier, conn) -> None:
    """One of ``parallel_decode``'s processes: read its chunks raw, wait, decode them, report."""
    with h5py.File(filename, "r") as f:
        ds = f[path]
        decoders = _decoders(ds)
        nbytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
        raw = [ds.id.read_direct_chunk(ds.id.get_chunk_info(i).chunk_offset)
               for i in range(share, ds.id.get_num_chunks(), procs)]
    barrier.wait()
    total = sum(len(_decode(chunk, mask, decoders, nbytes)) for mask, chunk in raw)
    conn.send((total, time.perf_counter()))


def parallel_decode(filename: str, path: str, procs: int) -> Callable[[], tuple[int, float]]:
    """``procs`` processes decoding their shares of the chunks at once, from chunks read raw
    beforehand: what the cores decode together, sharing caches and the memory bus, where the
    single-core rate times the core count assumes they share nothing."""
    ctx = multiprocessing.get_context("fork")

    def run() -> tuple[int, float]:
        barrier = ctx.Barrier(procs + 1)
        pipes = [ctx.Pipe(duplex=False) for _ in range(procs)]
        children = [ctx.Process(target=_decode_share, args=(filename, path, i, procs, barrier, w))
                    for i, (_, w) in enumerate(pipes)]
        for child in children:
            child.start()
        try:
            barrier.wait(timeout=300)
            t0 = time.perf_counter()  # CLOCK_MONOTONIC: the children's clocks are the same
            results = [r.recv() for r, _ in pipes]
        finally:
            for child in children:
                child.join(10)
                if child.exitcode is None:
                    child.kill()
        return sum(n for n, _ in results), max(t for _, t in results) - t0

    return run


# ------------------------------------------------------------------------------------------ main


def bench_file(name: str, filename: str, path: str, args: argparse.Namespace, torch) -> dict:
    with h5py.File(filename, "r") as f:
        ds = f[path]
        shape, dtype, chunks = ds.shape, ds.dtype, ds.chunks
        nbytes = ds.size * ds.dtype.itemsize
        filtered = ds.id.get_create_plist().get_nfilters() > 0
    block = m.default_block_size(shape, dtype, chunks)
    readers: dict[str, Callable] = {
        "h5py read_direct": lambda: m.h5py_read_direct(filename, path, block),
        "h5py ds[i:i+b]": lambda: m.h5py_slices(filename, path, block),
    }
    # One Streamer for the rounds, as a training loop keeps one across epochs: its workers start
    # before the first round and stand by between passes. The "first pass" line starts and ends
    # a new Streamer's workers inside every timed pass.
    streamer = multitables.Streamer(filename)
    m.mt_queue(filename, path, 2, block, max_blocks=1, streamer=streamer)
    for p in (1, 2):
        readers[f"mt queue n_procs={p}"] = lambda p=p: m.mt_queue(
            filename, path, p, block, streamer=streamer)
    readers["mt queue n_procs=2, first pass"] = lambda: m.mt_queue(filename, path, 2, block)
    for p in (1, 2):
        readers[f"mt generator n_procs={p}"] = lambda p=p: m.mt_generator(
            filename, path, p, block, streamer=streamer)
    if torch is not None:
        readers["torch DataLoader w=2"] = lambda: common.torch_stream(filename, path, block, 2)
    readers["limit: numpy copy"] = numpy_copy(nbytes)
    readers["limit: generator's consumer"] = consumer_rows(nbytes, shape[1:], dtype)
    how = None
    if filtered:
        readers["limit: decode 1 core"], how = decode_rate(filename, path)
        if not how.startswith("estimated"):
            readers[f"limit: decode, {CORES} procs at once"] = parallel_decode(filename, path,
                                                                       CORES)
    with streamer:
        report = m.run_rounds(readers, args.rounds, baseline="h5py read_direct")

    limit, limit_name = report.median("limit: numpy copy"), "memcpy"
    if "limit: decode 1 core" in readers:
        # One h5py process decodes too, so its rate is also a floor for one core's decode rate:
        # where HDF5's codec builds beat the Python ones, the limit follows HDF5's.
        one_core = max(report.median("limit: decode 1 core"), report.median("h5py read_direct"))
        if report.median("h5py read_direct") > report.median("limit: decode 1 core"):
            how = f"{how}; slower than one h5py process, whose rate is used instead"
        if one_core * CORES < limit:
            limit, limit_name = one_core * CORES, f"decode x{CORES}"
    print(f"\n== {name}: {datafiles.SPECS[name].what}\n   {shape}, {nbytes / 1e6:,.0f} MB, "
          f"block_size {block} rows, {args.rounds} rounds; limit = {limit_name} "
          f"= {limit:,.0f} MB/s" + (f"\n   decode: {how}" if how else ""))
    print(report.table(limit, limit_name))
    consumer = report.median("limit: generator's consumer")
    one_worker = report.median("mt queue n_procs=1")
    # The generator's consumer copies every row while the workers read: on CORES cores both
    # kinds of work share the CPUs, and the consumer alone is serial.
    bound = min(consumer, CORES / (1 / consumer + 1 / one_worker))
    print(f"generator bound on {CORES} cores (consumer + workers' CPU time shared): "
          f"{bound:,.0f} MB/s = {bound / report.median('mt queue n_procs=2'):.2f}x the queue")
    lines = []
    for reader, over, target in TARGETS.get(name, []):
        lines.append(m.check(f"{reader} / {over}", report.median_ratio(reader, over), target))
    if lines:
        print("targets (median of per-round ratios):\n" + "\n".join(lines))
    return {"shape": shape, "dtype": str(dtype), "chunks": chunks, "nbytes": nbytes,
            "generator_bound_mb_per_s": bound,
            "block_size": block, "limit_mb_per_s": limit, "limit": limit_name, "decode": how,
            "report": report.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=5)
    p.add_argument("--files", nargs="+", choices=list(datafiles.SPECS), default=list(
        datafiles.SPECS))
    args = p.parse_args(argv)
    return common.run_files(args, "stream", f"{CORES} cores", bench_file)


if __name__ == "__main__":
    sys.exit(main())
