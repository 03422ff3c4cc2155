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
    h5py cannot), over all --batches batches, after --warm-batches other batches (a training
    loop's steady state: each worker maps the file for itself, and a first touch of a page
    costs it a page fault);
  - the same from a cold start, in 2.0.1's spelling, with each --n-procs: a new Reader, keys
    ``ds[idx.tolist(), ...]``, a pool of 2 * n_procs + 1 stages with as many requests in
    flight, --batches batches timed from the first request (worker start-up included) to the
    last result: the first epoch of a training loop, where the default n_procs must not cost.
    A Reader starts its second worker only once requests wait on the first: the line under the
    table gives the workers each of its runs started.
Then the CPU a batch costs the caller and a worker, and the bounds those allow; what a process
wake-up costs here; the median round trip of a one-row request (request, then get) in
microseconds, beside h5py's ``ds[i:i + 1]``.
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
from multitables._tools import measure as m

BATCH = 64
# Reader n_procs=2 over h5py with its chunk cache off, by file: a uniform 64-row batch of 4 KiB
# rows costs h5py a chunk lookup and a read per row; the Reader gathers them from mapped pages.
RDCC0_TARGET = {"f32": 20, "table": 5}
# The workers each Reader run started, by reader label: a Reader starts its second worker only
# once requests wait on the first (multitables/_reader/dispatch.py, START_AFTER).
STARTED: dict[str, list[int]] = {}


def note_started(label: str, reader) -> None:
    STARTED.setdefault(label, []).append(getattr(reader._dispatcher, "started", reader.n_procs))


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
               in_flight: int, warm: list[np.ndarray], label: str = "") -> tuple[int, float]:
    """The Reader's run, timed after the ``warm`` batches: a training loop's steady state, where
    every worker has mapped the pages of the file it reads (a first touch of a page costs a
    worker a page fault, and each worker maps the file for itself)."""
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
        pipeline(reader, ds, pool, reqs, warm, in_flight)
        m.warm_page_cache(filename)
        t0 = time.perf_counter()
        total = pipeline(reader, ds, pool, reqs, batches[1:], in_flight)
        elapsed = time.perf_counter() - t0
        note_started(label, reader)
        return total, elapsed
    finally:
        reader.close(wait=True)


def cold_loop(filename: str, path: str, batches: list[np.ndarray],
              n_procs: int, label: str = "") -> tuple[int, float]:
    """A new Reader's whole run of ``batches`` by Python list keys (2.0.1's spelling), a pool
    of ``2 * n_procs + 1`` stages with as many requests in flight; the bytes and seconds."""
    keys = [(idx.tolist(), Ellipsis) for idx in batches]  # as a caller holds them
    m.warm_page_cache(filename)
    t0 = time.perf_counter()
    with multitables.Reader(filename, n_procs=n_procs) as reader:
        ds = reader.get_dataset(path)
        in_flight = 2 * n_procs + 1
        pool = ds.create_stage_pool(BATCH, in_flight)
        total = pipeline(reader, ds, pool, multitables.RequestPool(), keys, in_flight)
        elapsed = time.perf_counter() - t0
        note_started(label, reader)
    return total, elapsed


def pipeline(reader, ds, pool, reqs, batches: list, in_flight: int) -> int:
    """Request ``batches`` keeping ``in_flight`` queued, taking each result; the bytes taken."""
    total = pending = 0
    for idx in batches:
        if pending == in_flight:
            total += reqs.next().get().nbytes
            pending -= 1
        reqs.add(reader.request(ds[idx], pool))
        pending += 1
    for _ in range(pending):
        total += reqs.next().get().nbytes
    return total


def wake_up_us(rounds: int = 500) -> float:
    """What waking a sleeping process costs here, in microseconds: the median time from a store
    to a futex that another process sleeps on to that process's answer (what the caller waits
    when it hands a request to a sleeping worker)."""
    import multiprocessing

    from multitables._engine._ringbuf import Word
    from multitables._engine.shm import SharedArena

    arena = SharedArena(64)
    word = Word(arena.buffer, 0)

    def echo() -> None:
        for i in range(rounds):
            word.wait_while(2 * i, 5.0)
            word.store(2 * i + 2)

    child = multiprocessing.get_context("fork").Process(target=echo)
    child.start()
    times = []
    try:
        for i in range(rounds):
            time.sleep(1e-3)  # long past the echoing process's spin: it sleeps
            t0 = time.perf_counter()
            word.store(2 * i + 1)
            if not word.wait_while(2 * i + 1, 5.0, 1.0):  # this side watches: no wake-up here
                raise RuntimeError("the echoing process did not answer")
            times.append(time.perf_counter() - t0)
    finally:
        child.join(10)
        if child.exitcode is None:
            child.kill()
        arena.close()  # unmapped with the word, its last view
    return statistics.median(times) * 1e6


