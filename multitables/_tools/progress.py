"""Progress of the command line's long phases on stderr, in MB and MB/s (internal)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:24}| {n:,.0f}/{total:,.0f} MB, {rate_fmt}"


def progress_bar(label: str, total: int) -> tqdm:
    """The progress of one phase (``total`` bytes) on stderr, in MB and MB/s: redrawn in place
    and cleared when done on a terminal; in a log, its last state stays, one line a phase."""
    on_tty = sys.stderr.isatty()
    # A log gets the bar as it starts and as it ends: writing it per block is noise there.
    return tqdm(total=max(1, total) / 1e6, desc=label, unit="MB", file=sys.stderr,
                leave=not on_tty, mininterval=0.1 if on_tty else float("inf"),
                ascii=not on_tty, bar_format=_BAR_FORMAT)


def ticks(bar: tqdm) -> Any:
    """The ``tick(nbytes)`` that the measuring functions call, moving ``bar``."""

    def tick(nbytes: int) -> None:
        bar.update(nbytes / 1e6)
        if bar.total is not None and bar.n > bar.total:  # a reader may read past its estimate
            bar.total = bar.n

    return tick


def mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.1f} MB"

