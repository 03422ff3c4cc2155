"""A timing harness that runs named readers round-robin and reports MB/s and ratios (internal).

Shared by ``python -m multitables bench``/``tune`` and the scripts in ``bench/``, so that every
number the project quotes comes from the same loop. A reader is a callable that does its work when
called and returns the bytes it delivered, or ``(bytes, seconds)`` when it timed a steady-state part
itself (for example from the first block received to the last, leaving worker start-up out).
MB means 10**6 bytes.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._hdf5.source import FileRef, default_block_size, register_filter_plugins

__all__ = ["default_block_size"]  # the engine's rule, for the CLI and bench/

MiB = 1 << 20
Tick = Callable[[int], None]


def _noop(nbytes: int) -> None:
    pass


# -------------------------------------------------------------------------------- harness


@dataclass
class Report:
    """MB/s of each named reader in each round, and the baseline the ratios divide by."""

    rates: dict[str, list[float]]
    baseline: str | None = None
    seconds: dict[str, list[float]] = field(default_factory=dict)
    nbytes: dict[str, list[int]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.rates[name])

    def ratios(self, name: str, base: str | None = None) -> list[float]:
        """Per-round ratios ``name / base``: both ran in the same round, so drift cancels out."""
        base = base or self.baseline
        if base is None:
            raise ValueError("no baseline named")
        pairs = zip(self.rates[name], self.rates[base], strict=True)
        return [a / b if b > 0 else float("nan") for a, b in pairs]

    def median_ratio(self, name: str, base: str | None = None) -> float:
        return statistics.median(self.ratios(name, base))

    def table(self, limit: float | None = None, limit_name: str = "limit") -> str:
        """Plain text: median MB/s, median and per-round ratios to the baseline, % of a limit."""
        rows = [["reader", "MB/s", "x " + (self.baseline or "-"), "per round"]]
        if limit:
            rows[0].insert(3, "of " + limit_name)
        for name in self.rates:
            med = self.median(name)
            row = [name, f"{med:,.0f}"]
            if self.baseline:
                per = self.ratios(name)
                row += [f"{self.median_ratio(name):.2f}", " ".join(f"{r:.2f}" for r in per)]
            else:
                row += ["-", ""]
            if limit:
                row.insert(3, f"{med / limit:.0%}")
            rows.append(row)
        return format_table(rows)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"baseline": self.baseline, "readers": {}}
        for name, rates in self.rates.items():
            entry: dict[str, Any] = {
                "mb_per_s": rates,
                "median_mb_per_s": self.median(name),
                "seconds": self.seconds.get(name, []),
                "bytes": self.nbytes.get(name, []),
            }
            if self.baseline:
                entry["ratios"] = self.ratios(name)
                entry["median_ratio"] = self.median_ratio(name)
            out["readers"][name] = entry
        return out


def run_rounds(
    readers: Mapping[str, Callable[[], int | tuple[int, float]]],
    rounds: int = 3,
    baseline: str | None = None,
    on_start: Callable[[str, int], None] | None = None,
) -> Report:
    """Run every reader once per round, round-robin, and collect MB/s.

    The start of the order rotates each round, so no reader always runs right after the same
    neighbour (a reader that leaves the page cache or the CPU clock in some state would otherwise
    bias the next one the same way every round).
    """
    if baseline is not None and baseline not in readers:
        raise ValueError(f"baseline {baseline!r} is not one of {list(readers)}")
    names = list(readers)
    report = Report({n: [] for n in names}, baseline)
    report.seconds = {n: [] for n in names}
    report.nbytes = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            if on_start is not None:
                on_start(name, r)
            t0 = time.perf_counter()
            got = readers[name]()
            elapsed = time.perf_counter() - t0
            nbytes, secs = got if isinstance(got, tuple) else (got, elapsed)
            report.rates[name].append(nbytes / secs / 1e6 if secs > 0 else float("nan"))
            report.seconds[name].append(secs)
            report.nbytes[name].append(int(nbytes))
    return report


def format_table(rows: list[list[str]]) -> str:
    """Left-align the first column, right-align the others."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for j, row in enumerate(rows):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def check(label: str, value: float, target: float, at_least: bool = True, unit: str = "x") -> str:
    """One line of a target list: the measured value next to the bar, with pass/FAIL."""
    ok = value >= target if at_least else value <= target
    sign = ">=" if at_least else "<="
    verdict = "pass" if ok else "FAIL"
    return f"  [{verdict}] {label}: {value:.2f}{unit} (target {sign} {target}{unit})"


# -------------------------------------------------------------------------------- JSON


