"""``python -m multitables bench`` and ``tune``: a dataset streamed by plain h5py and by
multitables, and the grid of settings that finds the best (internal)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from .._hdf5.remote import RemoteFile
from .._hdf5.source import FileRef, default_n_procs, get_dataset, open_file, usable_cpus
from ..loader import Loader
from ..streamer import Streamer
from . import advice
from . import measure as m
from .files import file_arg, h5py_file
from .info import filters_of
from .progress import mb, progress_bar, ticks

# Rows per batch of the Loader's row in ``bench``: a common training batch.
LOADER_BATCH = 256


def _dataset_facts(filename: FileRef, path: str
                   ) -> tuple[tuple[int, ...], np.dtype, Any, int]:
    shape, dtype, chunks, nbytes, _ = _dataset_facts_and_filters(filename, path)
    return shape, dtype, chunks, nbytes


def _dataset_facts_and_filters(filename: FileRef, path: str):
    with open_file(filename, {}) as f:
        try:
            ds = get_dataset(f, path)
        except (KeyError, TypeError) as exc:  # no such path, or a group
            raise SystemExit(f"error: {exc.args[0]}") from None
        if not ds.shape or ds.shape[0] == 0:
            raise SystemExit(f"error: {path!r} in {filename} is empty or scalar")
        nbytes = ds.shape[0] * ds.dtype.itemsize * int(np.prod(ds.shape[1:], dtype=np.int64))
        return tuple(ds.shape), ds.dtype, ds.chunks, nbytes, filters_of(ds)


def _run(readers: dict[str, Any], totals: dict[str, int], rounds: int, baseline: str
         ) -> m.Report:
    """:func:`m.run_rounds` with a progress bar: each reader gets ``tick`` as its one argument."""
    label = [""]

    def on_start(name: str, r: int) -> None:
        label[0] = f"{name}, round {r + 1}/{rounds}"

    def wrap(fn: Any, total: int) -> Any:
        def run() -> Any:
            with progress_bar(label[0], total) as bar:
                return fn(ticks(bar))
        return run

    wrapped = {name: wrap(fn, totals[name]) for name, fn in readers.items()}
    return m.run_rounds(wrapped, rounds, baseline=baseline, on_start=on_start)


def bench(filename: FileRef, path: str, n_procs: int, block_size: int | None, rounds: int
          ) -> tuple[m.Report, dict[str, Any]]:
    """Stream one dataset with plain h5py, the Streamer's queue and its generator, round-robin."""
    shape, dtype, chunks, nbytes, filters = _dataset_facts_and_filters(filename, path)
    block = block_size or m.default_block_size(shape, dtype, chunks)
    _warm(filename)
    # One Streamer for the rounds, as a training loop keeps one across epochs: its workers start
    # before the first round and stand by between passes. The "first pass" reader makes a new
    # Streamer each time, so starting and ending its workers is part of its pass.
    streamer = Streamer(filename)
    m.mt_queue(filename, path, n_procs, block, max_blocks=1, streamer=streamer)
    # Training reads: shuffled batches of 256 rows, a new epoch each round, on one Loader.
    loader = Loader(filename, path, LOADER_BATCH, shuffle=True, n_procs=n_procs)
    readers = {
        "h5py read_direct":
            lambda tick: m.h5py_read_direct(h5py_file(filename), path, block, tick),
        f"Streamer queue (n_procs={n_procs})":
            lambda tick: m.mt_queue(filename, path, n_procs, block, tick, streamer=streamer),
        "Streamer queue, first pass":
            lambda tick: m.mt_queue(filename, path, n_procs, block, tick),
        f"Streamer generator (n_procs={n_procs})":
            lambda tick: m.mt_generator(filename, path, n_procs, block, tick, streamer=streamer),
        f"Loader, shuffled epoch (n_procs={n_procs})":
            lambda tick: m.mt_loader_epoch(loader, tick),
    }
    with streamer, loader:
        report = _run(readers, dict.fromkeys(readers, nbytes), rounds, "h5py read_direct")
    facts = {"file": str(filename), "path": path, "shape": shape, "dtype": str(dtype),
             "chunks": chunks, "filters": filters, "nbytes": nbytes, "block_size": block,
             "n_procs": n_procs, "rounds": rounds}
    return report, facts


