"""Random access: a training loop's run of 64-row random batches, and one-row round trips.

    python bench/bench_random.py [--files f32 table] [--batches 2000] [--in-flight 4] [--rounds 3]

Readers, all reading the same seeded batches, each timed from its first batch received (so file
opening and worker start-up are left out), each run from a freshly read page cache:
  - h5py fancy indexing ``ds[np.sort(idx)]`` with the default chunk cache (1 MiB: each row of a
    1 MiB chunk costs the whole chunk) and with the cache off (``rdcc_nbytes=0``), over the first
    --h5py-batches batches (each batch costs h5py the same, and its default cache is slow);
  - a PyTorch DataLoader, 2 workers, the batches as its batch sampler (rows come back sorted);
  - the multitables Reader with each --n-procs: a stage pool and a RequestPool keeping
    --in-flight requests queued, keys left unsorted (the Reader restores the caller's order;
    h5py cannot), over all --batches batches.
Then the median round trip of a one-row request (request, then get) in microseconds, beside h5py's
``ds[i:i + 1]``.
"""

from __future__ import annotations

import argparse
import functools
import os
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
# Reader n_procs=2 over h5py with its chunk cache off, by file: a uniform 64-row batch of 4 KiB
# rows costs h5py a chunk lookup and a read per row; the Reader gathers them from mapped pages.
RDCC0_TARGET = {"f32": 20, "table": 5}


def h5py_batches(filename: str, path: str, batches: list[np.ndarray],
                 **file_kw) -> tuple[int, float]:
    m.warm_page_cache(filename)
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
               in_flight: int, cpu: list | None = None) -> tuple[int, float]:
    """The Reader's run; appends (consumer, workers) CPU seconds per batch to ``cpu``."""
    m.warm_page_cache(filename)
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
        pids = [proc.pid for proc in reader._pool.procs]  # type: ignore[union-attr]
        c0, w0 = time.thread_time(), sum(map(cpu_seconds, pids))
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
        elapsed = time.perf_counter() - t0
        if cpu is not None:
            n = len(batches) - 1
            cpu.append(((time.thread_time() - c0) / n, (sum(map(cpu_seconds, pids)) - w0) / n))
        return total, elapsed
    finally:
        reader.close(wait=True)


def cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` so far (nanoseconds in /proc/PID/schedstat)."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def cpu_bound(filename: str, path: str, batches: list[np.ndarray], in_flight: int,
              cores: int) -> dict[str, float]:
    """The most batches a second this machine's cores allow, from the CPU a batch costs.

    C, the caller's work per batch: its thread's CPU in a Reader run with n_procs=1 less all the
    time it spent waiting for results (spinning or asleep: counting sleep as spin makes C
    smaller than it is). W, a worker's work per batch: ``execute`` of the same requests in this
    process, without messages. Any number of workers then serve at most min(1/C, n/W,
    cores/(C + W)) batches a second; both C and W err small, so the bound errs high.
    """
    from multitables.futures import Request
    from multitables.readspec import execute
    from multitables.stages import StageMemory

    waited = [0.0]
    wait = Request._wait

    def timed_wait(self):
        t0 = time.perf_counter()
        try:
            return wait(self)
        finally:
            waited[0] += time.perf_counter() - t0

    Request._wait = timed_wait  # type: ignore[method-assign]
    try:
        cpu: list = []
        nbytes, _ = mt_batches(filename, path, batches, 1, in_flight, cpu)
    finally:
        Request._wait = wait  # type: ignore[method-assign]
    n = len(batches) - 1
    c = max(cpu[0][0] - waited[0] / n, 1e-9)
    reader = multitables.Reader(filename, n_procs=1)  # its proxies describe; no worker starts
    try:
        ds = reader.get_dataset(path)
        specs = [ds[idx]._spec() for idx in batches[1:]]
        memory = StageMemory.create(specs[0].nbytes)
        m.warm_page_cache(filename)
        with h5py.File(filename, "r", rdcc_nbytes=32 << 20) as f:
            dataset = f[path]
            t0 = time.thread_time()
            for spec in specs:
                execute(spec, dataset, memory)
            w = (time.thread_time() - t0) / n
        memory.close()
    finally:
        reader.close()
    per_batch = nbytes / n
    return {"caller_us": c * 1e6, "worker_us": w * 1e6,
            "bound_1_MBps": min(1 / c, 1 / w, cores / (c + w)) * per_batch / 1e6,
            "bound_2_MBps": min(1 / c, 2 / w, cores / (c + w)) * per_batch / 1e6}


def round_trips(filename: str, path: str, rows: np.ndarray, n_procs: int,
                has_reader: bool = True) -> dict[str, float]:
    """Median and 90th percentile of one-row round trips, in microseconds, Reader and h5py."""
    out: dict[str, float] = {}
    m.warm_page_cache(filename)
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
    few = batches[:args.h5py_batches + 1]
    readers: dict[str, Callable] = {
        "h5py default cache": lambda: h5py_batches(filename, path, few),
        "h5py rdcc_nbytes=0": lambda: h5py_batches(filename, path, few, rdcc_nbytes=0),
    }
    if torch is not None:
        def torch_batches():
            m.warm_page_cache(filename)
            return common.torch_random(filename, path, few, 2)

        readers["torch DataLoader w=2"] = torch_batches
    has_reader = hasattr(multitables, "Reader")
    mts = {p: f"mt Reader n_procs={p}" for p in args.n_procs} if has_reader else {}
    for procs, label in mts.items():
        readers[label] = functools.partial(mt_batches, filename, path, batches, procs,
                                           args.in_flight)
    report = m.run_rounds(readers, args.rounds, baseline="h5py default cache")
    cores = len(os.sched_getaffinity(0))
    bound = cpu_bound(filename, path, batches, args.in_flight, cores) if has_reader else {}
    trips = round_trips(filename, path, rng.integers(0, n, args.trips + 50), max(args.n_procs),
                        has_reader)
    print(f"\n== {name}: {datafiles.SPECS[name].what}\n   {n} rows of {row_bytes} bytes, chunks "
          f"{chunks}; {args.batches} batches of {BATCH} rows (h5py and torch: "
          f"{len(few) - 1}), {args.in_flight} requests in flight, {args.rounds} rounds")
    print(report.table())
    print("one-row round trip (us): " + ", ".join(f"{k} {v:.1f}" for k, v in trips.items()))
    if not has_reader:
        print("multitables.Reader is not available in this build: its figures are missing")
        return {}
    print("targets (median of per-round ratios):")
    best = mts[max(args.n_procs)]
    print(m.check(f"{best} / h5py default cache", report.median_ratio(best), 10))
    print(m.check(f"{best} / h5py rdcc_nbytes=0", report.median_ratio(best, "h5py rdcc_nbytes=0"),
                  RDCC0_TARGET.get(name, 1.5)))
    print(f"CPU per batch: the caller {bound['caller_us']:.1f} us, a worker "
          f"{bound['worker_us']:.1f} us; {cores} cores serve at most "
          f"{bound['bound_1_MBps']:,.0f} MB/s with n_procs=1, "
          f"{bound['bound_2_MBps']:,.0f} MB/s with n_procs=2")
    if 1 in mts and len(mts) > 1:
        print(m.check(f"{best} / {mts[1]}", report.median_ratio(best, mts[1]), 1.3))
        ceiling = bound["bound_2_MBps"] / bound["bound_1_MBps"]
        print(f"     (bounds: n_procs=2 at most {ceiling:.2f}x n_procs=1 at its bound, "
              f"{bound['bound_2_MBps'] / report.median(mts[1]):.2f}x {mts[1]} as measured)")
    print(m.check("one-row round trip, median", trips["mt Reader median_us"], 50,
                  at_least=False, unit=" us"))
    return {"rows": n, "chunks": chunks, "row_bytes": row_bytes, "round_trip_us": trips,
            "cpu_bound": bound, "report": report.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=3)
    p.add_argument("--files", nargs="+", choices=list(datafiles.SPECS), default=["f32", "table"])
    p.add_argument("--batches", type=int, default=2000,
                   help="timed batches per Reader run (default 2000)")
    p.add_argument("--h5py-batches", type=int, default=250,
                   help="timed batches per h5py and torch run (default 250)")
    p.add_argument("--in-flight", type=int, default=4, help="Reader requests queued (default 4)")
    p.add_argument("--n-procs", type=int, nargs="+", default=[1, 2],
                   help="Reader workers, one run each (default 1 2)")
    p.add_argument("--trips", type=int, default=2000, help="one-row round trips (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return common.run_files(args, "random", "random access", bench_file)


if __name__ == "__main__":
    sys.exit(main())
