"""The order of a training epoch (multitables._loader.order), checked against explicit arrays.

The oracle is the whole order built eagerly with numpy, and, for ranks and resume, the batches
every rank of every segment really yields, counted position by position.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multitables._loader.order import (
    EpochOrder,
    plan_rank,
    shuffle_quality,
    total_batches,
    worker_batches,
)

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def orders(draw):
    """Epoch orders of up to 3,000 rows in 1 to 60 units (so at most 60 windows to build)."""
    n = draw(st.integers(1, 3000))
    unit = -(-n // draw(st.integers(1, min(n, 60))))
    return EpochOrder(n, unit, draw(st.integers(1, 12)), shuffle=draw(st.booleans()),
                      seed=draw(st.integers(0, 2**64 - 1)), epoch=draw(st.integers(0, 2**32 - 1)))


def full_order(order: EpochOrder) -> np.ndarray:
    """The whole order, window by window, from the public per-window pieces."""
    return np.concatenate([order.rows(*order.window_bounds(w)) for w in range(order.n_windows)])


def unit_rows_of(order: EpochOrder, units: np.ndarray) -> np.ndarray:
    """The sorted file rows of ``units``: the oracle for what a window must hold."""
    rows = (units[:, None] * order.unit_rows + np.arange(order.unit_rows)).ravel()
    return np.sort(rows[rows < order.n_rows])


# --- the epoch order -------------------------------------------------------------------------


@SETTINGS
@given(orders())
def test_order_is_a_permutation_with_windows_holding_their_units(order):
    rows = full_order(order)
    np.testing.assert_array_equal(np.sort(rows), np.arange(order.n_rows))
    if not order.shuffle:
        np.testing.assert_array_equal(rows, np.arange(order.n_rows))
    seen_units = []
    for w in range(order.n_windows):
        start, stop = order.window_bounds(w)
        units = order.window_units(w)
        assert list(units) == sorted(units)
        seen_units += units.tolist()
        np.testing.assert_array_equal(np.sort(rows[start:stop]), unit_rows_of(order, units))
        assert order.window_of(start) == w and order.window_of(stop - 1) == w
    assert sorted(seen_units) == list(range(order.n_units))
    assert order.window_bounds(0)[0] == 0
    assert order.window_bounds(order.n_windows - 1)[1] == len(rows)


@SETTINGS
@given(orders(), st.data())
def test_lazy_rows_equal_slices_of_the_full_order(order, data):
    rows = full_order(order)
    fresh = EpochOrder(order.n_rows, order.unit_rows, order.units_per_window,
                       shuffle=order.shuffle, seed=order.seed, epoch=order.epoch)
    for _ in range(5):  # a fresh order, its cache filled in random window order
        start = data.draw(st.integers(0, order.n_rows))
        stop = data.draw(st.integers(start, order.n_rows))
        np.testing.assert_array_equal(fresh.rows(start, stop), rows[start:stop])
    positions = np.array(data.draw(st.lists(st.integers(0, order.n_rows - 1), max_size=50)),
                         dtype=np.int64)
    np.testing.assert_array_equal(fresh.rows_at(positions), rows[positions])
    assert fresh.rows_at(positions).dtype == np.int64 and fresh.rows(0, 1).dtype == np.int64


@settings(SETTINGS, max_examples=40)
@given(n=st.integers(200, 600), unit=st.integers(5, 20), window=st.integers(1, 8),
       seed=st.integers(0, 2**64 - 2), epoch=st.integers(0, 100))
def test_seed_and_epoch_determine_the_order(n, unit, window, seed, epoch):
    def order(seed, epoch):
        return full_order(EpochOrder(n, unit, window, shuffle=True, seed=seed, epoch=epoch))

    reference = order(seed, epoch)
    np.testing.assert_array_equal(order(seed, epoch), reference)
    # 200 rows in windows of 1+ units: two orders agree with probability far below 1e-9.
    assert not np.array_equal(order(seed + 1, epoch), reference)
    assert not np.array_equal(order(seed, epoch + 1), reference)


def test_each_window_mixes_its_rows_its_own_way():
    # Windows of 50 rows: the pattern of a window's shuffle (where its i-th smallest row goes)
    # must come from the window's own seed, not repeat from window to window or epoch to epoch.
    patterns = set()
    for epoch in range(3):
        order = EpochOrder(1000, 10, 5, shuffle=True, seed=99, epoch=epoch)
        for w in range(order.n_windows):
            patterns.add(tuple(np.argsort(order.rows(*order.window_bounds(w)))))
    assert len(patterns) == 3 * 20


def test_named_small_orders():
    order = EpochOrder(10, 3, 2, shuffle=False)
    assert (order.n_units, order.n_windows) == (4, 2)
    assert [order.window_bounds(w) for w in range(2)] == [(0, 6), (6, 10)]
    assert order.window_units(1).tolist() == [2, 3]
    # one row, one unit, one window
    one = EpochOrder(1, 5, 3, shuffle=True, seed=3)
    assert one.rows(0, 1).tolist() == [0] and one.window_bounds(0) == (0, 1)
    # the short last unit's window is the short window, wherever the shuffle puts it
    short = EpochOrder(25, 10, 1, shuffle=True, seed=11)
    sizes = {tuple(short.window_units(w)): np.subtract(*short.window_bounds(w)[::-1])
             for w in range(3)}
    assert sizes == {(0,): 10, (1,): 10, (2,): 5}


def test_large_epochs_stay_small():
    # 10**8 rows: the order keeps its 10**5 unit numbers and the windows asked for (4,000 rows
    # each), never the 800 MB of a whole permutation; plans are a few intervals.
    tracemalloc.start()
    try:
        order = EpochOrder(10**8, 1000, 4, shuffle=True, seed=1, epoch=3)
        start = order.window_bounds(order.window_of(5 * 10**7))[0]
        rows = order.rows(start - 100, start + 100)  # across two windows
        order.rows_at(np.arange(0, 10**8, 10**6))  # 100 windows, cached two at a time
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 10**6, peak
    assert len(np.unique(rows)) == 200
    assert np.isin(rows[100:] // 1000, order.window_units(order.window_of(start))).all()
    plan = plan_rank(10**8, 256, 8, 3, drop_last=False, history=[[8, 1000], [5, 77], [3, 10]])
    assert len(plan.intervals()) <= 8
    assert sum(b - a for a, b in plan.intervals()) == plan.n_batches * 256 - 256 + len(
        plan.batch_positions(plan.n_batches - 1))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="n_rows must be an integer >= 1, got 0"):
        EpochOrder(0, 4, 1, shuffle=False)
    with pytest.raises(ValueError, match="window_units must be an integer >= 1, got 0"):
        EpochOrder(10, 4, 0, shuffle=False)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*64\), got -1"):
        EpochOrder(10, 4, 1, shuffle=True, seed=-1)
    with pytest.raises(ValueError, match=r"epoch must be an integer in \[0, 2\*\*32\), got 42949"):
        EpochOrder(10, 4, 1, shuffle=True, epoch=2**32)
    order = EpochOrder(10, 4, 1, shuffle=True)
    with pytest.raises(IndexError, match="window 3 is out of bounds for an epoch of 3 windows"):
        order.window_bounds(3)
    with pytest.raises(IndexError, match="positions 5:11 are out of bounds for an epoch of 10"):
        order.rows(5, 11)
    with pytest.raises(IndexError, match="position -1 is out of bounds for an epoch of 10"):
        order.rows_at([3, -1])
    with pytest.raises(IndexError, match="position 10 is out of bounds"):
        order.window_of(10)


def test_whole_dataset_window_is_a_uniform_shuffle():
    # Six rows in three units, one window: over 2,000 fixed seeds, every row lands at every
    # position about equally often, and every ordered pair of positions of two rows too.
    n, seeds = 6, 2000
    at = np.zeros((n, n), np.int64)  # at[row, position]
    pair = np.zeros((n, n), np.int64)  # positions of rows 0 and 5
    for seed in range(seeds):
        rows = EpochOrder(n, 2, 3, shuffle=True, seed=seed).rows(0, n)
        at[rows, np.arange(n)] += 1
        where = np.argsort(rows)
        pair[where[0], where[5]] += 1
    expected = seeds / n
    chi2 = ((at - expected) ** 2 / expected).sum(axis=1)
    assert (chi2 < 20.5).all(), chi2  # 5 degrees of freedom: p = 0.001
    off = pair[~np.eye(n, dtype=bool)]
    expected = seeds / (n * (n - 1))
    assert ((off - expected) ** 2 / expected).sum() < 59.7, pair  # 29 dof: p = 0.001
    # window_units larger than the units: the same whole-dataset shuffle
    big = EpochOrder(n, 2, 100, shuffle=True, seed=5)
    np.testing.assert_array_equal(big.rows(0, n), EpochOrder(n, 2, 3, shuffle=True,
                                                             seed=5).rows(0, n))


def test_default_shuffle_mixes_chunks():
    order = EpochOrder(4000, 40, 16, shuffle=True, seed=1234, epoch=2)
    plan = plan_rank(4000, 32, 1, 0, drop_last=False)
    batches = (order.rows_at(plan.batch_positions(k)) for k in range(plan.n_batches))
    distinct, neighbours = shuffle_quality(batches, chunk_rows=40)
    assert distinct >= 8 and neighbours < 0.10, (distinct, neighbours)
    # the unshuffled order, by contrast: one chunk (rarely two) per batch, all neighbours
    plain = EpochOrder(4000, 40, 16, shuffle=False)
    distinct, neighbours = shuffle_quality(
        (plain.rows_at(plan.batch_positions(k)) for k in range(plan.n_batches)), 40)
    assert distinct < 2 and neighbours == 1.0


def test_shuffle_quality_counts():
    batches = [np.array([0, 1, 2, 3]), np.array([8, 4]), np.array([9])]
    assert shuffle_quality(batches, chunk_rows=4) == (pytest.approx(4 / 3), 0.75)
    assert shuffle_quality(iter([np.array([5, 3, 1])]), chunk_rows=2) == (3.0, 0.0)


# --- ranks and resume ------------------------------------------------------------------------


def segment_batches(n_rows, batch_size, world_size, drop_last, history):
    """Per rank, the batches (position lists) of the plan for ``history``, all played."""
    plans = [plan_rank(n_rows, batch_size, world_size, r, drop_last=drop_last, history=history)
             for r in range(world_size)]
    assert len({p.n_batches for p in plans}) == 1  # lock-step: the same count on every rank
    out = []
    for plan in plans:
        batches = [plan.batch_positions(k).tolist() for k in range(plan.n_batches)]
        flat = [p for b in batches for p in b]
        assert flat == np.concatenate([np.arange(*iv) for iv in plan.intervals()]
                                      or [np.empty(0, int)]).tolist()
        if drop_last:
            assert all(len(b) == batch_size for b in batches)
        else:
            assert all(len(b) == batch_size for b in batches[:-1])
            assert all(0 < len(b) for b in batches)
        out.append(batches)
    return out


ranks = dict(n_rows=st.integers(0, 2000), batch_size=st.integers(1, 40),
             world_size=st.integers(1, 5), drop_last=st.booleans())


@SETTINGS
@given(**ranks)
def test_fresh_epoch_partition(n_rows, batch_size, world_size, drop_last):
    per_rank = segment_batches(n_rows, batch_size, world_size, drop_last, ())
    n_batches = len(per_rank[0])
    assert n_batches == total_batches(n_rows, batch_size, world_size, drop_last=drop_last)
    played = [p for batches in per_rank for b in batches for p in b]
    counts = np.bincount(played, minlength=n_rows) if played else np.zeros(n_rows, int)
    assert (counts <= 1 + (not drop_last) * (world_size - 1)).all()
    if drop_last:
        assert counts.max(initial=0) <= 1
        assert n_rows - len(played) < world_size * batch_size
        assert len(played) == n_batches * batch_size * world_size
    else:
        assert (counts >= 1).all() and len(played) - n_rows < world_size
        assert len(played) == -(-n_rows // world_size) * world_size
    # contiguous spans in rank order, padding (a repeat of the first positions) at the very end
    flat = [p for batches in per_rank for b in batches for p in b]
    m = min(len(flat), n_rows)
    assert flat[:m] == list(range(m))
    assert flat[m:] == [i % max(n_rows, 1) for i in range(len(flat) - m)]


@SETTINGS
@given(**ranks, data=st.data())
def test_same_world_resume_is_the_uninterrupted_run(n_rows, batch_size, world_size, drop_last,
                                                    data):
    # sometimes an elastic history first (other world sizes, some batches done in each)
    history: list[list[int]] = []
    for size in data.draw(st.lists(st.integers(1, 5), max_size=2)):
        if size == world_size or (history and history[-1][0] == size):
            continue
        plan = plan_rank(n_rows, batch_size, size, 0, drop_last=drop_last, history=history)
        history = plan.history_after(data.draw(st.integers(0, plan.n_batches)))
    whole = segment_batches(n_rows, batch_size, world_size, drop_last, history)
    n_batches = len(whole[0])
    for done in sorted({0, n_batches, data.draw(st.integers(0, n_batches))}):
        resumed_history = [*history, [world_size, done]]
        resumed = segment_batches(n_rows, batch_size, world_size, drop_last, resumed_history)
        assert resumed == [batches[done:] for batches in whole]
        plan = plan_rank(n_rows, batch_size, world_size, world_size - 1, drop_last=drop_last,
                         history=resumed_history)
        assert plan.history_after(plan.n_batches) == [*history, [world_size, n_batches]]


@SETTINGS
@given(**ranks, data=st.data())
def test_elastic_resume_chain(n_rows, batch_size, world_size, drop_last, data):
    worlds = [world_size]
    for size in data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)):
        if size != worlds[-1]:  # the same world again would continue, not start, a segment
            worlds.append(size)
    history: list[list[int]] = []
    delivered = np.zeros(n_rows, np.int64)
    for i, size in enumerate(worlds):
        per_rank = segment_batches(n_rows, batch_size, size, drop_last, history)
        last = i == len(worlds) - 1
        done = len(per_rank[0]) if last else data.draw(st.integers(0, len(per_rank[0])))
        played = [p for batches in per_rank for b in batches[:done] for p in b]
        here = np.bincount(played, minlength=n_rows) if played else np.zeros(n_rows, np.int64)
        assert not ((here > 0) & (delivered > 0)).any(), "a position delivered before came again"
        assert here.sum() - np.count_nonzero(here) < size  # padding, within this segment
        delivered += here
        plan = plan_rank(n_rows, batch_size, size, 0, drop_last=drop_last, history=history)
        history = plan.history_after(done)
    assert len(history) == len(worlds)
    if drop_last:  # only the last segment's tail is left out
        assert n_rows - np.count_nonzero(delivered) < worlds[-1] * batch_size
    else:
        assert (delivered >= 1).all()


def test_named_resume_cases():
    # 10 rows, batches of 2, three ranks: [0 1 | 2 3], [4 5 | 6 7], [8 9 | 0 1]
    plans = [plan_rank(10, 2, 3, r, drop_last=False) for r in range(3)]
    assert [p.batch_positions(1).tolist() for p in plans] == [[2, 3], [6, 7], [0, 1]]
    # one batch each, then two ranks: 2 3 6 7 remain, rank 0 gets 2 3, rank 1 gets 6 7
    elastic = [plan_rank(10, 2, 2, r, drop_last=False, history=[[3, 1]]) for r in range(2)]
    assert [p.intervals() for p in elastic] == [[(2, 4)], [(6, 8)]]
    assert elastic[1].history_after(1) == [[3, 1], [2, 1]]
    # ... then one rank, before the two played a batch: it plays the same 2 3 6 7
    assert plan_rank(10, 2, 1, 0, drop_last=False, history=[[3, 1], [2, 0]]).intervals() == [
        (2, 4), (6, 8)]
    # drop_last: one batch of 4 on each of 3 ranks needs 12 rows of the 10: no batch at all
    nothing = plan_rank(10, 4, 3, 2, drop_last=True)
    assert nothing.n_batches == 0 and nothing.intervals() == []
    # more ranks than rows: padding repeats the one row
    tiny = [plan_rank(1, 4, 3, r, drop_last=False).batch_positions(0).tolist() for r in range(3)]
    assert tiny == [[0], [0], [0]]


def test_bad_history_is_named():
    with pytest.raises(ValueError, match="history entry 0 has 3 batches done, but 3 ranks play 2"):
        plan_rank(10, 2, 3, 0, drop_last=False, history=[[3, 3]])
    with pytest.raises(ValueError, match=r"history entry 1 must be \[world_size, batches_done\]"):
        plan_rank(10, 2, 3, 0, drop_last=False, history=[[3, 1], [2]])
    with pytest.raises(ValueError, match="rank 3 is out of range for world_size 3"):
        plan_rank(10, 2, 3, 3, drop_last=False)
    with pytest.raises(IndexError, match="batch 2 is out of bounds for rank 0's 2 remaining"):
        plan_rank(10, 2, 3, 0, drop_last=False).batch_positions(2)


# --- DataLoader workers ----------------------------------------------------------------------


@given(n_batches=st.integers(0, 500), n_workers=st.integers(1, 16))
def test_worker_batches_partition(n_batches, n_workers):
    shares = [worker_batches(n_batches, n_workers, w) for w in range(n_workers)]
    assert [b for share in shares for b in share] == list(range(n_batches))
    assert all(share.step == 1 for share in shares)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match=f"worker {n_workers} is out of range"):
        worker_batches(n_batches, n_workers, n_workers)
