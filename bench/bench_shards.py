"""Shuffled Loader epochs over many shard files against the same rows in one file.

    python bench/bench_shards.py [--size-mb 1024] [--small 1000] [--small-rows 100]
                                 [--big 64] [--vds 8] [--rounds 3]
                                 [--only small small_f32 big vds_f32 vds_f32_gzip]

Two cases, each its shards against one file holding the same rows, round-robin over the rounds
(one Loader of each kept for all rounds, as a training loop keeps one; each round plays another
epoch, ``set_epoch``), batches of 256, 2 worker processes, ``shuffle=True``, default window:
  - ``small``: ``--small`` shards of ``--small-rows`` rows each (1,000 of 100 by default) of
    the bench's gzip images (uint8 (64, 64), shuffle + gzip 4, chunks of the shard's rows)
    beside int64 labels (gzip), against one file of those rows chunked as the bench's
    (images in 256-row chunks, labels in 1,024-row chunks).
  - ``small_f32``: the same with the bench's uncompressed float32 rows of 4 KiB (and
    uncompressed labels), the one file in 1 MiB chunks.
  - ``big``: the bench's gzip images and labels (``bench_loader.labelled_images`` of
    ``img_gzip`` at ``--compressed-mb``) cut into ``--big`` shards (64 by default), the image
    chunks copied as stored, against that file.
And ``vds_f32``, ``vds_f32_gzip``: the Streamer's queue (``get_queue``, blocks of one chunk,
2 workers) over a virtual dataset stitching ``--vds`` source files (8 by default) of the bench's
``f32`` (uncompressed) or ``f32_gzip`` file, cut in whole chunks, against that file.
Shards are written once in the cache directory and reused. Printed per case: samples/s of both,
the median of the per-round ratios (shards / one file), each round's ratio, and a new Loader's
first batch over the shards (from its construction: the files described, workers started). The
first batch of both is checked against h5py first. See bench/README.md, "Many files".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import bench_loader
import common
import datafiles
import h5py
import numpy as np

import multitables
from multitables._tools import measure as m

BATCH = 256
N_PROCS = 2
VERSION = 1  # bump when a recipe below changes
COLUMNS = {"image": "/images", "label": "/labels"}
# shards (or a virtual dataset's sources) / one file, samples/s, at least
TARGETS = {"small": 0.7, "small_f32": 0.7, "big": 0.9, "vds_f32": 0.8, "vds_f32_gzip": 0.8}


def _write_columns(path: str, images: np.ndarray, labels: np.ndarray, image_chunk: int,
                   label_chunk: int) -> None:
    """Images and labels as the bench writes them: gzip images and labels, or (float32 rows)
    uncompressed rows and labels."""
    gzip = images.dtype == np.uint8
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images,
                         chunks=(min(image_chunk, len(images)), *images.shape[1:]),
                         **({"compression": "gzip", "compression_opts": 4, "shuffle": True}
                            if gzip else {}))
        f.create_dataset("labels", data=labels, chunks=(min(label_chunk, len(labels)),),
                         **({"compression": "gzip"} if gzip else {}))


def _finish(partial: str, final: str) -> str:
    os.replace(partial, final)
    return final


def small_files(directory: str, n_files: int, rows: int, kind: str) -> tuple[list[str], str]:
    """``n_files`` shards of ``rows`` rows, and one file of the same rows (written once):
    ``kind`` ``img_gzip`` (the bench's gzip images) or ``f32`` (its uncompressed rows)."""
    folder = os.path.join(directory, f"shards-{kind}-{n_files}x{rows}-v{VERSION}")
    paths = [os.path.join(folder, f"part-{i:05d}.h5") for i in range(n_files)]
    one = os.path.join(folder, "one-file.h5")
    if all(os.path.exists(p) for p in paths + [one]):
        return paths, one
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(5)
    images = datafiles.images(rng, n_files * rows) if kind == "img_gzip" else m.smooth_rows(
        rng, n_files * rows)
    labels = rng.integers(0, 10, n_files * rows)
    for i, path in enumerate(paths):
        part = slice(i * rows, (i + 1) * rows)
        _write_columns(path + ".partial", images[part], labels[part], rows, rows)
        _finish(path + ".partial", path)
    _write_columns(one + ".partial", images, labels, datafiles.CHUNK_ROWS, 1024)
    return paths, _finish(one + ".partial", one)


def big_files(one: str, n_files: int) -> list[str]:
    """``one`` (images and labels) cut into ``n_files`` shards of whole image chunks, the
    chunks copied as stored (written once, beside ``one``)."""
    folder = f"{os.path.splitext(one)[0]}-{n_files}shards-v{VERSION}"
    paths = [os.path.join(folder, f"part-{i:03d}.h5") for i in range(n_files)]
    if all(os.path.exists(p) for p in paths):
        return paths
    os.makedirs(folder, exist_ok=True)
    with h5py.File(one, "r") as src:
        images, labels = src["images"], src["labels"]
        n, chunk = images.shape[0], images.chunks[0]
        n_chunks = -(-n // chunk)
        if n_chunks < n_files:
            raise ValueError(f"{one} has {n_chunks} chunks, fewer than {n_files} shards: "
                             "raise --compressed-mb")
        for i, path in enumerate(paths):  # whole chunks per shard, as many as can be
            lo = i * n_chunks // n_files * chunk
            hi = min((i + 1) * n_chunks // n_files * chunk, n)
            with h5py.File(path + ".partial", "w") as dst:
                out = dst.create_dataset("images", (hi - lo, 64, 64), np.uint8,
                                         chunks=images.chunks, compression="gzip",
                                         compression_opts=4, shuffle=True)
                for row in range(lo, hi, chunk):
                    mask, raw = images.id.read_direct_chunk((row, 0, 0))
                    out.id.write_direct_chunk((row - lo, 0, 0), raw, mask)
                dst.create_dataset("labels", data=labels[lo:hi],
                                   chunks=(max(1, min(labels.chunks[0], hi - lo)),),
                                   compression="gzip")
            _finish(path + ".partial", path)
    return paths


def shards_row_bytes(one: str) -> int:
    with h5py.File(one, "r") as f:
        return sum(f[p].dtype.itemsize * int(np.prod(f[p].shape[1:])) for p in COLUMNS.values())


def check_first_batch(loader: multitables.Loader, one: str) -> None:
    """Epoch 0's first batch of ``loader`` against h5py's rows of ``one`` (the same rows)."""
    s = bench_loader.Setup(one, COLUMNS, "/images", list(COLUMNS.values()), loader.n_rows,
                           datafiles.CHUNK_ROWS, shards_row_bytes(one), 0)
    bench_loader.check_first_batch(loader, s)


def first_batch(files: list[str]) -> float:
    """Seconds from making a Loader over ``files`` to holding its first batch."""
    t0 = time.perf_counter()
    with multitables.Loader(files, COLUMNS, BATCH, shuffle=True, n_procs=N_PROCS) as loader:
        it = iter(loader)
        next(it)
        took = time.perf_counter() - t0
        it.close()
    return took


def bench_case(name: str, shards: list[str], one: str, rounds: int) -> dict:
    """Shuffled epochs of a Loader over ``shards`` against one over ``one``, round-robin."""
    for path in [one, *shards]:
        m.warm_page_cache(path)
    with h5py.File(one, "r") as f:
        n, what = f["images"].shape[0], ("uint8 (64, 64) images, shuffle + gzip 4, and int64 "
                                         "labels" if f["images"].compression else
                                         "uncompressed float32 (1024,) rows and int64 labels")
    labels = {"one file": one, f"{len(shards)} shards": shards}
    loaders = {label: multitables.Loader(files, COLUMNS, BATCH, shuffle=True, seed=1,
                                         n_procs=N_PROCS)
               for label, files in labels.items()}
    try:
        for loader in loaders.values():  # workers up, answers right
            check_first_batch(loader, one)
        readers: dict[str, Callable[[int], bench_loader.Pass]] = {
            label: bench_loader.loader_epoch(loader) for label, loader in loaders.items()}
        results = bench_loader.run_rounds(readers, rounds)
        units = {label: (loader.unit_rows, loader.window) for label, loader in loaders.items()}
    finally:
        for loader in loaders.values():
            loader.close()
    firsts = [first_batch(shards) for _ in range(rounds)]
    base, many = labels
    row_bytes = shards_row_bytes(one)
    head = ["reader", "samples/s", "MB/s", "x one file", "first batch ms", "unit rows",
            "window rows", "per round x one file"]
    table, out = [head], {}
    for reader in results.passes:
        rate = results.median_rate(reader)
        ratios = results.ratios(reader, base)
        first = statistics.median(p.first_batch_s for p in results.passes[reader])
        table.append([reader, f"{rate:,.0f}", f"{rate * row_bytes / 1e6:,.0f}",
                      f"{statistics.median(ratios):.2f}", f"{first * 1e3:.1f}",
                      str(units[reader][0]), str(units[reader][1]),
                      " ".join(f"{r:.2f}" for r in ratios)])
        out[reader] = {"samples_per_s": [results.rate(reader, r) for r in range(rounds)],
                       "median_samples_per_s": rate, "ratios_over_one_file": ratios,
                       "first_batch_in_epoch_s": [p.first_batch_s
                                                  for p in results.passes[reader]]}
    print(f"\n== {name}: {len(shards)} shards of about {n // len(shards):,} rows against one "
          f"file of {n:,} rows ({what}); batches of {BATCH}, n_procs={N_PROCS}, {rounds} "
          "rounds")
    print(m.format_table(table))
    print(f"a new Loader over the shards, its first batch (files described, workers started): "
          f"{statistics.median(firsts) * 1e3:.0f} ms median")
    ratio = results.median_ratio(many, base)
    print("target: " + m.check(f"{many} / one file", ratio, TARGETS[name]))
    return {"shards": len(shards), "rows": n, "one_file": one, "readers": out,
            "median_ratio": ratio, "new_loader_first_batch_s": firsts}


def vds_files(one: str, path: str, n_files: int) -> str:
    """A virtual dataset stitching ``path`` of ``one`` cut into ``n_files`` source files of
    whole chunks (copied as stored), written once beside ``one``; returns its file."""
    folder = f"{os.path.splitext(one)[0]}-vds{n_files}-v{VERSION}"
    vds = os.path.join(folder, "stitched.h5")
    if os.path.exists(vds):
        return vds
    os.makedirs(folder, exist_ok=True)
    with h5py.File(one, "r") as src:
        ds = src[path]
        n, chunk = ds.shape[0], ds.chunks[0]
        n_chunks = -(-n // chunk)
        layout = h5py.VirtualLayout(ds.shape, ds.dtype)
        kw = {"compression": ds.compression, "compression_opts": ds.compression_opts,
              "shuffle": ds.shuffle}
        for i in range(n_files):
            lo = i * n_chunks // n_files * chunk
            hi = min((i + 1) * n_chunks // n_files * chunk, n)
            name = f"part-{i}.h5"
            with h5py.File(os.path.join(folder, name + ".partial"), "w") as dst:
                out = dst.create_dataset("x", (hi - lo, *ds.shape[1:]), ds.dtype,
                                         chunks=ds.chunks, **kw)
                tail = (0,) * (len(ds.shape) - 1)
                for row in range(lo, hi, chunk):
                    mask, raw = ds.id.read_direct_chunk((row, *tail))
                    out.id.write_direct_chunk((row - lo, *tail), raw, mask)
            _finish(os.path.join(folder, name + ".partial"), os.path.join(folder, name))
            layout[lo:hi] = h5py.VirtualSource(name, "x", shape=(hi - lo, *ds.shape[1:]))
    with h5py.File(vds + ".partial", "w") as f:
        f.create_virtual_dataset("x", layout)
    return _finish(vds + ".partial", vds)


def bench_vds(name: str, one: str, path: str, n_files: int, rounds: int) -> dict:
    """The Streamer's queue over a virtual dataset of ``n_files`` sources against the same
    rows in one file, round-robin."""
    vds = vds_files(one, path, n_files)
    folder = os.path.dirname(vds)
    for f in [one, *(os.path.join(folder, p) for p in os.listdir(folder))]:
        m.warm_page_cache(f)
    with h5py.File(one, "r") as f:
        ds = f[path]
        block = m.default_block_size(ds.shape, ds.dtype, ds.chunks)
        n, row_bytes = ds.shape[0], ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
    with h5py.File(vds, "r") as f:
        np.testing.assert_array_equal(f["x"][:block], h5py.File(one, "r")[path][:block])
    streamers = {"one file": (multitables.Streamer(one), path),
                 f"virtual, {n_files} sources": (multitables.Streamer(vds), "/x")}
    try:
        with streamers[f"virtual, {n_files} sources"][0].get_queue(
                "/x", n_procs=N_PROCS, block_size=block, remainder=True, ordered=True) as q:
            with h5py.File(one, "r") as f:  # a benchmark of wrong answers would be worthless
                at = 0
                for guard in q.iter():
                    with guard as b:
                        if at < 4 * block:
                            np.testing.assert_array_equal(b, f[path][at : at + len(b)])
                        at += len(b)
        readers = {label: bench_loader.queue_epoch(streamer, p, block)
                   for label, (streamer, p) in streamers.items()}
        results = bench_loader.run_rounds(readers, rounds)
    finally:
        for streamer, _ in streamers.values():
            streamer.close()
    base, many = streamers
    head = ["reader", "rows/s", "MB/s", "x one file", "per round x one file"]
    table = [head]
    for reader in results.passes:
        rate = results.median_rate(reader)
        ratios = results.ratios(reader, base)
        table.append([reader, f"{rate:,.0f}", f"{rate * row_bytes / 1e6:,.0f}",
                      f"{statistics.median(ratios):.2f}", " ".join(f"{r:.2f}" for r in ratios)])
    what = datafiles.SPECS[name].what
    print(f"\n== vds {name}: the Streamer's queue (n_procs={N_PROCS}, blocks of {block} rows) "
          f"over a virtual dataset of {n_files} source files against one file; {n:,} rows of "
          f"{what}; {rounds} rounds")
    print(m.format_table(table))
    ratio = results.median_ratio(many, base)
    print("target: " + m.check(f"{many} / one file", ratio, TARGETS[f"vds_{name}"]))
    return {"rows": n, "block": block, "median_ratio": ratio,
            "ratios": results.ratios(many, base),
            "rows_per_s": {r: [results.rate(r, k) for k in range(rounds)]
                           for r in results.passes}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=3)
    p.add_argument("--small", type=int, default=1000, help="small shards (default 1000)")
    p.add_argument("--small-rows", type=int, default=100, help="rows per small shard")
    p.add_argument("--big", type=int, default=64, help="shards of the bench's file (64)")
    p.add_argument("--vds", type=int, default=8, help="source files of the virtual dataset")
    p.add_argument("--only", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    args = p.parse_args(argv)
    m.load_filter_plugins()
    print("shuffled epochs over shards against one file; MB = 1e6 bytes; ratios are medians "
          "of per-round ratios")
    results = {}
    for name, kind in (("small", "img_gzip"), ("small_f32", "f32")):
        if name in args.only:
            shards, one = small_files(args.dir, args.small, args.small_rows, kind)
            results[name] = bench_case(name, shards, one, args.rounds)
    if "big" in args.only:
        spec = datafiles.SPECS["img_gzip"]
        filename = datafiles.ensure(spec, args.dir, datafiles.compressed_mb(args))
        one = bench_loader.labelled_images(filename, spec.path)
        results["big"] = bench_case("big", big_files(one, args.big), one, args.rounds)
    for name in ("f32", "f32_gzip"):
        if f"vds_{name}" in args.only:
            spec = datafiles.SPECS[name]
            filename = datafiles.ensure(spec, args.dir, datafiles.compressed_mb(args)
                                        if spec.small else args.size_mb)
            results[f"vds_{name}"] = bench_vds(name, filename, spec.path, args.vds,
                                               args.rounds)
    out = m.dump_json(common.json_path(args, "shards"), {"script": "bench_shards",
                                                         "args": vars(args), "cases": results})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
