"""Streamer against h5py's own reading of the same files: every mode, block size and layout."""

from __future__ import annotations

import os
import threading
import time

import h5py
import numpy as np
import psutil
import pytest
from helpers import (
    N_ROWS,
    block_counter,
    cyclic_block,
    expected_blocks,
    sample,
    write_h5py,
    write_pytables,
)

import multitables

pytestmark = pytest.mark.timeout(60)

BLOCK_SIZES = [1, 8, 13, N_ROWS + 5]  # one row, a divisor-ish, a non-divisor, more than the data


def _hdf5plugin_layouts():
    try:
        import hdf5plugin
    except ImportError:  # an optional extra; the other layouts still run
        return []
    return [("blosc_zstd", dict(chunks=(16, 5), **hdf5plugin.Blosc(cname="zstd", clevel=3)))]


LAYOUTS = {
    "contiguous_f4_2d": ((N_ROWS, 5), "<f4", {}),
    "chunked_gzip_i2_1d": ((N_ROWS,), "<i2", dict(chunks=(10,), compression="gzip")),
    "shuffle_gzip_u1_3d": (
        (N_ROWS, 4, 3),
        "u1",
        dict(chunks=(7, 4, 3), compression="gzip", shuffle=True),
    ),
    "lzf_f8_4d": ((N_ROWS, 2, 3, 2), "<f8", dict(chunks=(5, 2, 3, 2), compression="lzf")),
    "bigendian_i4": ((N_ROWS, 3), ">i4", dict(chunks=(9, 3))),
    "partial_chunks_c8": ((N_ROWS, 6), "<c8", dict(chunks=(11, 4))),
}
for _name, _kwargs in _hdf5plugin_layouts():
    LAYOUTS[_name] = ((N_ROWS, 5), "<f4", _kwargs)


@pytest.fixture(scope="module")
def h5file(tmp_path_factory):
    path = tmp_path_factory.mktemp("streamer") / "data.h5"
    truth = {}
    for i, (name, (shape, dtype, kwargs)) in enumerate(LAYOUTS.items()):
        truth[name] = write_h5py(path, name, sample(shape, dtype, seed=i), **kwargs)
    return str(path), truth


@pytest.fixture(scope="module")
def tables_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pytables") / "tables.h5"
    return str(path), write_pytables(path)


@pytest.fixture(params=["batched", "one_block_per_slot"])
def slot_batching(request, monkeypatch):
    """Run a test with small blocks batched into slots (the default) and with one per slot."""
    if request.param == "one_block_per_slot":
        monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)
    return request.param


def drain(queue) -> list[np.ndarray]:
    blocks = []
    for guard in queue.iter():
        with guard as block:
            blocks.append(block.copy())
    assert queue.get() is multitables.QueueClosed  # and again on every later call
    assert queue.get() is multitables.QueueClosed
    return blocks


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("n_procs", [1, 2, 3])
def test_queue_delivers_every_full_block_once(h5file, layout, block_size, n_procs,
                                              slot_batching):
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        queue = stream.get_queue(layout, n_procs=n_procs, block_size=block_size)
        assert queue.block_size == block_size
        blocks = drain(queue)
        queue.close()
        tail = stream.get_remainder(layout, block_size)
    expected = expected_blocks(truth[layout], block_size, remainder=False)
    assert block_counter(blocks) == block_counter(expected)
    np.testing.assert_array_equal(tail, truth[layout][len(expected) * block_size :])
    assert tail.dtype == truth[layout].dtype


@pytest.mark.parametrize("layout", ["contiguous_f4_2d", "lzf_f8_4d", "bigendian_i4"])
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("n_procs", [1, 3])
def test_ordered_queue_with_remainder_is_the_dataset(h5file, layout, block_size, n_procs):
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        with stream.get_queue(
            layout, n_procs=n_procs, block_size=block_size, ordered=True, remainder=True
        ) as queue:
            blocks = drain(queue)
    assert [len(b) for b in blocks[:-1]] == [block_size] * (len(blocks) - 1)
    assert {b.dtype for b in blocks} == {truth[layout].dtype}  # byte order as stored, like h5py
    np.testing.assert_array_equal(np.concatenate(blocks), truth[layout])


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("n_procs", [1, 2, 3])
@pytest.mark.parametrize("ordered", [True, False])
def test_generator_yields_every_row(h5file, block_size, n_procs, ordered, slot_batching):
    path, truth = h5file
    with h5py.File(path, "r") as f:
        rows = list(f["partial_chunks_c8"])
    stream = multitables.Streamer(path)
    gen = stream.get_generator(
        "partial_chunks_c8", n_procs=n_procs, block_size=block_size, ordered=ordered
    )
    got = list(gen)
    if ordered:
        np.testing.assert_array_equal(np.array(got), np.array(rows))
    else:
        assert block_counter(got) == block_counter(rows)
    # Rows are copies: they stay valid after the stream is gone.
    np.testing.assert_array_equal(got[0] if ordered else sorted(got, key=bytes)[0],
                                  rows[0] if ordered else sorted(rows, key=bytes)[0])


