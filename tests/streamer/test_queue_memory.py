"""A queue reserves shared memory for what it can deliver: on a dataset smaller than a slot's
target size its slots hold the dataset's rows at most, cyclic or not, whatever ``block_size`` the
caller asks for; and a cyclic stream whose slots would lap the data still delivers it in order."""

from __future__ import annotations

import os

import numpy as np
import pytest
from helpers import N_ROWS, cyclic_block, sample, write_h5py

import multitables

pytestmark = pytest.mark.timeout(60)

ROW_BYTES = 3 * 8


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("queue_memory") / "small.h5"
    return str(path), write_h5py(path, "small", sample((N_ROWS, 3), "<f8"))


def _ring_bytes() -> dict[int, int]:
    """The queue arenas (memfds named multitables-ring) this process holds, by inode (an arena
    may be open on two descriptors: its own and its mapping's): inode -> bytes."""
    rings = {}
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}").startswith("/memfd:multitables-ring"):
                st = os.fstat(int(entry))
                rings[st.st_ino] = st.st_size
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return rings


@pytest.mark.parametrize("cyclic, block_size, remainder", [
    (True, 10, False), (True, 1, False), (False, 10, True), (False, 10**6, True),
    (False, 10, False),
])
def test_a_queue_on_a_small_dataset_reserves_no_more_than_the_dataset(small_file, cyclic,
                                                                      block_size, remainder):
    """``read_ahead`` slots of at most the dataset's rows each, plus the ring's bookkeeping
    (pages of queues, headers and an error box): far below one slot's target of a MiB."""
    path, _ = small_file
    read_ahead = 3
    before = _ring_bytes()
    with multitables.Streamer(path).get_queue("small", n_procs=1, read_ahead=read_ahead,
                                              cyclic=cyclic, block_size=block_size,
                                              remainder=remainder) as queue:
        new = {ino: n for ino, n in _ring_bytes().items() if ino not in before}
        assert len(new) == 1, new
        (nbytes,) = new.values()
        data_bytes = N_ROWS * ROW_BYTES
        assert nbytes <= read_ahead * (data_bytes + 4096) + 128 * 1024, (
            f"a queue over {data_bytes} bytes of data reserved {nbytes} bytes")
        guard = queue.get()
        assert guard is not multitables.QueueClosed
        guard.release()


def test_a_cyclic_stream_of_small_blocks_laps_the_data_in_order(small_file):
    path, truth = small_file
    with multitables.Streamer(path).get_queue("small", n_procs=2, read_ahead=2, cyclic=True,
                                              block_size=7, ordered=True) as queue:
        for ticket in range(3 * N_ROWS // 7 + 5):  # over three laps
            with queue.get() as block:
                np.testing.assert_array_equal(block, cyclic_block(truth, 7, ticket))
