"""The seed and the epoch are separate inputs of the shuffle: no two (seed, epoch) pairs share an
order, whichever way they add up."""

from __future__ import annotations

import itertools

import h5py
import numpy as np

import multitables
from multitables._loader.order import EpochOrder

N_ROWS, UNIT_ROWS, WINDOW_UNITS = 1000, 10, 4  # 100 units in 25 windows: orders never agree by luck


def whole_order(seed: int, epoch: int) -> bytes:
    order = EpochOrder(N_ROWS, UNIT_ROWS, WINDOW_UNITS, shuffle=True, seed=seed, epoch=epoch)
    return order.rows(0, N_ROWS).tobytes()


def test_no_two_seed_and_epoch_pairs_share_an_order():
    """Bug guarded: the epoch's generator mixes seed and epoch by addition (or any other
    combination that folds them into one number before seeding), so (seed, epoch + 1) and
    (seed + 1, epoch) play the same order: two runs with neighbouring seeds see the same epochs,
    one epoch apart. Every pair of a small grid, anti-diagonals included, must differ."""
    pairs = list(itertools.product(range(4), range(4)))
    orders = {pair: whole_order(*pair) for pair in pairs}
    same = [(a, b) for a, b in itertools.combinations(pairs, 2) if orders[a] == orders[b]]
    assert not same, f"(seed, epoch) pairs that play the same order: {same}"
    # Large seeds too: the high word of a 64-bit seed is its own input, not added to the epoch.
    assert whole_order(2**32, 0) != whole_order(0, 1)
    assert whole_order(2**40 + 1, 5) != whole_order(2**40, 6)


def test_loaders_with_neighbouring_seeds_do_not_replay_each_others_epochs(tmp_path):
    """The same bug seen from the front door: ``Loader(seed=s).order(e + 1)`` must not be
    ``Loader(seed=s + 1).order(e)``."""
    path = str(tmp_path / "rows.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=np.arange(N_ROWS), chunks=(UNIT_ROWS,))
    loaders = [multitables.Loader(path, "idx", 16, shuffle=True, seed=seed, window=40,
                                  n_procs=1) for seed in (7, 8)]
    try:
        for epoch in range(3):
            later = loaders[0].order(epoch + 1).rows(0, N_ROWS)
            other_seed = loaders[1].order(epoch).rows(0, N_ROWS)
            assert not np.array_equal(later, other_seed), (
                f"seed 7 epoch {epoch + 1} plays the order of seed 8 epoch {epoch}")
    finally:
        for loader in loaders:
            loader.close()
