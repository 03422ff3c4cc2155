"""Hand-over cost: how fast blocks of 1, 16 and 256 rows of 4 KiB reach the consumer.

    python bench/bench_handover.py [--block-sizes 1 16 256] [--rounds 5] [--max-mb 128]

On the float32 (N, 1024) file, multitables' direct queue (n_procs 1 and 2) against a plain h5py
loop ``ds[i:i+b]``. Each reader is timed in steady state, from the first block received to the
last, so worker start-up is left out; at most --max-mb MB or --max-blocks blocks are read per run.
With tiny blocks the time per block is the cost of handing one over: the figure to read is us/block.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import common
import datafiles
import h5py

from multitables._tools import measure as m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_arguments(p, rounds=5)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[1, 16, 256])
    p.add_argument("--max-mb", type=float, default=128, help="MB per run at most (default 128)")
    p.add_argument("--max-blocks", type=int, default=16384, help="blocks per run at most")
    args = p.parse_args(argv)
    (filename, path), = datafiles.prepare(["f32"], args.dir, args.size_mb,
                                          datafiles.compressed_mb(args)).values()
    row = 4096
    with h5py.File(filename, "r") as f:
        n_rows = f[path].shape[0]
    results = {}
    print(f"{filename} {path}: float32 rows of 4 KiB; steady state, {args.rounds} rounds")
    for b in args.block_sizes:
        blocks = max(2, min(args.max_blocks, n_rows // b, int(args.max_mb * 1e6) // (b * row)))
        readers = {
            "h5py ds[i:i+b]": lambda b=b, n=blocks: m.h5py_slices(
                filename, path, b, max_blocks=n, steady=True),
        }
        for procs in (1, 2):
            readers[f"mt queue n_procs={procs}"] = lambda b=b, n=blocks, procs=procs: m.mt_queue(
                filename, path, procs, b, max_blocks=n, steady=True)
        report = m.run_rounds(readers, args.rounds, baseline="h5py ds[i:i+b]")
        # The timed blocks are all but the first (it starts the clock): nbytes / block bytes.
        us = {k: statistics.median(s / (n / (b * row)) * 1e6 for s, n in zip(
            report.seconds[k], report.nbytes[k], strict=True)) for k in readers}
        print(f"\n== block_size {b} rows ({b * row / 1024:g} KiB), {blocks} blocks per run")
        print(report.table())
        print("us per block: " + ", ".join(f"{k} {v:.1f}" for k, v in us.items()))
        results[str(b)] = {"blocks": blocks, "us_per_block": us, "report": report.to_dict()}
    out = m.dump_json(common.json_path(args, "handover"), {"script": "bench_handover",
                                                            "args": vars(args), "block_sizes":
                                                            results})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
