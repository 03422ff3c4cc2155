"""A virtual dataset of compressed sources read by units of its sources' chunks, by every front
door that picks a read size: its own empty filter pipeline made the Loader read it row by row
through HDF5, decoding a whole source chunk per row (about 50x slower on 20,000 rows)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import drain_rows, write_virtual

import multitables

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def virtual(tmp_path_factory):
    # Rows of 2 KiB: a default block (1 MiB) is fewer rows than the dataset holds.
    return write_virtual(tmp_path_factory.mktemp("virtual"), [400, 240, 370], width=512)


def test_the_loader_reads_a_virtual_dataset_by_units_of_its_sources_chunks(virtual):
    path, data = virtual
    with multitables.Loader(path, "/v", 64, shuffle=True, n_procs=2, seed=3) as loader:
        assert not loader._reads_batches()  # the per-row path was taken
        assert loader.unit_rows == 40  # the sources' chunks, not 256 KiB of "contiguous" rows
        batches = [batch.copy() for batch in loader]
    rows = (np.concatenate(batches)[:, 0] // 512).astype(np.int64)  # row r starts at 512 r
    assert sorted(rows.tolist()) == list(range(len(data)))
    np.testing.assert_array_equal(np.concatenate(batches), data[rows])


def test_the_streamer_and_dask_blocks_hold_whole_source_chunks(virtual):
    path, data = virtual
    with multitables.Streamer(path) as streamer:
        with streamer.get_queue("/v", n_procs=1, ordered=True, remainder=True) as queue:
            assert queue.block_size % 40 == 0
            np.testing.assert_array_equal(np.concatenate(drain_rows(queue)), data)
    pytest.importorskip("dask")
    from multitables.dask import from_hdf5
    x = from_hdf5(path, "/v", chunks=50)
    assert x.chunks[0][0] == 40  # rounded to the sources' chunks