def environment() -> dict[str, Any]:
    """What a result depends on besides the code: versions, cores, host, commit."""
    import h5py

    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
    }
    try:
        env["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def dump_json(path: str, payload: Mapping[str, Any]) -> str:
    """Write ``payload`` plus the environment as indented JSON; ``-`` writes to stdout."""
    text = json.dumps({"environment": environment(), **payload}, indent=2, default=_jsonable)
    if path == "-":
        print(text)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# -------------------------------------------------------------------------------- readers


def load_filter_plugins() -> bool:
    """Import hdf5plugin when installed, so Blosc, Zstd, LZ4... files read here and in workers."""
    return register_filter_plugins()


def warm_page_cache(filename: str, tick: Tick = _noop) -> int:
    """Read the whole file once, so every reader starts from the same warm page cache."""
    total = 0
    buf = bytearray(16 * MiB)
    with open(filename, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
            tick(n)
    return total


def h5py_read_direct(filename: str, path: str, block_size: int, tick: Tick = _noop,
                     max_blocks: int | None = None, **file_kw: Any) -> int:
    """One process: ``read_direct`` of consecutive blocks into one reused buffer (h5py at best)."""
    import h5py

    with h5py.File(filename, "r", **file_kw) as f:
        ds = f[path]
        n = ds.shape[0]
        if max_blocks is not None:
            n = min(n, max_blocks * block_size)
        buf = np.empty((block_size,) + ds.shape[1:], ds.dtype)
        total = 0
        for start in range(0, n, block_size):
            stop = min(start + block_size, n)
            out = buf if stop - start == block_size else buf[: stop - start]
            ds.read_direct(out, np.s_[start:stop])
            total += out.nbytes
            tick(out.nbytes)
    return total


def h5py_slices(filename: str, path: str, block_size: int, tick: Tick = _noop,
                max_blocks: int | None = None, steady: bool = False, **file_kw: Any
                ) -> int | tuple[int, float]:
    """One process, the way most code reads: ``ds[i:i + b]``, a new array per block.

    With ``steady`` the time runs from the first block received to the last (the same window as
    :func:`mt_queue`'s), and the bytes of the first block are not counted.
    """
    import h5py

    with h5py.File(filename, "r", **file_kw) as f:
        ds = f[path]
        n = ds.shape[0]
        total, t0, count = 0, 0.0, 0
        for start in range(0, n, block_size):
            block = ds[start:start + block_size]
            count += 1
            if count == 1 and steady:
                t0 = time.perf_counter()
            else:
                total += block.nbytes
            tick(block.nbytes)
            if max_blocks is not None and count >= max_blocks:
                break
        if steady:
            return total, time.perf_counter() - t0
    return total


@contextlib.contextmanager
def _streamer(filename: FileRef, streamer: Any):
    """``streamer`` when given (its workers already started: a later epoch), else a new one,
    closed at the end (a first pass: workers started and ended)."""
    import multitables

    if streamer is not None:
        yield streamer
        return
    with multitables.Streamer(filename) as new:
        yield new


def mt_queue(filename: FileRef, path: str, n_procs: int, block_size: int | None,
             tick: Tick = _noop,
             max_blocks: int | None = None, steady: bool = False, streamer: Any = None,
             **queue_kw: Any) -> int | tuple[int, float]:
    """multitables direct queue: zero-copy views of shared memory, remainder included.

    With ``steady`` the time runs from the first block received to the last, which leaves the
    worker start-up out and measures the hand-over of blocks alone. With ``streamer``, a pass of
    that Streamer (whose workers may be standing by from an earlier pass).
    """
    queue_kw.setdefault("remainder", True)
    total, t0, count = 0, 0.0, 0
    with _streamer(filename, streamer) as s, s.get_queue(
            path, n_procs=n_procs, block_size=block_size, **queue_kw) as q:
        for guard in q.iter():
            with guard as block:
                nbytes = block.nbytes
            count += 1
            if count == 1 and steady:
                t0 = time.perf_counter()
            else:
                total += nbytes
            tick(nbytes)
            if max_blocks is not None and count >= max_blocks:
                break
        elapsed = time.perf_counter() - t0
    return (total, elapsed) if steady else total


def mt_loader_epoch(loader: Any, tick: Tick = _noop) -> int:
    """One epoch of a ``Loader`` (shuffled batches the caller owns, as training reads them)."""
    total = 0
    for batch in loader:
        total += batch.nbytes
        tick(batch.nbytes)
    return total


def mt_generator(filename: FileRef, path: str, n_procs: int, block_size: int | None,
                 tick: Tick = _noop, streamer: Any = None, **gen_kw: Any) -> int:
    """multitables generator: one row (a copy) at a time, remainder included."""
    total = pending = 0
    with _streamer(filename, streamer) as s:
        gen = s.get_generator(path, n_procs=n_procs, block_size=block_size, **gen_kw)
        try:
            for row in gen:
                pending += row.nbytes
                # Ticking every row would cost more than the row; report about every MiB.
                if pending >= MiB:
                    total += pending
                    tick(pending)
                    pending = 0
        finally:
            gen.close()
    tick(pending)
    return total + pending


# -------------------------------------------------------------------------------- data


def smooth_rows(rng: np.random.Generator, rows: int, cols: int = 1024) -> np.ndarray:
    """Float32 rows of random walks quantized to 1/16: gzip packs them about 2.3x, not 1000x.

    Pure noise does not compress and constant data compresses absurdly well; both would make decode
    timings meaningless. Quantizing zeroes the low mantissa bits, as sensor data often does.
    """
    walk = np.cumsum(rng.standard_normal((rows, cols), dtype=np.float32), axis=1, dtype=np.float32)
    np.multiply(walk, 16, out=walk)
    np.round(walk, out=walk)
    np.multiply(walk, 1 / 16, out=walk)
    return walk


def write_sample(filename: str, size_mb: float, tick: Tick = _noop, path: str = "data",
                 seed: int = 0, **create_kw: Any) -> int:
    """Write a float32 (N, 1024) dataset of about ``size_mb`` MB in 1 MiB chunks; return N."""
    import h5py

    rows_per_chunk = 256  # 256 rows x 4 KiB = 1 MiB
    n = max(rows_per_chunk, int(size_mb * 1e6) // 4096 // rows_per_chunk * rows_per_chunk)
    rng = np.random.default_rng(seed)
    step = 64 * rows_per_chunk  # write 64 MiB at a time: bounded memory, few HDF5 calls
    with h5py.File(filename, "a") as f:
        ds = f.create_dataset(path, (n, 1024), np.float32, chunks=(rows_per_chunk, 1024),
                              **create_kw)
        for start in range(0, n, step):
            stop = min(start + step, n)
            ds[start:stop] = smooth_rows(rng, stop - start)
            tick((stop - start) * 4096)
    return n