def cpu_bound(filename: str, path: str, batches: list[np.ndarray], in_flight: int,
              cores: int) -> dict[str, float]:
    """The most batches a second this machine's cores allow, from the CPU a batch costs.

    C, the caller's work per batch: its thread's CPU in a run of the same loop whose requests
    are done as they are handed over (each stage marked done where a worker would be told of
    it), so it never waits. W, a worker's work per batch: ``execute`` of the same requests in
    this process, without messages, once the file's pages are mapped. Any number of workers
    then serve at most min(1/C, n/W, cores/(C + W)) batches a second; both C and W err small
    (warm caches, no hand-over), so the bound errs high.
    """
    from multitables._reader.readspec import execute
    from multitables._reader.stages import StageMemory

    c = caller_seconds(filename, path, batches[1:], in_flight)
    n = len(batches) - 1
    reader = multitables.Reader(filename, n_procs=1)  # its proxies describe; no worker starts
    try:
        ds = reader.get_dataset(path)
        specs = [ds[idx].spec() for idx in batches[1:]]
        memory = StageMemory.create(specs[0].nbytes)
        m.warm_page_cache(filename)
        with h5py.File(filename, "r", rdcc_nbytes=32 << 20) as f:
            dataset = f[path]
            for spec in specs:  # once to map the pages, as the Reader runs are warmed
                execute(spec, dataset, memory)
            t0 = time.thread_time()
            for spec in specs:
                execute(spec, dataset, memory)
            w = (time.thread_time() - t0) / n
        memory.close()
    finally:
        reader.close()
    per_batch = specs[0].nbytes
    return {"caller_us": c * 1e6, "worker_us": w * 1e6,
            "bound_1_MBps": min(1 / c, 1 / w, cores / (c + w)) * per_batch / 1e6,
            "bound_2_MBps": min(1 / c, 2 / w, cores / (c + w)) * per_batch / 1e6}


