"""Large results of ``Request.get()`` handed over with their stage's memory: never read into again
while any view of them lives, reused after, private to each process across fork."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
from helpers import end_children, sample, write_h5py

import multitables
from multitables._reader import lending
from multitables._reader import memory as memory_module

pytestmark = pytest.mark.timeout(60)

ROWS, BATCH = 1000, 64  # a batch of 4 KiB rows: 256 KiB, handed over rather than copied


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    path = tmp_path_factory.mktemp("lending") / "wide.h5"
    truth = write_h5py(path, "x", sample((ROWS, 1024), "<f4"), chunks=(16, 1024))
    return str(path), truth


@pytest.fixture
def reader(wide):
    with multitables.Reader(wide[0], n_procs=2) as r:
        yield r


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.choice(ROWS, BATCH, replace=False) for _ in range(n)]


def test_a_result_keeps_its_values_while_its_stage_serves_other_requests(reader, wide):
    ds = reader.get_dataset("x")
    stage = ds.create_stage(BATCH)
    first, *others = batches(6)
    loans = lending.on_loan()
    result = reader.request(ds[first], stage).get()
    assert lending.on_loan() == loans + 1  # handed over, not copied
    assert result.flags.writeable and result.shape == (BATCH, 1024)
    for idx in others:
        np.testing.assert_array_equal(reader.request(ds[idx], stage).get(), wide[1][idx])
    np.testing.assert_array_equal(result, wide[1][first])
    view = result[3:5]
    del result
    for idx in others:
        reader.request(ds[idx], stage).get()
    np.testing.assert_array_equal(view, wide[1][first][3:5])  # a view holds the memory too


def test_memory_comes_back_when_the_result_goes(reader, wide):
    ds = reader.get_dataset("x")
    pool = ds.create_stage_pool(BATCH, 2)
    memories = set()
    for idx in batches(40):
        request = reader.request(ds[idx], pool)
        memories.add(request.stage.memory.id)
        result = request.get()
        np.testing.assert_array_equal(result, wide[1][idx])
        del result
    # Two stages, and each result went before the next request: the memory of each came back.
    assert len(memories) <= 4


def test_results_kept_are_never_read_into(reader, wide):
    ds = reader.get_dataset("x")
    pool = ds.create_stage_pool(BATCH, 2)
    keys = batches(30, seed=1)
    kept = [reader.request(ds[idx], pool).get() for idx in keys]
    for idx, result in zip(keys, kept, strict=True):
        np.testing.assert_array_equal(result, wide[1][idx])
    del kept
    # Taken in hand at the next request.
    assert sum(len(m) for m in reader._memory.spares.values()) == 0
    reader.request(ds[keys[0]], pool).get()
    assert sum(len(m) for m in reader._memory.spares.values()) <= memory_module.MAX_SPARES


def test_small_results_are_copied(reader, wide):
    ds = reader.get_dataset("x")
    stage = ds.create_stage(BATCH)
    memory = stage.memory
    loans = lending.on_loan()
    result = reader.request(ds[[5, 2]], stage).get()  # 8 KiB
    assert stage.memory is memory and lending.on_loan() == loans
    np.testing.assert_array_equal(result, wide[1][[5, 2]])


def test_results_outlive_their_reader(wide):
    with multitables.Reader(wide[0], n_procs=1) as r:
        ds = r.get_dataset("x")
        result = r.request(ds[10:10 + BATCH], ds.create_stage(BATCH)).get()
    np.testing.assert_array_equal(result, wide[1][10:10 + BATCH])
    result += 1  # still its own memory; freed when it goes (the leak check follows the test)
    del result


def _in_child(mode, result, go, answers):
    if mode == "write":
        result[...] = -1
        answers.put((mode, True))
    elif mode == "keep":
        answers.put((mode, go.wait(30) and result.copy()))
    else:  # "nested": a grandchild sees what its parent wrote before it forked
        result[1, 0] = -777
        grandchild = multiprocessing.get_context("fork").Process(
            target=_in_grandchild, args=(result, answers))
        grandchild.start()
        grandchild.join(30)


def _in_grandchild(result, answers):
    answers.put(("nested", float(result[1, 0])))


def test_a_forked_child_and_its_parent_keep_their_own_results(reader, wide):
    ds = reader.get_dataset("x")
    stage = ds.create_stage(BATCH)
    first, *others = batches(11, seed=2)
    result = reader.request(ds[first], stage).get()
    ctx = multiprocessing.get_context("fork")
    go, answers = ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=_in_child, args=(mode, result, go, answers))
                for mode in ("write", "keep", "nested")]
    for child in children:
        child.start()
    try:
        got = dict(answers.get(timeout=30) for _ in range(2))
        assert got == {"write": True, "nested": -777.0}
        np.testing.assert_array_equal(result, wide[1][first])  # the children's writes are theirs
        result += 1  # and the parent's are its own
        np.testing.assert_array_equal(result, wide[1][first] + 1)
        del result
        for idx in others:  # the memory went to a child: the parent must not read into it again
            np.testing.assert_array_equal(reader.request(ds[idx], stage).get(), wide[1][idx])
        go.set()
        mode, kept = answers.get(timeout=30)
        assert mode == "keep"
        np.testing.assert_array_equal(kept, wide[1][first])
    finally:
        end_children(children, answers)


def test_results_beyond_the_loan_limit_are_copies(reader, wide, monkeypatch):
    monkeypatch.setattr(lending, "MAX_LOANS", 3)
    monkeypatch.setattr(memory_module, "MAX_SPARES", 1)
    ds = reader.get_dataset("x")
    pool = ds.create_stage_pool(BATCH, 2)
    keys = batches(6, seed=4)
    loans = lending.on_loan()
    kept = [reader.request(ds[idx], pool).get() for idx in keys]
    assert lending.on_loan() == 3
    for idx, result in zip(keys, kept, strict=True):
        np.testing.assert_array_equal(result, wide[1][idx])
    del kept
    assert lending.on_loan() == loans == 0
    # An idle Reader keeps no more of it than it would keep spare.
    assert len(reader._memory.returned) == 1


def test_a_stage_closed_while_its_request_is_pending_lends_nothing(reader, wide):
    ds = reader.get_dataset("x")
    stage = ds.create_stage(BATCH)
    first, *others = batches(5, seed=5)
    request = reader.request(ds[first], stage)
    stage.close()
    loans = lending.on_loan()
    result = request.get()
    assert lending.on_loan() == loans  # a copy: the closed stage's memory is gone from workers
    np.testing.assert_array_equal(result, wide[1][first])
    pool = ds.create_stage_pool(BATCH, 2)
    for idx in others:
        np.testing.assert_array_equal(reader.request(ds[idx], pool).get(), wide[1][idx])


def test_a_result_filling_little_of_its_stage_is_copied(reader, wide):
    ds = reader.get_dataset("x")
    stage = ds.create_stage(ROWS)  # 4 MB: a kept 256 KiB result must not hold all of it
    memory = stage.memory
    loans = lending.on_loan()
    idx = batches(1, seed=3)[0]
    result = reader.request(ds[idx], stage).get()
    assert stage.memory is memory and lending.on_loan() == loans
    np.testing.assert_array_equal(result, wide[1][idx])
    whole = reader.request(ds[:], stage).get()
    assert stage.memory is not memory and lending.on_loan() == loans + 1
    np.testing.assert_array_equal(whole, wide[1])


def test_a_large_record_comes_back_as_numpy_gives_it(tmp_path):
    records = np.zeros(4, [("a", "<f8", (9000,)), ("b", "<i4")])  # 72 KB a record
    records["a"] = sample((4, 9000), "<f8")
    records["b"] = [7, 8, 9, 10]
    path = tmp_path / "records.h5"
    write_h5py(path, "r", records)
    with multitables.Reader(path, n_procs=1) as r:
        ds = r.get_dataset("r")
        stage = ds.create_stage(1)
        record = r.request(ds[2], stage).get()
        assert type(record) is type(records[2])  # np.void, as numpy and a copy give
        r.request(ds[3], stage).get()
        assert record == records[2]


def test_a_result_lent_by_another_thread_during_the_fork_hook_is_marked_too(reader, monkeypatch):
    # Remapping a loan is a foreign call, during which another thread may lend a result: the
    # hook must not fork with that one shared (the child would see the parent's later reads).
    ds = reader.get_dataset("x")
    pool = ds.create_stage_pool(BATCH, 2)
    first, second = batches(2, seed=6)
    kept = [reader.request(ds[first], pool).get()]
    make_private = multitables._engine.shm.SharedArena.make_private

    def while_another_thread_lends(arena):
        if len(kept) == 1:
            kept.append(reader.request(ds[second], pool).get())
        return make_private(arena)

    monkeypatch.setattr(multitables._engine.shm.SharedArena, "make_private",
                        while_another_thread_lends)
    lending._before_fork()
    assert len(kept) == 2 and lending.on_loan() == 2
    assert all(loan.forked for loan in lending._loans)


def test_lent_and_viewed_arrays_are_numpy_views_of_the_bytes():
    """``lent_array`` and ``view_array`` build a result over a stage's bytes in one C call: the
    values, shape, dtype and writeability of numpy's own view, ``on_last`` called once when the
    last view of a lent one goes, and ``ValueError`` for bytes too few or not a byte array."""
    from multitables._engine._lent import Lent, lent_array, view_array

    raw = np.arange(96, dtype=np.uint8)
    calls = []
    lent = lent_array(raw, lambda: calls.append(1), np.dtype("<i4"), (3, 2))
    np.testing.assert_array_equal(lent, raw[:24].view("<i4").reshape(3, 2))
    assert isinstance(lent.base, Lent) and lent.flags.writeable and lent.flags.c_contiguous
    part = lent[1:]
    del lent
    assert calls == []
    part[0, 0] = 7
    assert raw[8:12].view("<i4")[0] == 7
    del part
    assert calls == [1]
    view = view_array(raw, 16, np.dtype(">u2"), (2, 2, 2))
    np.testing.assert_array_equal(view, raw[16:32].view(">u2").reshape(2, 2, 2))
    assert view.base is raw and view.flags.writeable
    for bad in [lambda: view_array(raw, 90, np.dtype("<i4"), (2,)),
                lambda: view_array(raw, -1, np.dtype("u1"), (1,)),
                lambda: view_array(raw.view("<i4"), 0, np.dtype("<i4"), (1,)),
                lambda: lent_array(raw[::2].copy(), None, np.dtype("<f8"), (7,))]:
        with pytest.raises(ValueError, match="writable C-contiguous uint8"):
            bad()
