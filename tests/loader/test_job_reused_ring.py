"""A Loader reuses its ring from one epoch to the next: an epoch that failed leaves nothing of its
failure in the ring, so the next epoch of a healthy file reads through."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import assert_worker_error

import multitables
from multitables._engine import timeouts

N_ROWS, CHUNK, BATCH = 2000, 100, 50


def write(path) -> list[tuple[int, bytes]]:
    """``x`` (the row number, gzip chunks of 100 rows); the offset and bytes of chunk 7."""
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(N_ROWS, dtype="<f8"), chunks=(CHUNK,),
                         compression="gzip")
        info = f["x"].id.get_chunk_info(7)
    with open(path, "rb") as f:
        f.seek(info.byte_offset)
        return info.byte_offset, f.read(info.size)


def overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.timeout(60)
def test_an_epoch_after_a_failed_one_does_not_reraise_its_error(tmp_path, monkeypatch):
    """Bug guarded: when a Loader's ring is reused for the next epoch, the error box of the
    epoch before is not cleared, so an epoch after a failed one re-raises the stale error (as
    soon as the consumer looks at the box) although nothing failed in it. Here chunk 7 is
    garbage for one epoch, which fails; then it is healed, and the next epochs must read every
    row."""
    # The consumer looks at the error box whenever it checks on its workers: every batch here.
    monkeypatch.setattr(timeouts, "CHECK_INTERVAL", 0.0)
    path = str(tmp_path / "healed.h5")
    offset, good = write(path)
    with multitables.Loader(path, "x", BATCH, n_procs=1) as loader:
        overwrite(path, offset, bytes(b ^ 0x5A for b in good))  # a gzip stream no more
        error = None
        try:
            for _ in loader:
                pass
        except Exception as exc:  # the damaged chunk's error, from the worker
            error = exc
        assert_worker_error(error)
        overwrite(path, offset, good)
        for epoch in range(2):
            rows = np.concatenate([batch.copy() for batch in loader])
            np.testing.assert_array_equal(
                rows, np.arange(N_ROWS, dtype="<f8"),
                err_msg=f"epoch {epoch} after the healed one")