@pytest.mark.parametrize("block_size", [1, 13, 40, 3 * N_ROWS + 2])
@pytest.mark.parametrize("n_procs", [1, 2, 3])
def test_cyclic_ordered_wraps_end_into_start(h5file, block_size, n_procs, slot_batching):
    path, truth = h5file
    data = truth["shuffle_gzip_u1_3d"]
    n_blocks = max(3 * N_ROWS // block_size, 4)  # about three laps
    with multitables.Streamer(path) as stream:
        with stream.get_queue(
            "shuffle_gzip_u1_3d", n_procs=n_procs, block_size=block_size, cyclic=True,
            ordered=True,
        ) as queue:
            for ticket in range(n_blocks):
                with queue.get() as block:
                    np.testing.assert_array_equal(block, cyclic_block(data, block_size, ticket))


@pytest.mark.parametrize("n_procs", [1, 3])
def test_cyclic_unordered_delivers_distinct_valid_blocks(h5file, n_procs, slot_batching):
    path, truth = h5file
    data, block_size, n = truth["contiguous_f4_2d"], 10, 40
    expected = {cyclic_block(data, block_size, t).tobytes(): t for t in range(n + 32)}
    seen = []
    with multitables.Streamer(path) as stream:
        with stream.get_queue(
            "contiguous_f4_2d", n_procs=n_procs, block_size=block_size, cyclic=True
        ) as queue:
            for _ in range(n):
                with queue.get() as block:
                    seen.append(expected[block.tobytes()])
    assert len(set(seen)) == n


def test_generator_stops_its_workers_when_closed(h5file):
    path, _ = h5file
    gen = multitables.Streamer(path).get_generator(
        "contiguous_f4_2d", n_procs=2, block_size=4, cyclic=True
    )
    for _ in range(50):
        next(gen)
    gen.close()  # the no_leaks fixture checks that the workers are gone


def test_abandoned_generator_stops_its_workers(h5file):
    path, truth = h5file
    for i, row in enumerate(
        multitables.Streamer(path).get_generator("contiguous_f4_2d", n_procs=2, block_size=4,
                                                 ordered=True)
    ):
        np.testing.assert_array_equal(row, truth["contiguous_f4_2d"][i])
        if i == 10:
            break


@pytest.mark.parametrize("ordered", [False, True])
def test_threads_share_one_queue_each_block_once(h5file, ordered, slot_batching):
    path, truth = h5file
    got: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(4)]

    def consume(out):
        while (guard := queue.get()) is not multitables.QueueClosed:
            with guard as block:
                out.append(block.copy())

    with multitables.Streamer(path) as stream:
        queue = stream.get_queue("contiguous_f4_2d", n_procs=2, block_size=1, ordered=ordered)
        threads = [threading.Thread(target=consume, args=(g,)) for g in got]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        queue.close()
    blocks = [b for g in got for b in g]
    assert block_counter(blocks) == block_counter(
        expected_blocks(truth["contiguous_f4_2d"], 1, remainder=False)
    )


@pytest.mark.parametrize(
    "dtype", ["?", "i1", "u2", "<i8", "u8", "<f2", ">f8", "<c16", ">u4"]
)
def test_any_numeric_dtype(tmp_path, dtype):
    path = tmp_path / "dtypes.h5"
    data = write_h5py(path, "x", sample((N_ROWS, 3), dtype), chunks=(10, 3))
    with multitables.Streamer(path) as stream:
        with stream.get_queue("x", n_procs=2, block_size=10, ordered=True, remainder=True) as q:
            blocks = drain(q)
    assert blocks[0].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(np.concatenate(blocks), data)