def cmd_bench(args: argparse.Namespace) -> int:
    tmpdir = None
    if (args.file is None) != (args.path is None):
        raise SystemExit("error: give both FILE and PATH, or neither (to bench a sample file)")
    results = []
    try:
        if args.file is None:
            # The sample: the same data stored plainly and with gzip, where parallel decoding
            # shows; uncompressed streaming is bound by memory bandwidth and worker start-up.
            tmpdir = tempfile.mkdtemp(prefix="multitables-bench-")
            sample = os.path.join(tmpdir, "sample.h5")
            paths = ["/data", "/data_gzip"]
            filters: list[dict[str, Any]] = [{}, {"compression": "gzip"}]
            for path, kw in zip(paths, filters, strict=True):
                with progress_bar(f"writing {args.size_mb:g} MB sample {path}",
                          int(args.size_mb * 1e6)) as bar:
                    m.write_sample(sample, args.size_mb, ticks(bar), path=path, **kw)
            filename: FileRef = sample
        else:
            filename, paths = file_arg(args), [args.path]
        n_procs = args.n_procs or default_n_procs()
        for path in paths:
            results.append(bench(filename, path, n_procs, args.block_size, args.rounds))
        remote = filename if isinstance(filename, RemoteFile) else None
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    for report, facts in results:
        row_bytes = facts["nbytes"] // facts["shape"][0]
        print(f"{facts['file']} {facts['path']}: {facts['dtype']} {facts['shape']}, chunks "
              f"{facts['chunks']}, {facts['filters']}, {mb(facts['nbytes'])}"
              + (" (sample, removed)" if tmpdir else ""))
        print(f"block_size {facts['block_size']} rows "
              f"({facts['block_size'] * row_bytes / m.MiB:.2f} MiB), n_procs {facts['n_procs']}, "
              f"{args.rounds} round(s), "
              + ("over the network" if remote else "page cache warm")
              + f", {usable_cpus()} core(s)\n")
        print(report.table())
        print("(first pass: a new Streamer, its workers started and ended within the pass; the "
              "other Streamer rows reuse one Streamer, as epochs do; the Loader plays a new "
              f"shuffled epoch of batches of {LOADER_BATCH} each round)\n")
    if args.json:
        m.dump_json(args.json, {"command": "bench", "results": [
            {**facts, "report": report.to_dict()} for report, facts in results]})
    return 0


# -------------------------------------------------------------------------------- tune


