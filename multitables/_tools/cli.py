"""The ``python -m multitables`` command line: ``info``, ``bench`` and ``tune`` on a user's files.

Needs only numpy and h5py (and multitables itself for ``bench`` and ``tune``); matplotlib is used
for ``tune --plot`` when it is installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import measure as m
from .info import cmd_info
from .tune import cmd_bench, cmd_tune


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="multitables", description="Inspect, benchmark and tune multitables on HDF5 files.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="list datasets with chunking, filters and block size")
    info.add_argument("file", help="a path, or a URL: s3://bucket/key.h5, http(s)://...")
    info.set_defaults(func=cmd_info)

    b = sub.add_parser("bench", help="MB/s of h5py vs Streamer queue vs generator",
                       description="Stream a dataset with plain h5py and with multitables. With "
                       "no FILE PATH, a sample float32 (N, 1024) dataset in 1 MiB chunks, stored "
                       "plainly and with gzip, is written to a temporary directory and removed "
                       "afterwards.")
    b.add_argument("file", nargs="?")
    b.add_argument("path", nargs="?")
    b.add_argument("--n-procs", type=int, default=None, help="workers (default: min(4, cores))")
    b.add_argument("--block-size", type=int, default=None, help="rows per block (default: "
                   "whole chunks of about 1 MiB, as `info` suggests)")
    b.add_argument("--size-mb", type=float, default=256,
                   help="size of each sample dataset (default 256)")
    b.add_argument("--rounds", type=int, default=3, help="rounds, readers interleaved (default 3)")
    b.add_argument("--json", metavar="OUT", help="also write the results as JSON ('-': stdout)")
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser("tune", help="grid of block_size x n_procs; prints the best choice")
    t.add_argument("file")
    t.add_argument("path")
    t.add_argument("--block-sizes", type=int, nargs="+", help="rows (default: whole chunks "
                   "doubling from about 128 KiB, 6 sizes)")
    t.add_argument("--max-procs", type=int, default=None, help="n_procs 1..this (default: cores)")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--max-mb", type=float, default=512, help="stop each run after this many MB "
                   "(default 512; 0: whole dataset)")
    t.add_argument("--plot", metavar="PNG", help="write a plot (needs matplotlib)")
    t.add_argument("--json", metavar="OUT", help="also write the results as JSON ('-': stdout)")
    t.set_defaults(func=cmd_tune)
    for command in (info, b, t):
        command.add_argument(
            "--storage-options", metavar="JSON", help="for a URL: storage_options as JSON, "
            "e.g. '{\"endpoint_url\": \"http://127.0.0.1:9000\", \"anon\": true}' (S3 keys, "
            "region and endpoint otherwise come from the AWS environment)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    m.load_filter_plugins()
    for name in ("n_procs", "block_size", "rounds", "max_procs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {value}")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:  # h5py's text is HDF5's error stack: say it plainly
        print(f"error: no such file: {getattr(args, 'file', None) or exc.filename}",
              file=sys.stderr)
        return 1
    except (KeyError, OSError) as exc:
        # A KeyError's text is the repr of its argument: print the argument.
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}",
              file=sys.stderr)
        return 1