@pytest.mark.parametrize("name", ["table", "array", "carray", "earray"])
@pytest.mark.parametrize("block_size", [1, 13, None])
def test_pytables_nodes(tables_file, name, block_size):
    path, truth = tables_file
    with multitables.Streamer(path) as stream:
        with stream.get_queue(
            f"/{name}", n_procs=2, block_size=block_size, ordered=True, remainder=True
        ) as queue:
            got = np.concatenate(drain(queue))
    assert got.dtype == truth[name].dtype
    np.testing.assert_array_equal(got, truth[name])


@pytest.mark.parametrize("field", ["image", "vec", "score"])
@pytest.mark.parametrize("n_procs", [1, 2])
def test_table_field(tables_file, field, n_procs):
    path, truth = tables_file
    expected = truth["table"][field]
    with multitables.Streamer(path) as stream:
        with stream.get_queue(
            "/table", n_procs=n_procs, block_size=13, ordered=True, field=field
        ) as queue:
            blocks = drain(queue)
        tail = stream.get_remainder("/table", 13, field=field)
        rows = list(stream.get_generator("/table", n_procs=n_procs, field=field, ordered=True))
    got = np.concatenate(blocks + [tail])
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.array(rows), expected)


def test_default_block_size_is_whole_chunks_of_a_mebibyte(tmp_path):
    path = tmp_path / "big.h5"
    write_h5py(path, "c", np.zeros((5000, 256), "f4"), chunks=(100, 256))  # 100 KiB chunks
    write_h5py(path, "flat", np.zeros((5000, 256), "f4"))
    write_h5py(path, "short", np.zeros((10, 256), "f4"), chunks=(4, 256))
    with multitables.Streamer(path) as stream:
        assert stream.get_queue("c", n_procs=1).block_size == 1100  # 11 chunks >= 1 MiB
        assert stream.get_queue("flat", n_procs=1).block_size == 1024  # 1 MiB of 1 KiB rows
        assert stream.get_queue("short", n_procs=1).block_size == 10  # never beyond the data


def test_guard_view_is_zero_copy_and_released_on_exception(h5file, monkeypatch):
    monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        with stream.get_queue(
            "contiguous_f4_2d", n_procs=1, read_ahead=1, block_size=10, ordered=True
        ) as queue:
            for i in range(3):
                with pytest.raises(ZeroDivisionError):
                    with queue.get() as block:
                        assert not block.flags.owndata
                        np.testing.assert_array_equal(
                            block, truth["contiguous_f4_2d"][10 * i : 10 * i + 10]
                        )
                        1 / 0  # noqa: B018
            # With one slot, a fourth block arrives only if the failed ones were released.
            with queue.get() as block:
                np.testing.assert_array_equal(block, truth["contiguous_f4_2d"][30:40])


def test_holding_every_slot_raises_instead_of_hanging(h5file, monkeypatch):
    monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        with stream.get_queue("contiguous_f4_2d", n_procs=1, read_ahead=2, block_size=10) as q:
            held = [q.get(), q.get()]
            with pytest.raises(RuntimeError, match="all 2 slots"):
                q.get()
            held[0].release()
            with q.get() as block:
                assert block.shape == (10, 5)


def test_small_blocks_are_batched_into_slots(tmp_path):
    """Blocks of 4 KiB share 1 MiB slots: one read per slot, each block still its own view."""
    path = tmp_path / "rows.h5"
    data = write_h5py(path, "x", sample((2048, 1024), "<f4"), chunks=(64, 1024))
    with multitables.Streamer(path) as stream:
        with stream.get_queue("x", n_procs=2, read_ahead=2, block_size=1, ordered=True) as q:
            assert q._plan.blocks_per_slot == 256
            for i, guard in enumerate(q.iter()):
                with guard as block:
                    assert block.shape == (1, 1024)
                    np.testing.assert_array_equal(block, data[i : i + 1])
    assert i == 2047


@pytest.mark.parametrize("ordered", [True, False])
def test_generator_rows_kept_stay_valid_while_copies_are_reused(h5file, ordered):
    """Rows kept while the stream goes on never change (they are not views of slots)."""
    path, truth = h5file
    data = truth["partial_chunks_c8"]
    kept = []
    for i, row in enumerate(multitables.Streamer(path).get_generator(
            "partial_chunks_c8", n_procs=2, block_size=4, ordered=ordered)):
        if i % 7 == 0:
            kept.append(row)
    expected = data[::7] if ordered else None
    if ordered:
        np.testing.assert_array_equal(np.array(kept), expected)
    else:
        assert all(any(np.array_equal(k, r) for r in data) for k in kept)
        assert len(kept) == len(data[::7])


