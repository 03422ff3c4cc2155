"""Shuffled batches of variable-length rows: ``VlenRows.take`` against h5py and a memcpy bound.

The file holds token sequences (vlen int32, 16-512 tokens each, written as h5py writes an object
array: one contiguous dataset, and the same rows chunked). Each round reads the same random
batches with every reader, interleaved:

- ``h5py``: ``dataset[np.unique(rows)]``, the Loader's read of variable-length rows before;
- ``take, first``: ``VlenRows.take`` on a file opened afresh: the first batches, nearly every
  row in a heap collection not parsed yet (and pages not mapped yet);
- ``take, epoch 1``: a whole shuffled epoch on a file opened afresh, per batch (each collection
  is parsed once, by the first row read from it);
- ``take``: the reader of ``take, first`` again on its batches (collections parsed: later
  epochs);
- ``fixed rows``: numpy gathering 256 rows of a fixed-size (N, 264) int32 array in memory, the
  same bytes as a batch on average;
- ``memcpy``: one numpy copy of a batch's bytes.

Times are microseconds per batch, medians over rounds; the ratios are against ``memcpy`` and
``fixed rows`` in the same round (medians of the per-round ratios). Run from the repository
root: ``python bench/bench_vlen.py [--rows 200000]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import h5py
import numpy as np

from multitables._hdf5.vlenread import VlenRows


def write(path: str, rows: int) -> None:
    if os.path.exists(path):
        return
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 513, rows)
    data = np.empty(rows, object)
    tokens = rng.integers(0, 50_000, int(lengths.sum()), dtype=np.int32)
    data[:] = np.split(tokens, np.cumsum(lengths)[:-1])
    with h5py.File(path + ".tmp", "w") as f:
        f.create_dataset("tokens", data=data, dtype=h5py.vlen_dtype(np.int32))
        f.create_dataset("chunked", data=data, dtype=h5py.vlen_dtype(np.int32), chunks=(4096,))
    os.rename(path + ".tmp", path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/multitables-bench")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, f"vlen-tokens-{args.rows}.h5")
    write(path, args.rows)
    fixed = np.ones((args.rows, 264), np.int32)
    flat = np.ones(args.batch * 512, np.int32)
    dst = np.empty_like(flat)
    for name in ("tokens", "chunked"):
        times: dict[str, list[float]] = {}
        for r in range(args.rounds):
            rng = np.random.default_rng(100 + r)
            batches = [rng.integers(0, args.rows, args.batch) for _ in range(args.batches)]
            with h5py.File(path, "r") as f:
                reader = VlenRows.of(f[name])
                assert reader is not None
                epoch = np.random.default_rng(r).permutation(args.rows)
                t = time.perf_counter()
                for at in range(0, args.rows, args.batch):
                    reader.take(epoch[at : at + args.batch])
                times.setdefault("take, epoch 1", []).append(
                    (time.perf_counter() - t) / -(-args.rows // args.batch) * 1e6)
            with h5py.File(path, "r") as f:
                ds = f[name]
                reader = VlenRows.of(ds)
                assert reader is not None
                nbytes = []
                t0 = time.perf_counter()
                for rows in batches:
                    nbytes.append(sum(v.nbytes for v in reader.take(rows)))
                t1 = time.perf_counter()
                for rows in batches:
                    reader.take(rows)
                t2 = time.perf_counter()
                for rows in batches:
                    ds[np.unique(rows)]
                t3 = time.perf_counter()
                for rows in batches:
                    fixed[rows]
                t4 = time.perf_counter()
                for n in nbytes:
                    dst[: n // 4] = flat[: n // 4]
                t5 = time.perf_counter()
            for key, dt in (("take, first", t1 - t0), ("take", t2 - t1), ("h5py", t3 - t2),
                            ("fixed rows", t4 - t3), ("memcpy", t5 - t4)):
                times.setdefault(key, []).append(dt / args.batches * 1e6)
        print(f"\n{name}: {args.rows} rows, batches of {args.batch}, "
              f"{statistics.mean(nbytes) / 1e3:.0f} kB a batch")
        print(f"{'reader':<14}{'us/batch':>10}{'x memcpy':>10}{'x fixed rows':>14}")
        for key, ts in times.items():
            ratios = [statistics.median(t / m for t, m in zip(ts, times[base], strict=True))
                      for base in ("memcpy", "fixed rows")]
            print(f"{key:<14}{statistics.median(ts):>10.0f}{ratios[0]:>10.1f}{ratios[1]:>14.2f}")


if __name__ == "__main__":
    main()
