"""dask arrays: multitables.dask.from_hdf5 vs dask.array.from_array over an h5py dataset.

    python bench/bench_dask.py [--files f32 f32_gzip img_gzip] [--rounds 5] [--size-mb 1024]

For each benchmark file, ``x.sum().compute()`` over the whole dataset, with the same blocks for
both arrays (``from_hdf5``'s default: whole chunks of about dask's ``array.chunk-size``), on a
``distributed.LocalCluster`` of 2 one-thread worker processes and on dask's threaded scheduler,
round-robin over the rounds. The ratios that matter are each multitables reader over the h5py
reader on the same scheduler; ``limit: fresh blocks`` is the same blocks made in new memory without
reading anything, summed the same way: no reader that returns blocks in new memory can beat it
(``from_hdf5`` reuses the memory of blocks dask dropped, so it can). See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import common
import dask.array as da
import datafiles
import distributed
import h5py
import numpy as np

import multitables.dask as mdask
from multitables._tools import measure as m

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
MT_CLUSTER, H5_CLUSTER = "mt from_hdf5, cluster 2x1", "dask from_array(h5py), cluster 2x1"
MT_THREADS, H5_THREADS = "mt from_hdf5, threads", "dask from_array(h5py), threads"
LIMIT_CLUSTER, LIMIT_THREADS = "limit: fresh blocks, cluster 2x1", "limit: fresh blocks, threads"
TARGETS = {  # (reader, over, at least): the bars of the dask issue, per file
    "f32": [(MT_CLUSTER, H5_CLUSTER, 1.3)],
    "f32_gzip": [(MT_CLUSTER, H5_CLUSTER, 1.5)],
}


def _fresh_block(block_info=None) -> np.ndarray:
    """A block of ones in new memory, the shape and dtype dask asks for."""
    info = block_info[None]
    return np.ones(info["chunk-shape"], info["dtype"])


def bench_file(name: str, filename: str, path: str, args: argparse.Namespace,
               client: distributed.Client) -> dict:
    x = mdask.from_hdf5(filename, path, chunks=args.block_rows)
    nbytes = x.nbytes
    h5 = h5py.File(filename, "r")  # dask's from_array keeps it; distributed sends its name
    y = da.from_array(h5[path], chunks=x.chunks)

    def cluster(arr) -> Callable[[], int]:
        return lambda: (client.compute(arr.sum(), sync=True), nbytes)[1]

    def threads(arr) -> Callable[[], int]:
        return lambda: (arr.sum().compute(scheduler="threads", num_workers=CORES), nbytes)[1]

    # The floor of any reader that returns blocks in new memory: the same blocks made by filling
    # fresh memory (page faults and one write pass) instead of reading, summed the same way.
    # (da.ones would not do: its blocks are broadcast views of one element.)
    ones = da.map_blocks(_fresh_block, chunks=x.chunks, dtype=x.dtype,
                         meta=np.empty((0,) * x.ndim, x.dtype))
    readers = {MT_CLUSTER: cluster(x), H5_CLUSTER: cluster(y), LIMIT_CLUSTER: cluster(ones),
               MT_THREADS: threads(x), H5_THREADS: threads(y), LIMIT_THREADS: threads(ones)}
    for reader in readers.values():  # untimed: workers import h5py and the codecs, open files
        reader()
    try:
        report = m.run_rounds(readers, args.rounds, baseline=H5_CLUSTER)
    finally:
        h5.close()
        mdask.close_files()
        client.run(mdask.close_files)
    print(f"\n== {name}: {datafiles.SPECS[name].what}\n   {x.shape}, {nbytes / 1e6:,.0f} MB, "
          f"{len(x.chunks[0])} blocks of {x.chunks[0][0]} rows, {args.rounds} rounds")
    print(report.table())
    pairs = [(MT_CLUSTER, H5_CLUSTER), (MT_THREADS, H5_THREADS), (MT_CLUSTER, LIMIT_CLUSTER),
             (MT_THREADS, LIMIT_THREADS)]
    print("same scheduler:\n" + "\n".join(
        f"  {a} / {b} = {report.median_ratio(a, b):.2f}x" for a, b in pairs))
    lines = [m.check(f"{a} / {b}", report.median_ratio(a, b), t)
             for a, b, t in TARGETS.get(name, [])]
    if lines:
        print("targets (median of per-round ratios):\n" + "\n".join(lines))
    return {"shape": x.shape, "dtype": str(x.dtype), "nbytes": nbytes, "blocks": x.chunks[0],
            "ratios": {f"{a} / {b}": report.median_ratio(a, b) for a, b in pairs},
            "report": report.to_dict()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=5)
    p.add_argument("--files", nargs="+", choices=list(datafiles.SPECS),
                   default=["f32", "f32_gzip", "img_gzip"])
    p.add_argument("--block-rows", type=int, default=None,
                   help="rows per block, rounded to whole chunks (default: dask's chunk-size)")
    args = p.parse_args(argv)
    args.no_torch = True  # no DataLoader reader here
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            return common.run_files(
                args, "dask", f"{CORES} cores; cluster: LocalCluster(2 workers x 1 thread)",
                lambda name, filename, path, args, _torch: bench_file(
                    name, filename, path, args, client))


if __name__ == "__main__":
    sys.exit(main())
