"""Run every benchmark in turn with the same files and rounds: stream, hand-over, random access,
shuffled training epochs (the Loader) and dask.

    python bench/run_all.py [--dir DIR] [--size-mb 1024] [--compressed-mb 256] [--rounds 5]

Options other than these go to no script; run a script alone to use its own options.
"""

from __future__ import annotations

import argparse
import sys

import bench_dask
import bench_handover
import bench_loader
import bench_random
import bench_stream
import datafiles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    datafiles.add_arguments(p)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args(argv)
    common = ["--dir", args.dir, "--size-mb", str(args.size_mb), "--rounds", str(args.rounds)]
    if args.compressed_mb is not None:
        common += ["--compressed-mb", str(args.compressed_mb)]
    if args.no_torch:
        common.append("--no-torch")
    for script in (bench_stream, bench_handover, bench_random, bench_loader, bench_dask):
        print(f"\n######## {script.__name__}\n", flush=True)
        script.main(common)
    return 0


if __name__ == "__main__":
    sys.exit(main())