def _grid(shape: tuple[int, ...], dtype: np.dtype, chunks: Any, count: int = 6) -> list[int]:
    """Block sizes to try: whole chunks (or rows, if contiguous) doubling from about 128 KiB."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize)
    unit = chunks[0] if chunks else 1
    k = 1
    while k * unit * row_bytes < 128 * 1024 and k * unit < shape[0]:
        k *= 2
    sizes: list[int] = []
    while len(sizes) < count and k * unit <= shape[0]:
        sizes.append(k * unit)
        k *= 2
    return sizes or [min(unit, shape[0])]


def cmd_tune(args: argparse.Namespace) -> int:
    file = file_arg(args)
    shape, dtype, chunks, nbytes = _dataset_facts(file, args.path)
    row_bytes = nbytes // shape[0]
    blocks = args.block_sizes or _grid(shape, dtype, chunks)
    procs = list(range(1, (args.max_procs or usable_cpus()) + 1))
    limit = int(args.max_mb * 1e6) if args.max_mb else nbytes
    _warm(file)

    def cell(b: int, p: int | None) -> tuple[Any, int]:
        max_blocks = max(1, limit // (b * row_bytes))
        total = min(nbytes, max_blocks * b * row_bytes)
        if p is None:
            return (lambda tick: m.h5py_read_direct(h5py_file(file), args.path, b, tick,
                                                    max_blocks), total)
        return (lambda tick: m.mt_queue(file, args.path, p, b, tick, max_blocks=max_blocks),
                total)

    default = m.default_block_size(shape, dtype, chunks)
    cells = {"h5py": cell(default, None)}
    cells.update({f"{b}x{p}": cell(b, p) for b in blocks for p in procs})
    report = _run({k: v[0] for k, v in cells.items()}, {k: v[1] for k, v in cells.items()},
                  args.rounds, "h5py")
    best = max((k for k in cells if k != "h5py"), key=report.median)
    rows = [["block_size", "MiB"] + [f"n_procs={p}" for p in procs]]
    for b in blocks:
        row = [str(b), f"{b * row_bytes / m.MiB:.2f}"]
        for p in procs:
            key = f"{b}x{p}"
            row.append(f"{report.median(key):,.0f}" + ("*" if key == best else " "))
        rows.append(row)
    print(f"{args.file} {args.path}: {dtype} {shape}, chunks {chunks}; MB/s of the direct queue, "
          f"median of {args.rounds} round(s), up to {mb(limit)} per run\n")
    print(m.format_table(rows))
    best_b, best_p = (int(v) for v in best.split("x"))
    print(f"\nh5py read_direct (block_size={default}): {report.median('h5py'):,.0f} MB/s")
    print(f"best: block_size={best_b} n_procs={best_p}: {report.median(best):,.0f} MB/s, "
          f"{report.median_ratio(best):.2f}x h5py")
    # The time to a first block: what a pass pays before the parallel reads, against h5py.
    startup = sorted(
        _timed(lambda: m.mt_queue(file, args.path, best_p, best_b, max_blocks=1))
        for _ in range(max(1, args.rounds)))[max(1, args.rounds) // 2]
    passes = report.seconds[best]
    pass_s = sorted(passes)[len(passes) // 2]
    total = cells[best][1]
    for line in advice.verdict(total, report.median("h5py"), report.median(best), startup,
                                pass_s):
        print(line)
    print()
    for line in advice.calls(args.file, args.path, best_p, best_b,
                              uniform_shuffle=_uniform_shuffle(file, args.path)):
        print(line)
    if args.json:
        m.dump_json(args.json, {"command": "tune", "file": args.file, "path": args.path,
                                "best": {"block_size": best_b, "n_procs": best_p},
                                "report": report.to_dict()})
    if args.plot:
        _plot(args.plot, report, blocks, procs, row_bytes, (best_b, best_p),
              f"{os.path.basename(args.file)} {args.path}")
    return 0


def _uniform_shuffle(filename: FileRef, path: str) -> bool:
    """Whether the Loader's default shuffle of ``path`` is uniform: its rows are read from the
    file (unfiltered, not virtual), so a window of every row costs no memory."""
    from multitables._hdf5.source import describe as describe_dataset
    from multitables._loader.columns import unfiltered

    return unfiltered(filename, [describe_dataset(filename, path, {})], {})


def _warm(filename: FileRef) -> None:
    if isinstance(filename, RemoteFile):
        return  # no page cache to warm: every reader fetches over the network
    with progress_bar("warming page cache", os.path.getsize(filename)) as bar:
        m.warm_page_cache(filename, ticks(bar))


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _plot(out: str, report: m.Report, blocks: list[int], procs: list[int], row_bytes: int,
          best: tuple[int, int], what: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib, which is not installed; table only", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    mib = [b * row_bytes / m.MiB for b in blocks]
    for p in procs:
        ax.plot(mib, [report.median(f"{b}x{p}") for b in blocks], "o-", label=f"n_procs={p}")
    ax.axhline(report.median("h5py"), color="gray", ls="--", label="h5py read_direct")
    best_b, best_p = best
    ax.plot([best_b * row_bytes / m.MiB], [report.median(f"{best_b}x{best_p}")], "*",
            color="red", markersize=16, label=f"best: block_size={best_b}, n_procs={best_p}")
    ax.set(xscale="log", xlabel="block size (MiB)", ylabel="MB/s",
           title=f"multitables tune: {what}")
    ax.legend()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    print(f"plot written to {out}")