def test_generator_closed_before_its_first_row_stops_its_workers(h5file):
    path, _ = h5file
    gen = multitables.Streamer(path).get_generator("contiguous_f4_2d", n_procs=2, cyclic=True)
    workers = list(gen._queue._pool.procs)
    gen.close()
    assert not any(p.is_alive() for p in workers)
    with pytest.raises(StopIteration):
        next(gen)


def test_more_consumer_threads_than_slots_wait_instead_of_raising(h5file, monkeypatch):
    """Four threads each holding a guard for a while, two slots: they take turns."""
    import time as _time

    monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)
    path, truth = h5file
    got: list[np.ndarray] = []
    errors: list[BaseException] = []

    def consume():
        try:
            while (guard := queue.get()) is not multitables.QueueClosed:
                with guard as block:
                    _time.sleep(0.002)
                    got.append(block.copy())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with multitables.Streamer(path) as stream:
        queue = stream.get_queue("contiguous_f4_2d", n_procs=2, read_ahead=2, block_size=5)
        threads = [threading.Thread(target=consume) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        queue.close()
    assert not errors
    assert block_counter(got) == block_counter(
        expected_blocks(truth["contiguous_f4_2d"], 5, remainder=False))


@pytest.mark.timeout(30)
def test_generator_closed_mid_block_yields_no_more_rows(h5file):
    path, _ = h5file
    with multitables.Streamer(path) as stream:
        gen = stream.get_generator("contiguous_f4_2d", n_procs=1, block_size=4, ordered=True)
        rows = iter(gen)
        first = next(rows)
        gen.close()
        assert list(rows) == []
        with h5py.File(path) as f:
            np.testing.assert_array_equal(first, f["contiguous_f4_2d"][0])


# ---- workers kept between the queues of one Streamer ----------------------------------------


def _pids(queue) -> list[int]:
    return sorted(p.pid for p in queue._pool.procs)


@pytest.mark.timeout(60)
def test_later_queues_reuse_the_standing_workers_and_read_the_same_rows(h5file):
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        with stream.get_queue("contiguous_f4_2d", n_procs=2, block_size=8, ordered=True) as q:
            first, pids = drain(q), _pids(q)
        assert all(psutil.pid_exists(pid) for pid in pids)  # standing by, not ended
        for name, expected in truth.items():  # every layout, other datasets of the same file
            with stream.get_queue(name, n_procs=2, block_size=8, ordered=True) as q:
                assert _pids(q) == pids
                got = np.concatenate(drain(q))
            np.testing.assert_array_equal(got, expected[: len(got)])
        rows = list(stream.get_generator("contiguous_f4_2d", n_procs=1, ordered=True))
    np.testing.assert_array_equal(np.concatenate(first), truth["contiguous_f4_2d"][: len(
        np.concatenate(first))])
    np.testing.assert_array_equal(np.stack(rows), truth["contiguous_f4_2d"])
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids), "Streamer.close() left its workers running"


@pytest.mark.timeout(60)
def test_a_queue_needing_more_workers_than_stand_by_starts_the_rest(h5file):
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        with stream.get_queue("bigendian_i4", n_procs=1, block_size=13, ordered=True) as q:
            one = _pids(q)
            drain(q)
        with stream.get_queue("bigendian_i4", n_procs=3, block_size=13, ordered=True,
                              remainder=True) as q:
            three = _pids(q)
            got = np.concatenate(drain(q))
        # Two queues at once: the second cannot borrow the first's workers.
        with stream.get_queue("bigendian_i4", n_procs=2, cyclic=True) as a, \
                stream.get_queue("bigendian_i4", n_procs=2, cyclic=True) as b:
            assert not set(_pids(a)) & set(_pids(b))
            with a.get() as block_a, b.get() as block_b:
                np.testing.assert_array_equal(block_a, block_b)
    assert set(one) <= set(three) and len(three) == 3
    np.testing.assert_array_equal(got, truth["bigendian_i4"])


