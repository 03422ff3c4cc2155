"""Shuffled training epochs: the Loader against the Streamer's sequential queue and torch on h5py.

    python bench/bench_loader.py [--files f32 img_gzip table] [--rounds 3] [--size-mb 1024]

Every reader delivers batches of 256 rows with 2 worker processes, round-robin over the rounds:
  - ``mt Loader``: ``multitables.Loader(shuffle=True)`` with its default window (uniform on
    unfiltered data, a window of chunks on compressed data), batches the caller owns
    (``copy=True``); the same with ``copy=False`` (batches lent until the next one); a uniform
    shuffle (``window`` = every row) where the default is not one; and where the default is
    uniform, the window of chunks that was the default before (``old default``). One Loader per
    setting is kept for all rounds, as a training loop keeps one across epochs, and each round
    plays another epoch (``set_epoch``), timed from the start of the iteration to its last batch.
  - ``mt queue``: the Streamer's sequential queue over the same file (the baseline, the rate of
    reading every row once in file order): ``get_queue(path, n_procs=2, remainder=True)``,
    blocks drained, on one Streamer kept for all rounds.
  - ``torch DataLoader w=2``: shuffled batches of 256 rows drawn from h5py by a DataLoader with
    2 workers (a Dataset whose ``__getitems__`` reads the sorted indices of a batch, each worker
    opening the file lazily), over the first ``--torch-batches`` batches of a random permutation,
    timed from the first batch received (so its workers' start-up is left out).
The files: ``f32`` (uncompressed float32 rows of 4 KiB), ``img_gzip`` with a labels column (a
copy of the image dataset, its chunks copied as they are, beside int64 labels, made once in the
cache directory: the Loader reads the columns of one file), and ``table`` (the PyTables table,
its three fields as the Loader's columns). Samples/s counts rows of every column; the queue
streams the image dataset alone on ``img_gzip``. Shuffle quality, per batch: distinct chunks (of
the largest column), the fraction of consecutive rows that are neighbours in the file
(``multitables._loader.order.shuffle_quality``) and the fraction that lie in the same chunk
(``same chunk``; a uniform shuffle gives about chunk rows / rows). See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import common
import datafiles
import h5py
import numpy as np

import multitables
from multitables._loader.order import shuffle_quality
from multitables._tools import measure as m

BATCH = 256
N_PROCS = 2
LABELS_VERSION = 1  # bump when the labelled copy's recipe changes
QUEUE = f"mt queue n_procs={N_PROCS}"
TORCH = "torch DataLoader w=2"
DEFAULT = "mt Loader window=default"
UNIFORM = "mt Loader window=all (uniform)"
NO_COPY = "mt Loader copy=False"
OLD_DEFAULT = "mt Loader window=16 chunks (old default)"
TARGETS = {  # (reader, over, at least): the bars of the Loader issue, per file, on samples/s
    "f32": [(DEFAULT, QUEUE, 0.7), (UNIFORM, QUEUE, 0.4), (DEFAULT, TORCH, 10)],
    "img_gzip": [(DEFAULT, QUEUE, 0.9), (DEFAULT, TORCH, 10)],
    "table": [(DEFAULT, TORCH, 10)],
}


@dataclass
class Pass:
    """What one reader did in one round."""

    rows: int
    seconds: float
    first_batch_s: float  # from asking for the epoch to holding its first batch


@dataclass
class Results:
    """Every round of every reader, and the figures derived from them."""

    passes: dict[str, list[Pass]] = field(default_factory=dict)

    def rate(self, name: str, round_: int) -> float:
        p = self.passes[name][round_]
        return p.rows / p.seconds if p.seconds > 0 else float("nan")

    def median_rate(self, name: str) -> float:
        return statistics.median(self.rate(name, r) for r in range(len(self.passes[name])))

    def ratios(self, name: str, over: str) -> list[float]:
        """Per-round ratios of samples/s: both ran in the same round, so drift cancels out."""
        return [self.rate(name, r) / self.rate(over, r) for r in range(len(self.passes[name]))]

    def median_ratio(self, name: str, over: str) -> float:
        return statistics.median(self.ratios(name, over))


def run_rounds(readers: dict[str, Callable[[int], Pass]], rounds: int) -> Results:
    """Every reader once per round, round-robin, the start rotating (as
    ``multitables._tools.measure.run_rounds``)."""
    results = Results({name: [] for name in readers})
    names = list(readers)
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            results.passes[name].append(readers[name](r))
    return results


# ------------------------------------------------------------------------------------ the files


def labelled_images(filename: str, path: str) -> str:
    """A copy of the image dataset ``path`` of ``filename`` as ``/images``, beside ``/labels``
    (int64 in gzip chunks of 1024 rows), written once next to it and reused after that."""
    out = f"{os.path.splitext(filename)[0]}-labels-v{LABELS_VERSION}.h5"
    if os.path.exists(out):
        return out
    partial = f"{out}.partial-{os.getpid()}"
    try:
        with h5py.File(filename, "r") as src, h5py.File(partial, "w") as dst:
            src.copy(src[path], dst, name="images")  # H5Ocopy: chunks copied, not recompressed
            n = dst["images"].shape[0]
            labels = np.random.default_rng(3).integers(0, 10, n)
            dst.create_dataset("labels", data=labels, chunks=(1024,), compression="gzip")
        os.replace(partial, out)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return out


@dataclass
class Setup:
    """One benchmark file as the readers see it."""

    filename: str
    columns: dict[str, str]  # the Loader's columns
    queue_path: str  # what the queue streams
    torch_paths: list[str]  # what the torch Dataset reads per batch
    n_rows: int
    chunk_rows: int  # of the largest column: the chunks the shuffle quality counts
    row_bytes: int  # of all columns
    queue_row_bytes: int


def setup(name: str, filename: str, path: str) -> Setup:
    if name == "img_gzip":
        filename = labelled_images(filename, path)
        m.warm_page_cache(filename)
        columns = {"image": "/images", "label": "/labels"}
        queue_path, torch_paths = "/images", ["/images", "/labels"]
    elif name == "table":
        with h5py.File(filename, "r") as f:
            fields = f[path].dtype.names
        columns = {field: f"{path}/{field}" for field in fields}
        queue_path, torch_paths = path, [path]
    else:
        columns, queue_path, torch_paths = {"x": path}, path, [path]
    with h5py.File(filename, "r") as f:
        datasets = [f[p] for p in torch_paths]
        biggest = max(datasets, key=lambda d: d.dtype.itemsize * int(np.prod(d.shape[1:])))
        row_bytes = [d.dtype.itemsize * int(np.prod(d.shape[1:])) for d in datasets]
        return Setup(filename, columns, queue_path, torch_paths, datasets[0].shape[0],
                     biggest.chunks[0], sum(row_bytes), row_bytes[0])


# ------------------------------------------------------------------------------------ the readers


def loader_epoch(loader: multitables.Loader) -> Callable[[int], Pass]:
    """Round ``r`` plays epoch ``r`` of a Loader whose workers stand by between epochs."""

    def run(r: int) -> Pass:
        loader.set_epoch(r)
        rows, first = 0, 0.0
        t0 = time.perf_counter()
        for batch in loader:
            if not rows:
                first = time.perf_counter() - t0
            rows += len(next(iter(batch.values())))
        return Pass(rows, time.perf_counter() - t0, first)

    return run


def queue_epoch(streamer: multitables.Streamer, path: str, block: int) -> Callable[[int], Pass]:
    def run(r: int) -> Pass:
        rows, first = 0, 0.0
        t0 = time.perf_counter()
        with streamer.get_queue(path, n_procs=N_PROCS, block_size=block, remainder=True) as q:
            for guard in q.iter():
                with guard as b:
                    if not rows:
                        first = time.perf_counter() - t0
                    rows += len(b)
        return Pass(rows, time.perf_counter() - t0, first)

    return run


class H5Columns:
    """Rows of several h5py datasets of one file, aligned: ``__getitems__`` (what a batch
    sampler calls) returns a tensor per dataset, rows at the sorted indices (h5py wants them
    increasing). Each worker opens the file lazily, on its first batch."""

    def __init__(self, filename: str, paths: list[str]):
        self.rows = [common.H5Rows(filename, p) for p in paths]

    def __len__(self) -> int:
        return len(self.rows[0])

    def __getitems__(self, indices: list[int]):
        return tuple(rows.__getitems__(indices) for rows in self.rows)


def _identity(batch):
    return batch


def torch_batches(s: Setup, n_batches: int) -> Callable[[int], Pass]:
    """Round ``r``: the first ``n_batches`` batches of permutation ``r`` of the rows."""
    from torch.utils.data import DataLoader

    def run(r: int) -> Pass:
        order = np.random.default_rng(r).permutation(s.n_rows)
        batches = [order[i:i + BATCH].tolist() for i in range(0, n_batches * BATCH, BATCH)]
        dataset = H5Columns(s.filename, s.torch_paths)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=2, collate_fn=_identity)
        rows, first, t1 = 0, 0.0, 0.0
        t0 = time.perf_counter()
        for k, batch in enumerate(loader):
            if k == 0:
                t1 = time.perf_counter()  # workers are up; leave their start-up out
                first = t1 - t0
            else:
                rows += len(batch[0])
        return Pass(rows, time.perf_counter() - t1, first)

    return run


def check_first_batch(loader: multitables.Loader, s: Setup) -> None:
    """A benchmark of wrong answers would be worthless: epoch 0's first batch against h5py."""
    rows = loader.order(0).rows(0, BATCH)
    loader.set_epoch(0)
    it = iter(loader)
    batch = {name: np.array(column) for name, column in next(it).items()}  # a lease ends below
    it.close()  # hands the workers back
    sorter = np.argsort(rows)
    with h5py.File(s.filename, "r") as f:
        for name, path in s.columns.items():
            table, _, fld = path.rpartition("/")
            try:
                got = f[path][rows[sorter]]
            except KeyError:  # a field of a table
                got = f[table].fields(fld)[rows[sorter]]
            expected = np.empty_like(got)
            expected[sorter] = got
            if not np.array_equal(np.asarray(batch[name]), expected):
                raise AssertionError(f"{s.filename}: Loader column {name!r} differs from h5py's")


