"""The benchmark files, written once per size into a cache directory and reused after that.

Run alone to write them and print what they hold:

    python bench/datafiles.py [--dir DIR] [--size-mb 1024] [--compressed-mb 1024] [--only f32 ...]

Every file is named after its recipe, its size and VERSION (bump it when a recipe changes), and is
written under a temporary name then renamed, so an interrupted run never leaves a file that looks
finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import h5py
import numpy as np

from multitables._tools import measure as m

VERSION = 1
DEFAULT_DIR = os.path.join(tempfile.gettempdir(), "multitables-bench")
ROW = 4096  # bytes in one float32 (1024,) row and in one (64, 64) uint8 image
CHUNK_ROWS = 256  # 256 rows x 4 KiB = 1 MiB chunks
STEP = 16384  # rows generated and written at a time (64 MiB): bounded memory, few HDF5 calls


@dataclass(frozen=True)
class Spec:
    """One benchmark file: what it holds and how it is compressed."""

    name: str
    what: str
    path: str
    small: bool  # sized by --compressed-mb (compression makes writing slow), not --size-mb


SPECS = {
    s.name: s for s in [
        Spec("f32", "float32 (N, 1024), 1 MiB chunks, uncompressed", "/data", False),
        Spec("f32_gzip", "float32 (N, 1024), 1 MiB chunks, gzip level 4", "/data", True),
        Spec("img_gzip", "uint8 (N, 64, 64) images, 1 MiB chunks, shuffle + gzip 4", "/data", True),
        Spec("f32_lzf", "float32 (N, 1024), 1 MiB chunks, lzf", "/data", True),
        Spec("f32_blosc", "float32 (N, 1024), 1 MiB chunks, Blosc zstd 5 + shuffle", "/data",
             True),
        Spec("table", "PyTables table {image: u1 (64, 64), vec: f8 (16,), label: f4}, "
             "PyTables' default chunkshape, uncompressed", "/table", True),
    ]
}


def images(rng: np.random.Generator, n: int) -> np.ndarray:
    """Smooth uint8 (n, 64, 64) images with a little noise, posterized: gzip packs them ~2.6x.

    A bilinear blow-up of random 9 x 9 images, plus noise of sigma 2, in steps of 8 grey levels.
    Without the steps deflate finds almost no repeats (1.05x); without noise it is too easy.
    """
    lo = rng.uniform(0, 255, (n, 9, 9)).astype(np.float32)
    g = np.linspace(0, 8, 64, dtype=np.float32)
    i0 = np.minimum(g.astype(np.intp), 7)
    f = g - i0
    a = lo[:, i0, :] * (1 - f)[None, :, None] + lo[:, i0 + 1, :] * f[None, :, None]
    img = a[:, :, i0] * (1 - f) + a[:, :, i0 + 1] * f
    img += rng.normal(0, 2, img.shape).astype(np.float32)
    return np.clip(np.floor(img / 8) * 8, 0, 255).astype(np.uint8)


def _write_array(filename: str, spec: Spec, size_mb: float, tick: Callable[[int], None]) -> None:
    n = max(CHUNK_ROWS, int(size_mb * 1e6) // ROW // CHUNK_ROWS * CHUNK_ROWS)
    rng = np.random.default_rng(1)
    if spec.name == "img_gzip":
        shape: tuple[int, ...] = (n, 64, 64)
        dtype: type = np.uint8
        kw: dict = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    else:
        shape, dtype = (n, 1024), np.float32
        if spec.name == "f32_gzip":
            kw = {"compression": "gzip", "compression_opts": 4}
        elif spec.name == "f32_lzf":
            kw = {"compression": "lzf"}
        elif spec.name == "f32_blosc":
            import hdf5plugin

            kw = dict(hdf5plugin.Blosc(cname="zstd", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
        else:
            kw = {}
    with h5py.File(filename, "w") as f:
        ds = f.create_dataset(spec.path, shape, dtype, chunks=(CHUNK_ROWS,) + shape[1:], **kw)
        for start in range(0, n, STEP):
            stop = min(start + STEP, n)
            block = images(rng, stop - start) if dtype is np.uint8 else m.smooth_rows(
                rng, stop - start)
            ds[start:stop] = block
            tick(block.nbytes)


def _write_table(filename: str, spec: Spec, size_mb: float, tick: Callable[[int], None]) -> None:
    import tables

    class Row(tables.IsDescription):
        image = tables.UInt8Col(shape=(64, 64), pos=0)
        vec = tables.Float64Col(shape=(16,), pos=1)
        label = tables.Float32Col(pos=2)

    row_bytes = 64 * 64 + 16 * 8 + 4
    n = max(1024, int(size_mb * 1e6) // row_bytes)
    rng = np.random.default_rng(2)
    with tables.open_file(filename, "w") as f:
        table = f.create_table("/", spec.path.lstrip("/"), Row, expectedrows=n)
        for start in range(0, n, STEP):
            rows = min(STEP, n - start)
            block = np.empty(rows, table.dtype)
            block["image"] = images(rng, rows)
            block["vec"] = m.smooth_rows(rng, rows, 16)
            block["label"] = rng.integers(0, 10, rows)
            table.append(block)
            tick(block.nbytes)


def ensure(spec: Spec, directory: str, size_mb: float,
           tick: Callable[[int], None] = lambda n: None) -> str:
    """The file for ``spec`` at ``size_mb``: reused if present, else written."""
    filename = os.path.join(directory, f"{spec.name}-{size_mb:g}mb-v{VERSION}.h5")
    if os.path.exists(filename):
        return filename
    os.makedirs(directory, exist_ok=True)
    partial = filename + f".partial-{os.getpid()}"
    try:
        (_write_table if spec.name == "table" else _write_array)(partial, spec, size_mb, tick)
        os.replace(partial, filename)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return filename


def prepare(names: Iterable[str], directory: str, size_mb: float, compressed_mb: float,
            warm: bool = True, log: Callable[[str], None] = print) -> dict[str, tuple[str, str]]:
    """Write (or reuse) the named files and read each once into the page cache.

    Returns ``{name: (filename, dataset path)}``.
    """
    out = {}
    for name in names:
        spec = SPECS[name]
        size = compressed_mb if spec.small else size_mb
        t0 = time.perf_counter()
        filename = ensure(spec, directory, size)
        took = time.perf_counter() - t0
        if took > 1:
            log(f"wrote {filename} in {took:.0f} s")
        if warm:
            m.warm_page_cache(filename)
        out[name] = (filename, spec.path)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options every script in bench/ shares for choosing its files."""
    p.add_argument("--dir", default=DEFAULT_DIR, help=f"cache of files (default {DEFAULT_DIR})")
    p.add_argument("--size-mb", type=float, default=1024,
                   help="size of the uncompressed float32 file in MB (default 1024)")
    p.add_argument("--compressed-mb", type=float, default=None,
                   help="uncompressed size of the compressed files and the table "
                   "(default: size-mb, so start-up is a small share of every pass)")


def compressed_mb(args: argparse.Namespace) -> float:
    return args.compressed_mb if args.compressed_mb is not None else args.size_mb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--only", nargs="+", choices=list(SPECS), default=list(SPECS))
    args = p.parse_args(argv)
    from multitables._tools.info import cmd_info

    files = prepare(args.only, args.dir, args.size_mb, compressed_mb(args), warm=False,
                    log=lambda s: print(s, file=sys.stderr))
    for name, (filename, _path) in files.items():
        print(f"\n{name}: {SPECS[name].what}")
        cmd_info(argparse.Namespace(file=filename))
    return 0


if __name__ == "__main__":
    sys.exit(main())