@pytest.mark.timeout(60)
def test_a_file_rewritten_between_queues_is_read_anew(tmp_path):
    path = str(tmp_path / "epochs.h5")
    write_h5py(path, "x", np.arange(40.0).reshape(20, 2))
    with multitables.Streamer(path) as stream:
        with stream.get_queue("x", n_procs=2, block_size=5, ordered=True) as q:
            pids = _pids(q)
            np.testing.assert_array_equal(np.concatenate(drain(q)), np.arange(40.0).reshape(20, 2))
        os.remove(path)
        new = -np.arange(60.0).reshape(30, 2)
        write_h5py(path, "x", new)
        with stream.get_queue("x", n_procs=2, block_size=5, ordered=True) as q:
            assert _pids(q) == pids
            np.testing.assert_array_equal(np.concatenate(drain(q)), new)


@pytest.mark.timeout(60)
def test_the_file_can_be_written_while_the_workers_stand_by(tmp_path):
    """Standby workers hold no HDF5 file open: its lock would refuse writers between passes."""
    path = str(tmp_path / "grows.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(40.0).reshape(20, 2), maxshape=(None, 2))
    with multitables.Streamer(path) as stream:
        with stream.get_queue("x", n_procs=2, block_size=5, ordered=True) as q:
            pids = _pids(q)
            drain(q)
        with h5py.File(path, "a") as f:  # between two epochs: more rows
            f["x"].resize((30, 2))
            f["x"][20:] = -1.0
        with stream.get_queue("x", n_procs=2, block_size=5, ordered=True) as q:
            assert _pids(q) == pids
            got = np.concatenate(drain(q))
    np.testing.assert_array_equal(got, np.concatenate([np.arange(40.0).reshape(20, 2),
                                                       np.full((10, 2), -1.0)]))


@pytest.mark.timeout(60)
def test_workers_of_a_dropped_streamer_end_with_its_last_queue(h5file):
    path, truth = h5file
    queue = multitables.Streamer(path).get_queue("contiguous_f4_2d", n_procs=2, block_size=8,
                                                 ordered=True)
    pids = _pids(queue)
    got = np.concatenate(drain(queue))  # the Streamer is gone; its queue still works
    np.testing.assert_array_equal(got, truth["contiguous_f4_2d"][: len(got)])
    queue.close()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)


@pytest.mark.timeout(30)
def test_stream_workers_run_below_the_consumers_priority(h5file):
    path, _ = h5file
    with multitables.Streamer(path) as stream, stream.get_queue("contiguous_f4_2d",
                                                                n_procs=2) as q:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, pid) for pid in _pids(q)] == [
            min(19, mine + multitables._engine.pool.STANDBY_NICENESS)] * 2


@pytest.mark.timeout(60)
def test_a_closed_streamer_starts_new_workers_for_its_next_queue(h5file):
    path, truth = h5file
    stream = multitables.Streamer(path)
    with stream.get_queue("bigendian_i4", n_procs=2, block_size=13, ordered=True) as q:
        before = _pids(q)
        drain(q)
    stream.close()
    with stream.get_queue("bigendian_i4", n_procs=2, block_size=13, ordered=True,
                          remainder=True) as q:
        assert not set(_pids(q)) & set(before)
        got = np.concatenate(drain(q))
    stream.close()
    np.testing.assert_array_equal(got, truth["bigendian_i4"])


class _NoTimeouts:
    """A consumer's view of its ring's full queue in which a pop that sleeps until its timeout
    (rather than being woken by a push) fails the test."""

    def __init__(self, full):
        self.full = full
        self.wants: list[int] = []

    def pop(self, timeout, want=1):
        self.wants.append(want)
        start = time.monotonic()
        slot = self.full.pop(timeout, want)
        assert time.monotonic() - start < timeout / 2, f"slept {timeout} s for {want} slots"
        return slot

    def __getattr__(self, name):
        return getattr(self.full, name)


@pytest.fixture
def sleepy_consumer(monkeypatch):
    """A slot per block, workers slower than the consumer (it sleeps for every slot), and a
    sleep for a slot that cannot come as long as 20 s, which _NoTimeouts turns into a failure."""
    monkeypatch.setattr(multitables._streamer.job, "SLOT_TARGET_BYTES", 1)
    monkeypatch.setattr(multitables._engine.timeouts, "WAIT_SLICE", 20.0)
    read = multitables._streamer.job.read_selection

    def slow_read(*args, **kwargs):
        time.sleep(0.01)
        return read(*args, **kwargs)

    monkeypatch.setattr(multitables._streamer.job, "read_selection", slow_read)  # workers fork it


