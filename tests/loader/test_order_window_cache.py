"""An epoch's order keeps the rows of the windows last asked for, not of every window it met."""

from __future__ import annotations

import gc
import tracemalloc

from multitables._loader.order import EpochOrder


def test_playing_an_epoch_keeps_about_two_windows_of_rows():
    """Bug guarded: the cache of window rows never evicts, so an order that has played its
    epoch holds the rows of every window (memory that grows with the epoch, 200 windows here,
    instead of staying at the two windows a reader crossing a window bound needs). What the
    order still holds once every window was asked for must stay within a few windows."""
    n_rows, unit_rows, window_units = 200_000, 100, 10  # 200 windows of 1,000 rows
    window_bytes = unit_rows * window_units * 8  # int64 row numbers
    gc.collect()
    tracemalloc.start()
    try:
        order = EpochOrder(n_rows, unit_rows, window_units, shuffle=True, seed=3, epoch=1)
        before = tracemalloc.get_traced_memory()[0]
        for w in range(order.n_windows):
            start, stop = order.window_bounds(w)
            order.rows(start, min(stop, start + 10))  # a batch from each window, then dropped
            order.rows_at([stop - 1])
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert order.n_windows == 200
    assert kept < 4 * window_bytes, (
        f"the order kept {kept} bytes after its epoch: {kept / window_bytes:.0f} windows' rows")
