"""copy=False on unfiltered data: a batch is a slot of the ring lent to the caller. The slot stays
the caller's until the next batch is asked for, then reads as poison for one batch more; only
then may the workers fill it again."""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

import multitables

N_ROWS, BATCH = 1000, 16
HOLD = 0.2  # how long the caller reads a batch: ample for a worker to refill a freed slot


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    """``x`` is the row number as float64 (unfiltered, so batches are read into lent slots)."""
    path = str(tmp_path_factory.mktemp("lending") / "rows.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(N_ROWS, dtype="<f8"))
    return path


def rows_of_batch(k: int) -> np.ndarray:
    return np.arange(k * BATCH, min((k + 1) * BATCH, N_ROWS), dtype="<f8")


@pytest.mark.timeout(30)
def test_a_lent_batch_is_not_overwritten_while_the_caller_holds_it(path):
    """Bug guarded: with ``copy=False`` the slot of the batch just lent goes straight back to
    the workers (no hold until the next request), so a worker reads the next rows into the very
    memory the caller is reading: the batch changes under it. Here the caller holds each batch
    a while before it checks it; the batch before must read as poison, and stay so, meanwhile
    (the slot is kept one batch more so that a late use reads poison, not other rows)."""
    with multitables.Loader(path, "x", BATCH, n_procs=1, copy=False) as loader:
        it = iter(loader)
        before = None
        for k in range(4):
            batch = next(it)
            np.testing.assert_array_equal(batch, rows_of_batch(k))
            time.sleep(HOLD)  # the workers fill every slot they are given meanwhile
            np.testing.assert_array_equal(
                batch, rows_of_batch(k),
                err_msg=f"batch {k} changed while the caller held it: its slot went back to "
                        "the workers when it was lent")
            if before is not None:
                assert np.isnan(before).all(), (
                    f"batch {k - 1}, asked past, reads {before[:4]}... instead of poison: "
                    "its slot went back to the workers at once")
            before = batch
        it.close()