@pytest.mark.parametrize("n_procs, read_ahead, held", [
    (1, 1, 0), (1, 2, 0), (1, 3, 1), (2, 2, 0), (2, 3, 0), (2, 5, 0), (2, 5, 2), (2, 4, 1),
    (3, 7, 3), (1, 4, 3),
])
def test_a_consumer_sleeps_only_for_slots_that_can_come(h5file, sleepy_consumer, n_procs,
                                                         read_ahead, held):
    """A consumer ahead of its workers sleeps until several slots are filled, never for more
    than the stream has left or its workers can fill around the slots that guards hold."""
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        with stream.get_queue("contiguous_f4_2d", n_procs=n_procs, read_ahead=read_ahead,
                              block_size=7) as q:
            q._ring.full = recorder = _NoTimeouts(q._ring.full)
            kept = [q.get() for _ in range(held)]
            blocks = drain(q)
            for guard in kept:
                with guard as block:
                    blocks.append(block.copy())
    expected = expected_blocks(truth["contiguous_f4_2d"], 7, remainder=False)
    assert block_counter(blocks) == block_counter(expected)
    batch = multitables.streamer.WAKE_BATCH
    assert max(recorder.wants) == min(batch, max(1, read_ahead - n_procs))


@pytest.mark.parametrize("n_procs, read_ahead", [(1, 3), (2, 5), (2, 3)])
def test_a_cyclic_consumer_sleeps_only_for_slots_that_can_come(h5file, sleepy_consumer,
                                                                n_procs, read_ahead):
    """The same for an endless stream, its blocks read by two threads."""
    path, truth = h5file
    with multitables.Streamer(path) as stream:
        with stream.get_queue("contiguous_f4_2d", n_procs=n_procs, read_ahead=read_ahead,
                              block_size=7, cyclic=True, ordered=False) as q:
            q._ring.full = recorder = _NoTimeouts(q._ring.full)
            blocks: list[np.ndarray] = []

            def take(n):
                for _ in range(n):
                    with q.get() as block:
                        blocks.append(block.copy())

            threads = [threading.Thread(target=take, args=(15,)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(50)
    assert len(blocks) == 30
    valid = {cyclic_block(truth["contiguous_f4_2d"], 7, t).tobytes() for t in range(97)}
    assert {b.tobytes() for b in blocks} <= valid
    assert max(recorder.wants) == min(multitables.streamer.WAKE_BATCH,
                                      max(1, read_ahead - n_procs))


@pytest.mark.parametrize("remainder", [True, False])
def test_a_block_size_beyond_the_dataset_reserves_only_the_rows_it_can_deliver(h5file,
                                                                               remainder):
    """10**7 rows of 20 bytes would be 200 MB a slot: a finite stream holds at most its rows."""
    path, truth = h5file
    data = truth["contiguous_f4_2d"]
    with multitables.Streamer(path) as stream:
        with stream.get_queue("contiguous_f4_2d", n_procs=2, block_size=10**7,
                              remainder=remainder) as queue:
            assert queue.block_size == 10**7
            slot_bytes = queue._ring.layout.slot_bytes
            assert slot_bytes == data.nbytes, f"a slot of {slot_bytes} bytes for {data.nbytes}"
            blocks = drain(queue)
        tail = stream.get_remainder("contiguous_f4_2d", 10**7)
    if remainder:
        assert len(blocks) == 1
        np.testing.assert_array_equal(blocks[0], data)
    else:
        assert blocks == []
        np.testing.assert_array_equal(tail, data)


def test_default_n_procs_is_the_cpus_this_process_may_use_at_most_four(h5file, monkeypatch):
    from multitables._hdf5.source import default_n_procs

    path, truth = h5file
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert default_n_procs() == 1
    with multitables.Streamer(path) as stream:
        with stream.get_queue("bigendian_i4", remainder=True, ordered=True) as queue:
            assert len(queue._pool.procs) == 1
            np.testing.assert_array_equal(np.concatenate(drain(queue)), truth["bigendian_i4"])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert default_n_procs() == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 9})
    assert default_n_procs() == 3
    with multitables.Reader(path) as reader:
        assert reader.n_procs == 3
