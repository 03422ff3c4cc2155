"""Random access: batches of 64 random rows, and the round trip of a one-row request.

    python bench/bench_random.py [--files f32 table] [--batches 128] [--in-flight 4] [--rounds 5]

Readers, all reading the same seeded batches, each timed from its first batch received (so file
opening and worker start-up are left out):
  - h5py fancy indexing ``ds[np.sort(idx)]`` with the default chunk cache (1 MiB: each row of a
    1 MiB chunk costs the whole chunk) and with the cache off (``rdcc_nbytes=0``);
  - a PyTorch DataLoader, 2 workers, the batches as its batch sampler (rows come back sorted);
  - the multitables Reader: a stage pool and a RequestPool keeping --in-flight requests queued,
    keys left unsorted (the Reader restores the caller's order; h5py cannot).
Then the median round trip of a one-row request (request, then get) in microseconds, beside h5py's
``ds[i:i + 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import common
import datafiles
import h5py
import numpy as np

import multitables
from multitables import _measure as m

BATCH = 64


def h5py_batches(filename: str, path: str, batches: list[np.ndarray],
                 **file_kw) -> tuple[int, float]:
    with h5py.File(filename, "r", **file_kw) as f:
        ds = f[path]
        total, t0 = 0, 0.0
        for k, idx in enumerate(batches):
            rows = ds[np.sort(idx)]
            if k == 0:
                t0 = time.perf_counter()
            else:
                total += rows.nbytes
        return total, time.perf_counter() - t0


def mt_batches(filename: str, path: str, batches: list[np.ndarray], n_procs: int,
               in_flight: int) -> tuple[int, float]:
    reader = multitables.Reader(filename, n_procs=n_procs)
    try:
        ds = reader.get_dataset(path)
        # One stage more than requests in flight: the next request always finds a free stage.
        pool = ds.create_stage_pool(BATCH, in_flight + 1)
        reqs = multitables.RequestPool()
        first = reader.request(ds[batches[0]], pool).get()  # workers are up from here on
        with h5py.File(filename, "r") as f:  # a benchmark of wrong answers would be worthless
            order = np.sort(batches[0])
            expected = f[path][order][np.searchsorted(order, batches[0])]
        if not np.array_equal(first, expected):
            raise AssertionError(f"{filename}: Reader rows differ from h5py's")
        t0 = time.perf_counter()
        total = pending = 0
        for idx in batches[1:]:
            if pending == in_flight:
                total += reqs.next().get().nbytes
                pending -= 1
            reqs.add(reader.request(ds[idx], pool))
            pending += 1
        for _ in range(pending):
            total += reqs.next().get().nbytes
        return total, time.perf_counter() - t0
    finally:
        reader.close(wait=True)


def round_trips(filename: str, path: str, rows: np.ndarray, n_procs: int,
                has_reader: bool = True) -> dict[str, float]:
    """Median and 90th percentile of one-row round trips, in microseconds, Reader and h5py."""
    out: dict[str, float] = {}
    if has_reader:
        reader = multitables.Reader(filename, n_procs=n_procs)
        try:
            ds = reader.get_dataset(path)
            stage = ds.create_stage(1)
            times = []
            for k, i in enumerate(rows):
                t0 = time.perf_counter()
                reader.request(ds[i:i + 1], stage).get()
                if k >= 50:  # the first ones warm caches and workers
                    times.append(time.perf_counter() - t0)
        finally:
            reader.close(wait=True)
        out["mt Reader median_us"] = statistics.median(times) * 1e6
        out["mt Reader p90_us"] = float(np.percentile(times, 90)) * 1e6
    with h5py.File(filename, "r", rdcc_nbytes=0) as f:
        hds = f[path]
        times = []
        for k, i in enumerate(rows):
            t0 = time.perf_counter()
            hds[i:i + 1]
            if k >= 50:
                times.append(time.perf_counter() - t0)
    out["h5py rdcc_nbytes=0 median_us"] = statistics.median(times) * 1e6
    return out


def bench_file(name: str, filename: str, path: str, args: argparse.Namespace, torch) -> dict:
    with h5py.File(filename, "r") as f:
        n, chunks, row_bytes = f[path].shape[0], f[path].chunks, f[path].dtype.itemsize * int(
            np.prod(f[path].shape[1:]))
    rng = np.random.default_rng(args.seed)
    batches = [rng.choice(n, BATCH, replace=False) for _ in range(args.batches + 1)]
    readers: dict[str, Callable] = {
        "h5py default cache": lambda: h5py_batches(filename, path, batches),
        "h5py rdcc_nbytes=0": lambda: h5py_batches(filename, path, batches, rdcc_nbytes=0),
    }
    if torch is not None:
        readers["torch DataLoader w=2"] = lambda: common.torch_random(filename, path, batches, 2)
    mt = f"mt Reader n_procs={args.n_procs}"
    has_reader = hasattr(multitables, "Reader")
    if has_reader:
        readers[mt] = lambda: mt_batches(filename, path, batches, args.n_procs, args.in_flight)
    report = m.run_rounds(readers, args.rounds, baseline="h5py default cache")
    trips = round_trips(filename, path, rng.integers(0, n, args.trips + 50), args.n_procs,
                        has_reader)
    print(f"\n== {name}: {datafiles.SPECS[name].what}\n   {n} rows of {row_bytes} bytes, chunks "
          f"{chunks}; {args.batches} batches of {BATCH} rows, {args.in_flight} requests in "
          f"flight, {args.rounds} rounds")
    print(report.table())
    print("one-row round trip (us): " + ", ".join(f"{k} {v:.1f}" for k, v in trips.items()))
    if not has_reader:
        print("multitables.Reader is not available in this build: its figures are missing")
    else:
        print("targets (median of per-round ratios):")
        print(m.check(f"{mt} / h5py default cache", report.median_ratio(mt), 10))
        print(m.check(f"{mt} / h5py rdcc_nbytes=0", report.median_ratio(mt, "h5py rdcc_nbytes=0"),
                      1.5))
        print(m.check("one-row round trip, median", trips["mt Reader median_us"], 50,
                      at_least=False, unit=" us"))
    return {"rows": n, "chunks": chunks, "row_bytes": row_bytes, "round_trip_us": trips,
            "report": report.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=5)
    p.add_argument("--files", nargs="+", choices=list(datafiles.SPECS), default=["f32", "table"])
    p.add_argument("--batches", type=int, default=128, help="timed batches per run (default 128)")
    p.add_argument("--in-flight", type=int, default=4, help="Reader requests queued (default 4)")
    p.add_argument("--n-procs", type=int, default=2, help="Reader workers (default 2)")
    p.add_argument("--trips", type=int, default=2000, help="one-row round trips (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return common.run_files(args, "random", "random access", bench_file)


if __name__ == "__main__":
    sys.exit(main())
