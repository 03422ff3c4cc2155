"""What the bench scripts share: options, the results path, and the PyTorch DataLoader readers."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import datafiles
import h5py
import numpy as np

from multitables._tools import measure as m

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def add_arguments(p: argparse.ArgumentParser, rounds: int) -> None:
    datafiles.add_arguments(p)
    p.add_argument("--rounds", type=int, default=rounds, help=f"rounds (default {rounds})")
    p.add_argument("--json", metavar="OUT", default=None,
                   help="results file (default bench/results/<script>-<time>.json; '-': stdout)")
    p.add_argument("--no-torch", action="store_true", help="leave the PyTorch DataLoader out")


def json_path(args: argparse.Namespace, script: str) -> str:
    if args.json:
        return args.json
    return os.path.join(RESULTS, f"{script}-{time.strftime('%Y%m%d-%H%M%S')}.json")


def run_files(args: argparse.Namespace, script: str, header: str,
              bench_file: Callable[[str, str, str, argparse.Namespace, Any], dict]) -> int:
    """Prepare the chosen files, then bench each from a warm page cache; print, save JSON."""
    m.load_filter_plugins()  # before any worker starts: forked workers inherit the filters
    torch = torch_or_none(args)
    files = datafiles.prepare(args.files, args.dir, args.size_mb, datafiles.compressed_mb(args),
                              log=lambda s: print(s, file=sys.stderr))
    print(f"{header}; MB = 1e6 bytes; ratios are medians of per-round ratios; "
          f"torch: {'yes' if torch else 'no'}")
    results = {}
    for name, (filename, path) in files.items():
        m.warm_page_cache(filename)  # the previous file's run may have pushed it out
        results[name] = bench_file(name, filename, path, args, torch)
    out = m.dump_json(json_path(args, script), {"script": f"bench_{script}",
                                                "args": vars(args), "files": results})
    print(f"\nresults: {out}")
    return 0


def torch_or_none(args: argparse.Namespace) -> Any:
    """The torch module, or None when it is not installed or --no-torch was given."""
    if args.no_torch:
        return None
    try:
        import torch
    except ImportError:
        return None
    return torch


# ---------------------------------------------------------------------------------- PyTorch readers
# A map-style Dataset over an h5py dataset, the way PyTorch users commonly write one: each worker
# opens the file lazily on its first item (an h5py file must not cross a fork). Items come back as
# tensors, which the DataLoader hands over through shared memory rather than pickled through a
# pipe; records of a compound dtype travel as their raw bytes (torch has no structured dtype).


class H5Rows:
    """Rows of an h5py dataset: item ``i`` is block ``i`` of ``block_size`` rows, or, through
    ``__getitems__`` (what a batch sampler calls), the rows of a list of indices."""

    def __init__(self, filename: str, path: str, block_size: int = 1):
        self.filename, self.path, self.block_size = filename, path, block_size
        with h5py.File(filename, "r") as f:
            self.n_rows = f[path].shape[0]
        self.ds: Any = None

    def __len__(self) -> int:
        return -(-self.n_rows // self.block_size)

    def _dataset(self) -> Any:
        if self.ds is None:
            self.ds = h5py.File(self.filename, "r")[self.path]
        return self.ds

    def __getitem__(self, i: int) -> Any:
        b = self.block_size
        return _tensor(self._dataset()[i * b:(i + 1) * b])

    def __getitems__(self, indices: list[int]) -> Any:
        # h5py wants increasing indices; the rows come back sorted, as from ds[np.sort(idx)].
        return _tensor(self._dataset()[np.sort(np.asarray(indices))])


def _tensor(block: np.ndarray) -> Any:
    import torch

    if block.dtype.names:
        block = block.view(np.uint8).reshape(len(block), -1)
    return torch.from_numpy(block)


def _identity(batch: Any) -> Any:
    return batch


def torch_stream(filename: str, path: str, block_size: int, num_workers: int = 2) -> int:
    """Whole dataset, one block per item (batch_size=None): the DataLoader's best case."""
    from torch.utils.data import DataLoader

    loader = DataLoader(H5Rows(filename, path, block_size), batch_size=None,
                        num_workers=num_workers, collate_fn=_identity)
    return sum(t.numel() * t.element_size() for t in loader)


def torch_random(filename: str, path: str, batches: list[np.ndarray],
                 num_workers: int = 2) -> tuple[int, float]:
    """Precomputed random batches through ``batch_sampler``; timed from the first batch received."""
    from torch.utils.data import DataLoader

    loader = DataLoader(H5Rows(filename, path), batch_sampler=[b.tolist() for b in batches],
                        num_workers=num_workers, collate_fn=_identity)
    total, t0 = 0, 0.0
    for k, t in enumerate(loader):
        if k == 0:
            t0 = time.perf_counter()  # workers are up; leave their start-up out
        else:
            total += t.numel() * t.element_size()
    return total, time.perf_counter() - t0
