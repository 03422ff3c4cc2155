"""The ``python -m multitables`` command line: ``info``, ``bench`` and ``tune`` on a user's files.

Needs only numpy and h5py (and multitables itself for ``bench`` and ``tune``); matplotlib is used
for ``tune --plot`` when it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from multitables._hdf5.codecs import CODECS
from multitables._hdf5.remote import RemoteFile, file_of
from multitables._hdf5.source import (
    FileRef,
    default_n_procs,
    get_dataset,
    open_file,
    usable_cpus,
)
from multitables._tools import advice as _advice
from multitables._tools import measure as m
from multitables.loader import Loader
from multitables.streamer import Streamer

# Rows per batch of the Loader's row in ``bench``: a common training batch.
LOADER_BATCH = 256

# -------------------------------------------------------------------------------- progress


_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {n:,.0f}/{total:,.0f} MB, {rate_fmt}"


def _bar(label: str, total: int) -> tqdm:
    """The progress of one phase (``total`` bytes) on stderr, in MB and MB/s: redrawn in place
    and cleared when done on a terminal; in a log, its last state stays, one line a phase."""
    on_tty = sys.stderr.isatty()
    # A log gets the bar as it starts and as it ends: writing it per block is noise there.
    return tqdm(total=max(1, total) / 1e6, desc=label, unit="MB", file=sys.stderr,
                leave=not on_tty, mininterval=0.1 if on_tty else float("inf"),
                ascii=not on_tty, bar_format=_BAR_FORMAT)


def _ticks(bar: tqdm) -> Any:
    """The ``tick(nbytes)`` that the measuring functions call, moving ``bar``."""

    def tick(nbytes: int) -> None:
        bar.update(nbytes / 1e6)
        if bar.total is not None and bar.n > bar.total:  # a reader may read past its estimate
            bar.total = bar.n

    return tick


# -------------------------------------------------------------------------------- files


def _file(args: argparse.Namespace) -> FileRef:
    """``args.file`` as the read paths take it: the path, or a URL's ``RemoteFile`` reached
    with ``--storage-options`` (S3 settings not given there come from the AWS environment)."""
    options = None
    if getattr(args, "storage_options", None):
        try:
            options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: --storage-options is not JSON: {exc}") from None
    try:
        return file_of(args.file, options)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def _h5py_file(file: FileRef) -> Any:
    """What plain h5py opens for ``file``: the path, or a new block-cached file object over
    the object (a fresh cache each time, as a new ``h5py.File`` over fsspec would have)."""
    if isinstance(file, RemoteFile):
        from multitables._sources.blockfile import BlockFile
        return BlockFile(file.source)
    return file


# -------------------------------------------------------------------------------- info


def _filters(ds: Any) -> str:
    """The filter pipeline by name, read from the creation property list so plugins show too."""
    plist = ds.id.get_create_plist()
    names = []
    for i in range(plist.get_nfilters()):
        code, _flags, values, name = plist.get_filter(i)
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        name = name.split()[0] if name else f"filter{code}"
        spec = CODECS.get(code)
        shown = spec.show(values) if spec is not None and spec.show is not None else None
        names.append(shown or name)
    return "+".join(names) or "none"


def _virtual_sources(ds: Any) -> tuple[str, int]:
    """A virtual dataset's filters column ("virtual, N sources: their filters") and the bytes its
    sources store: its own pipeline is empty and it stores nothing, whatever its sources hold."""
    import h5py

    base = os.path.dirname(os.path.abspath(ds.file.filename))
    sources = {(vmap.file_name, vmap.dset_name) for vmap in ds.virtual_sources()}
    filters: set[str] = set()
    stored = 0
    for file_name, dset_name in sorted(sources):
        try:
            if file_name == ".":
                src = ds.file[dset_name]
                filters.add(_filters(src))
                stored += src.id.get_storage_size()
            else:
                with h5py.File(os.path.join(base, file_name), "r") as f:
                    src = f[dset_name]
                    filters.add(_filters(src))
                    stored += src.id.get_storage_size()
        except (OSError, KeyError):
            filters.add("missing source")
    return f"virtual, {len(sources)} sources: {', '.join(sorted(filters))}", stored


def _dtype(dt: np.dtype) -> str:
    if dt.names:
        parts = []
        for name in dt.names:
            sub = dt[name]
            base = sub.base.str.lstrip("<>|=")
            parts.append(f"{name}:{base}{list(sub.shape) if sub.shape else ''}")
        return "{" + ", ".join(parts) + "}"
    return str(dt)


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"


def describe(filename: FileRef) -> list[dict[str, Any]]:
    """One dict per dataset in the file: the facts ``info`` prints."""
    import h5py

    found: list[dict[str, Any]] = []

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        shape = tuple(obj.shape) if obj.shape is not None else ()
        entry = {
            "path": "/" + name, "shape": shape, "dtype": obj.dtype, "chunks": obj.chunks,
            "filters": _filters(obj), "nbytes": int(np.prod(shape, dtype=np.int64)) *
            obj.dtype.itemsize, "stored": obj.id.get_storage_size(), "block_size": None,
        }
        if obj.is_virtual and not isinstance(filename, RemoteFile):
            entry["filters"], entry["stored"] = _virtual_sources(obj)
        entry["remainder"] = None
        if len(shape) >= 1 and shape[0] > 0:
            entry["block_size"] = m.default_block_size(shape, obj.dtype, obj.chunks)
            # A queue streams whole blocks only, unless made with remainder=True.
            entry["remainder"] = shape[0] % entry["block_size"]
        found.append(entry)

    with open_file(filename, {}) as f:
        f.visititems(visit)
    return found


def cmd_info(args: argparse.Namespace) -> int:
    rows = [["path", "shape", "dtype", "chunks", "filters", "size", "stored", "block_size",
             "remainder"]]
    warnings: list[str] = []
    file = _file(args)
    found = describe(file)
    for d in found:
        warnings += _advice.layout_warnings(args.file, d)
        row_bytes = d["nbytes"] // d["shape"][0] if d["shape"] and d["shape"][0] else 0
        block = "-" if d["block_size"] is None else (
            f"{d['block_size']} ({d['block_size'] * row_bytes / m.MiB:.2f} MiB)")
        ratio = f" (x{d['nbytes'] / d['stored']:.1f})" if d["stored"] else ""
        rest = "-" if d["remainder"] is None else f"{d['remainder']} rows"
        rows.append([d["path"], str(d["shape"]), _dtype(d["dtype"]), str(d["chunks"]),
                     d["filters"], _mb(d["nbytes"]), _mb(d["stored"]) + ratio, block, rest])
    if len(rows) == 1:
        print(f"{args.file}: no datasets")
        return 0
    print(m.format_table(rows))
    if isinstance(file, RemoteFile):
        stats = file.source.stats
        print(f"\nopened {file} with {stats.requests} request(s), "
              f"{_mb(stats.bytes_fetched)} fetched (its metadata: every dataset's header; "
              f"median request {stats.percentile(50) * 1e3:.1f} ms)")
    print("\nremainder: the rows past the last whole block that get_queue(path) leaves to "
          "streamer.get_remainder(path, block_size);\nget_queue(path, remainder=True) streams "
          "them as a last, shorter block")
    if warnings:
        print("\nwarnings:")
        for line in warnings:
            print(f"  {line}")
    notes = [note for d in found if (note := _advice.shuffle_note(d)) is not None]
    if notes:
        print("\ntraining (the Loader's default shuffle is uniform on unfiltered data):")
        for line in notes:
            print(f"  {line}")
    return 0


# -------------------------------------------------------------------------------- bench


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
        return tuple(ds.shape), ds.dtype, ds.chunks, nbytes, _filters(ds)


def _run(readers: dict[str, Any], totals: dict[str, int], rounds: int, baseline: str
         ) -> m.Report:
    """:func:`m.run_rounds` with a progress bar: each reader gets ``tick`` as its one argument."""
    label = [""]

    def on_start(name: str, r: int) -> None:
        label[0] = f"{name}, round {r + 1}/{rounds}"

    def wrap(fn: Any, total: int) -> Any:
        def run() -> Any:
            with _bar(label[0], total) as bar:
                return fn(_ticks(bar))
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
            lambda tick: m.h5py_read_direct(_h5py_file(filename), path, block, tick),
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
                with _bar(f"writing {args.size_mb:g} MB sample {path}",
                          int(args.size_mb * 1e6)) as bar:
                    m.write_sample(sample, args.size_mb, _ticks(bar), path=path, **kw)
            filename: FileRef = sample
        else:
            filename, paths = _file(args), [args.path]
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
              f"{facts['chunks']}, {facts['filters']}, {_mb(facts['nbytes'])}"
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
    file = _file(args)
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
            return (lambda tick: m.h5py_read_direct(_h5py_file(file), args.path, b, tick,
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
          f"median of {args.rounds} round(s), up to {_mb(limit)} per run\n")
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
    for line in _advice.verdict(total, report.median("h5py"), report.median(best), startup,
                                pass_s):
        print(line)
    print()
    for line in _advice.calls(args.file, args.path, best_p, best_b,
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
    with _bar("warming page cache", os.path.getsize(filename)) as bar:
        m.warm_page_cache(filename, _ticks(bar))


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


# -------------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="multitables", description="Inspect, benchmark and tune multitables on HDF5 files.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list datasets with chunking, filters and block size")
    info.add_argument("file", help="a path, or a URL: s3://bucket/key.h5, http(s)://...")
    info.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="MB/s of h5py vs Streamer queue vs generator",
                       description="Stream a dataset with plain h5py and with multitables. With "
                       "no FILE PATH, a sample float32 (N, 1024) dataset in 1 MiB chunks, stored "
                       "plainly and with gzip, is written to a temporary directory and removed "
                       "afterwards.")
    b.add_argument("file", nargs="?")
    b.add_argument("path", nargs="?")
    b.add_argument("--n-procs", type=int, default=None, help="workers (default: min(4, cores))")
    b.add_argument("--block-size", type=int, default=None, help="rows per block (default: "
                   "whole chunks of about 1 MiB, as `info` suggests)")
    b.add_argument("--size-mb", type=float, default=256,
                   help="size of each sample dataset (default 256)")
    b.add_argument("--rounds", type=int, default=3, help="rounds, readers interleaved (default 3)")
    b.add_argument("--json", metavar="OUT", help="also write the results as JSON ('-': stdout)")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("tune", help="grid of block_size x n_procs; prints the best choice")
    t.add_argument("file")
    t.add_argument("path")
    t.add_argument("--block-sizes", type=int, nargs="+", help="rows (default: whole chunks "
                   "doubling from about 128 KiB, 6 sizes)")
    t.add_argument("--max-procs", type=int, default=None, help="n_procs 1..this (default: cores)")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--max-mb", type=float, default=512, help="stop each run after this many MB "
                   "(default 512; 0: whole dataset)")
    t.add_argument("--plot", metavar="PNG", help="write a plot (needs matplotlib)")
    t.add_argument("--json", metavar="OUT", help="also write the results as JSON ('-': stdout)")
    t.set_defaults(func=cmd_tune)
    for command in (info, b, t):
        command.add_argument(
            "--storage-options", metavar="JSON", help="for a URL: storage_options as JSON, "
            "e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\", \"anon\": true}' (S3 keys, "
            "region and endpoint otherwise come from the AWS environment)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    m.load_filter_plugins()
    for name in ("n_procs", "block_size", "rounds", "max_procs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:  # h5py's text is HDF5's error stack: say it plainly
        print(f"error: no such file: {getattr(args, 'file', None) or exc.filename}",
              file=sys.stderr)
        return 1
    except (KeyError, OSError) as exc:
        # A KeyError's text is the repr of its argument: print the argument.
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}",
              file=sys.stderr)
        return 1