def caller_seconds(filename: str, path: str, batches: list[np.ndarray], in_flight: int) -> float:
    """The caller's CPU seconds per batch of ``pipeline`` when workers are done at once."""
    from multitables._reader import control
    from multitables._reader.dispatch import Dispatcher
    from multitables._reader.stages import DONE

    reader = multitables.Reader(filename, n_procs=1)
    push = Dispatcher._push
    try:
        ds = reader.get_dataset(path)
        pool = ds.create_stage_pool(BATCH, in_flight + 1)
        reqs = multitables.RequestPool()
        reader.request(ds[batches[0]], pool).get()  # the worker is up

        def done_at_once(self, worker: int, item: int) -> None:
            if item == control.NOTICE:  # a message for the worker: it still gets those
                return push(self, worker, item)
            memory_id = control.decode_item(item)[0]
            for stage in pool.stages:
                if stage.memory.id == memory_id:
                    stage.memory.state.set(DONE)

        Dispatcher._push = done_at_once  # type: ignore[method-assign]
        pipeline(reader, ds, pool, reqs, batches, in_flight)  # stages get their spare memory
        t0 = time.thread_time()
        pipeline(reader, ds, pool, reqs, batches, in_flight)
        return (time.thread_time() - t0) / len(batches)
    finally:
        Dispatcher._push = push  # type: ignore[method-assign]
        reader.close(wait=True)


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
    warm = [rng.choice(n, BATCH, replace=False) for _ in range(args.warm_batches)]
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
                                           args.in_flight, warm, label)
    colds = {p: f"mt cold 2.0.1 loop n_procs={p}" for p in args.n_procs} if has_reader else {}
    for procs, label in colds.items():
        readers[label] = functools.partial(cold_loop, filename, path, batches[1:], procs, label)
    STARTED.clear()
    report = m.run_rounds(readers, args.rounds, baseline="h5py default cache")
    cores = len(os.sched_getaffinity(0))
    bound = cpu_bound(filename, path, batches, args.in_flight, cores) if has_reader else {}
    wake_us = wake_up_us()
    trips = round_trips(filename, path, rng.integers(0, n, args.trips + 50), max(args.n_procs),
                        has_reader)
    print(f"\n== {name}: {datafiles.SPECS[name].what}\n   {n} rows of {row_bytes} bytes, chunks "
          f"{chunks}; {args.batches} batches of {BATCH} rows (h5py and torch: "
          f"{len(few) - 1}), {args.in_flight} requests in flight, {args.rounds} rounds; load "
          f"average {os.getloadavg()[0]:.1f} on {cores} cores")
    print(report.table())
    if STARTED:
        print("workers started, each round: " + "; ".join(
            f"{label} {', '.join(map(str, n))}" for label, n in STARTED.items()))
    print("one-row round trip (us): " + ", ".join(f"{k} {v:.1f}" for k, v in trips.items()))
    if not has_reader:
        print("multitables.Reader is not available in this build: its figures are missing")
        return {}
    print("targets (median of per-round ratios):")
    best = mts[max(args.n_procs)]
    print(m.check(f"{best} / h5py default cache", report.median_ratio(best), 10))
    print(m.check(f"{best} / h5py rdcc_nbytes=0", report.median_ratio(best, "h5py rdcc_nbytes=0"),
                  RDCC0_TARGET.get(name, 1.5)))
    cold = colds[max(args.n_procs)]
    print(m.check(f"{cold} / h5py rdcc_nbytes=0 (warm: above)",
                  report.median_ratio(cold, "h5py rdcc_nbytes=0"), RDCC0_TARGET.get(name, 1.5)))
    if 1 in colds and len(colds) > 1:
        print(m.check(f"{cold} / {colds[1]} (the default n_procs must not cost)",
                      report.median_ratio(cold, colds[1]), 0.95))
    print(f"CPU per batch: the caller {bound['caller_us']:.1f} us, a worker "
          f"{bound['worker_us']:.1f} us; {cores} cores serve at most "
          f"{bound['bound_1_MBps']:,.0f} MB/s with n_procs=1, "
          f"{bound['bound_2_MBps']:,.0f} MB/s with n_procs=2")
    print(m.check("the caller's CPU per batch, C", bound["caller_us"], 20, at_least=False,
                  unit=" us"))
    if 1 in mts and len(mts) > 1:
        print(m.check(f"{best} / {mts[1]}", report.median_ratio(best, mts[1]), 1.3))
        ceiling = bound["bound_2_MBps"] / bound["bound_1_MBps"]
        print(f"     (bounds: n_procs=2 at most {ceiling:.2f}x n_procs=1 at its bound, "
              f"{bound['bound_2_MBps'] / report.median(mts[1]):.2f}x {mts[1]} as measured)")
    print(f"a process waking another costs {wake_us:.1f} us here (futex ping-pong, median); a "
          f"second worker pays off when a batch costs a worker well over that")
    print(m.check("one-row round trip, median", trips["mt Reader median_us"], 50,
                  at_least=False, unit=" us"))
    return {"rows": n, "chunks": chunks, "row_bytes": row_bytes, "round_trip_us": trips,
            "cpu_bound": bound, "wake_up_us": wake_us, "workers_started": dict(STARTED),
            "report": report.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=3)
    p.add_argument("--files", nargs="+", choices=list(datafiles.SPECS), default=["f32", "table"])
    p.add_argument("--batches", type=int, default=2000,
                   help="timed batches per Reader run (default 2000)")
    p.add_argument("--h5py-batches", type=int, default=250,
                   help="timed batches per h5py and torch run (default 250)")
    p.add_argument("--warm-batches", type=int, default=2000,
                   help="batches each Reader run serves before it is timed (default 2000)")
    p.add_argument("--in-flight", type=int, default=4, help="Reader requests queued (default 4)")
    p.add_argument("--n-procs", type=int, nargs="+", default=[1, 2],
                   help="Reader workers, one run each (default 1 2)")
    p.add_argument("--trips", type=int, default=2000, help="one-row round trips (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return common.run_files(args, "random", "random access", bench_file)


if __name__ == "__main__":
    sys.exit(main())