def old_default_window(loader: multitables.Loader) -> int:
    """The default window before unfiltered data got a uniform one: at least 16 chunks and
    about 32 MiB of rows, in whole units."""
    from multitables._loader.job import costliest_chunk_rows

    infos = loader.epochs.columns.infos
    row_bytes = sum(max(info.row_bytes, 1) for info in infos)
    units = -(-loader.n_rows // loader.unit_rows)
    by_bytes = -(-(32 << 20) // (loader.unit_rows * row_bytes))
    chunk_rows = min(costliest_chunk_rows(infos) or loader.unit_rows, loader.unit_rows)
    by_chunks = -(-16 * chunk_rows // loader.unit_rows)
    return min(units, max(by_chunks, by_bytes)) * loader.unit_rows


def same_chunk(batches: list[np.ndarray], chunk_rows: int) -> float:
    """The fraction of consecutive rows of a batch that lie in the same chunk."""
    pairs = sum(max(len(b) - 1, 0) for b in batches)
    same = sum(int(np.count_nonzero(np.diff(b // chunk_rows) == 0)) for b in batches)
    return same / pairs if pairs else 0.0


def quality_of(batches: list[np.ndarray], chunk_rows: int) -> tuple[float, float, float]:
    """(distinct chunks per batch, file-neighbour pairs, same-chunk pairs)."""
    return (*shuffle_quality(batches, chunk_rows), same_chunk(batches, chunk_rows))


def loader_quality(loader: multitables.Loader, s: Setup) -> tuple[float, float, float]:
    rows = loader.order(0).rows(0, s.n_rows)
    return quality_of([rows[i:i + BATCH] for i in range(0, len(rows), BATCH)], s.chunk_rows)


# ------------------------------------------------------------------------------------------ main


def bench_file(name: str, filename: str, path: str, args: argparse.Namespace, torch) -> dict:
    s = setup(name, filename, path)
    with h5py.File(s.filename, "r") as f:
        ds = f[s.queue_path]
        block = m.default_block_size(ds.shape, ds.dtype, ds.chunks)
    settings: dict[str, dict] = {DEFAULT: {}, NO_COPY: {"copy": False}}
    with multitables.Loader(s.filename, s.columns, BATCH, shuffle=True, n_procs=1) as probe:
        if probe.window < s.n_rows:
            settings[UNIFORM] = {"window": s.n_rows}
        else:
            settings[OLD_DEFAULT] = {"window": old_default_window(probe)}
    loaders = {label: multitables.Loader(s.filename, s.columns, BATCH, shuffle=True, seed=1,
                                         n_procs=N_PROCS, **kw)
               for label, kw in settings.items()}
    streamer = multitables.Streamer(s.filename)
    try:
        readers: dict[str, Callable[[int], Pass]] = {
            label: loader_epoch(loader) for label, loader in loaders.items()}
        readers[QUEUE] = queue_epoch(streamer, s.queue_path, block)
        if torch is not None:
            readers[TORCH] = torch_batches(s, args.torch_batches)
        quality = {label: loader_quality(loader, s) for label, loader in loaders.items()}
        quality[QUEUE] = quality_of([np.arange(i, min(i + block, s.n_rows))
                                     for i in range(0, s.n_rows, block)], s.chunk_rows)
        drawn = np.random.default_rng(0).permutation(s.n_rows)[:args.torch_batches * BATCH]
        quality[TORCH] = quality_of([np.sort(drawn[i:i + BATCH])  # rows come back sorted
                                     for i in range(0, len(drawn), BATCH)], s.chunk_rows)
        for loader in loaders.values():  # workers up, answers right
            check_first_batch(loader, s)
        queue_epoch(streamer, s.queue_path, block)(0)
        new_first = []
        for _ in range(args.rounds):  # a new Loader's first batch: workers start, file opens
            t0 = time.perf_counter()
            with multitables.Loader(s.filename, s.columns, BATCH, shuffle=True,
                                    n_procs=N_PROCS) as fresh:
                it = iter(fresh)
                next(it)
                new_first.append(time.perf_counter() - t0)
                it.close()
        results = run_rounds(readers, args.rounds)
    finally:
        for loader in loaders.values():
            loader.close()
        streamer.close()
    return report(name, s, block, results, quality, new_first, args)


def gather_rate(row_bytes: int, seconds: float = 0.5) -> float:
    """Bytes per second one core gathers batches of BATCH random rows (``np.take`` into a new
    array) from a window in memory: the copy a shuffled batch costs its consumer at least."""
    region = np.ones(((64 << 20) // row_bytes, row_bytes), np.uint8)
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(3):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            np.take(region, rng.integers(0, len(region), BATCH), axis=0)
            n += 1
        rates.append(n * BATCH * row_bytes / (time.perf_counter() - t0))
    return statistics.median(rates)


def decode_bound(queue_bytes_per_s: float, gather_bytes_per_s: float) -> float:
    """The most a shuffled epoch can reach, as a ratio to the queue, when the queue's workers
    keep every core busy decoding: the same decoding, plus one gather of every byte by the
    consumer on the same cores. Per byte, N / queue + 1 / gather core-seconds."""
    n = N_PROCS
    return n / (n + queue_bytes_per_s / gather_bytes_per_s)


def report(name: str, s: Setup, block: int, results: Results,
           quality: dict[str, tuple[float, float, float]], new_first: list[float],
           args: argparse.Namespace) -> dict:
    has_torch = TORCH in results.passes
    head = ["reader", "samples/s", "MB/s", "x queue"] + (["x torch"] if has_torch else []) + [
        "first batch ms", "chunks/batch", "neighbours", "same chunk", "per round x queue"]
    rows, out = [head], {}
    for reader in results.passes:
        row_bytes = s.queue_row_bytes if reader == QUEUE else s.row_bytes
        rate = results.median_rate(reader)
        first = statistics.median(p.first_batch_s for p in results.passes[reader])
        chunks, neighbours, same = quality[reader]
        row = [reader, f"{rate:,.0f}", f"{rate * row_bytes / 1e6:,.0f}",
               f"{results.median_ratio(reader, QUEUE):.2f}"]
        if has_torch:
            row.append(f"{results.median_ratio(reader, TORCH):.1f}")
        row += [f"{first * 1e3:.1f}", f"{chunks:.1f}", f"{neighbours:.1%}", f"{same:.1%}",
                " ".join(f"{x:.2f}" for x in results.ratios(reader, QUEUE))]
        rows.append(row)
        out[reader] = {
            "samples_per_s": [results.rate(reader, r) for r in range(args.rounds)],
            "median_samples_per_s": rate, "median_mb_per_s": rate * row_bytes / 1e6,
            "row_bytes": row_bytes,
            "seconds": [p.seconds for p in results.passes[reader]],
            "rows": [p.rows for p in results.passes[reader]],
            "first_batch_s": [p.first_batch_s for p in results.passes[reader]],
            "ratios_over_queue": results.ratios(reader, QUEUE),
            "median_ratio_over_queue": results.median_ratio(reader, QUEUE),
            "chunks_per_batch": chunks, "neighbour_fraction": neighbours,
            "same_chunk_fraction": same}
        if has_torch:
            out[reader]["ratios_over_torch"] = results.ratios(reader, TORCH)
            out[reader]["median_ratio_over_torch"] = results.median_ratio(reader, TORCH)
    with multitables.Loader(s.filename, s.columns, BATCH, shuffle=True, n_procs=1) as loader:
        unit_rows, window = loader.unit_rows, loader.window
    print(f"\n== {name}: {datafiles.SPECS[name].what}"
          + (", with int64 labels" if name == "img_gzip" else "")
          + f"\n   {s.n_rows} rows of {s.row_bytes} bytes ({', '.join(s.columns.values())}); "
          f"chunks of {s.chunk_rows} rows; Loader units of {unit_rows} rows, default window "
          f"{window} rows; queue blocks of {block} rows; batches of {BATCH}; "
          f"{args.rounds} rounds" + (f"; torch: {args.torch_batches} batches a round"
                                     if has_torch else ""))
    print(m.format_table(rows))
    print(f"a new Loader's first batch (workers started, file opened): "
          f"{statistics.median(new_first) * 1e3:.0f} ms median")
    bound = None
    with h5py.File(s.filename, "r") as f:
        compressed = f[s.queue_path].compression is not None
    if compressed:  # the queue's workers are decode-bound
        gather = gather_rate(s.row_bytes)
        queue_mb = results.median_rate(QUEUE) * s.queue_row_bytes
        bound = decode_bound(queue_mb, gather)
        loader = results.median_ratio(DEFAULT, QUEUE)
        print(f"limit: consumer gather {gather / 1e6:,.0f} MB/s on one core; bound on "
              f"{N_PROCS} cores (the queue's decoding plus that gather of every byte): "
              f"{bound:.2f}x queue; {DEFAULT} reaches {loader / bound:.0%} of it")
    lines = [m.check(f"{reader} / {over}", results.median_ratio(reader, over), target)
             for reader, over, target in TARGETS.get(name, [])
             if reader in results.passes and over in results.passes]
    if lines:
        print("targets (samples/s, median of per-round ratios):\n" + "\n".join(lines))
    return {"filename": s.filename, "columns": s.columns, "rows": s.n_rows,
            "row_bytes": s.row_bytes, "chunk_rows": s.chunk_rows, "unit_rows": unit_rows,
            "window_rows": window, "queue_block_size": block, "batch_size": BATCH,
            "new_loader_first_batch_s": new_first, "decode_bound_over_queue": bound,
            "readers": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=3)
    p.add_argument("--files", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--torch-batches", type=int, default=32,
                   help="timed batches of the torch DataLoader a round (default 32)")
    args = p.parse_args(argv)
    return common.run_files(args, "loader", f"shuffled epochs, batch {BATCH}, "
                            f"n_procs={N_PROCS}", bench_file)


if __name__ == "__main__":
    sys.exit(main())
