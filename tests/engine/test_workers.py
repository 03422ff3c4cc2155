"""The one worker pool and its protocol: channels, idle workers, waits with deadlines, closes from
another thread. See NOTE [ Worker shutdown logic ] in multitables/_engine/pool.py."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import psutil
import pytest
from helpers import N_ROWS, _mp_helpers, alive_after, drain_rows, sample, write_h5py

import multitables
from multitables._engine.channel import TIMEOUT, Channel
from multitables._engine.shm import SharedArena
from multitables._reader.dispatch import START_AFTER, WAKE_AFTER

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("workers") / "w.h5"
    write_h5py(p, "x", np.arange(20_000 * 8, dtype="<f4").reshape(20_000, 8), chunks=(100, 8))
    write_h5py(p, "small", sample((N_ROWS,), "<f8"))
    return str(p)


def _children_with_zombies() -> set[int]:
    """This process's children, zombies included, but multiprocessing's long-lived helpers
    (a resource tracker an earlier spawn test started)."""
    helpers, _ = _mp_helpers()
    return {p.pid for p in psutil.Process().children()} - helpers


# ---- the channel ----------------------------------------------------------------------------


def test_a_channel_carries_objects_and_arenas_of_any_size():
    a, b = Channel.pair()
    arena = SharedArena(4096)
    try:
        arena.buffer[:5] = b"hello"
        big = np.arange(200_000)  # 1.6 MB: many packets
        sender = threading.Thread(target=a.send, args=(("msg", big, arena, [arena]),))
        sender.start()
        tag, got, first, again = b.receive(10)
        sender.join(10)
        assert tag == "msg"
        np.testing.assert_array_equal(got, big)
        assert first is again[0], "one arena sent twice must arrive as one object"
        assert bytes(first.buffer[:5]) == b"hello"
        first.buffer[5:7] = b"!!"  # the same pages, not a copy
        assert bytes(arena.buffer[:7]) == b"hello!!"
        first.close()
        assert b.receive(0.05) is TIMEOUT
        a.close()
        with pytest.raises(EOFError):
            b.receive(1)
    finally:
        arena.close()
        a.close()
        b.close()


def test_a_send_to_a_peer_that_takes_nothing_calls_check_and_gives_up():
    a, b = Channel.pair()
    calls = []

    def check():
        calls.append(time.monotonic())
        if len(calls) == 3:
            raise TimeoutError("given up")

    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="given up"):
            for _ in range(1000):  # fills the socket's buffer, then waits in slices
                a.send(b"x" * 30_000, check)
        assert len(calls) == 3
        assert time.monotonic() - t0 < 2
    finally:
        a.close()
        b.close()


# ---- the pool ---------------------------------------------------------------------------------


def test_a_worker_killed_while_standing_by_is_reaped_not_left_as_one_process_too_many(path):
    with multitables.Streamer(path) as stream:
        with stream.get_queue("x", n_procs=2) as queue:
            pids = [p.pid for p in queue._pool.procs]
            drain_rows(queue)
        os.kill(pids[0], signal.SIGKILL)
        assert alive_after([pids[0]], 5) == []
        for n_procs in (1, 2):  # a later job that needs fewer workers, then as many
            with stream.get_queue("x", n_procs=n_procs, ordered=True, remainder=True) as queue:
                now = [p.pid for p in queue._pool.procs]
                assert len(now) == n_procs and pids[0] not in now
                got = np.concatenate(drain_rows(queue))
                children = _children_with_zombies()
                assert pids[0] not in children, "the dead worker lingers as a zombie"
                assert len(children) <= 2, f"{children}: more processes than n_procs=2"
            np.testing.assert_array_equal(got, np.arange(20_000 * 8, dtype="<f4").reshape(-1, 8))


def _sockets(pid: int) -> int:
    """Sockets ``pid`` holds open; a descriptor closed while they are counted is none."""
    fds, count = f"/proc/{pid}/fd", 0
    for fd in os.listdir(fds):
        try:
            count += os.readlink(f"{fds}/{fd}").startswith("socket:")
        except FileNotFoundError:
            pass  # closed since the listing (the worker opens and closes its file)
    return count


def test_a_worker_holds_only_its_own_end_of_its_channel(path):
    """A worker forked after others must not keep their parent's ends open (nor its own parent
    end): each worker's channel then ends in EOF as soon as the parent is gone."""
    with multitables.Streamer(path) as stream, multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        reader.request(ds[3], ds.create_stage(1)).get()
        with stream.get_queue("x", n_procs=2) as queue:
            pids = [p.pid for p in reader._pool.procs + queue._pool.procs]
            deadline = time.monotonic() + 5  # a worker just forked may not have run its hook
            while (held := {pid: _sockets(pid) for pid in pids}) != dict.fromkeys(pids, 1):
                assert time.monotonic() < deadline, f"sockets held by each worker: {held}"
                time.sleep(0.05)
            drain_rows(queue)


def test_a_request_goes_to_a_worker_that_is_not_busy(path):
    """One worker is stuck in a read (stopped): the next request goes to the other one, started
    for it (a request pending for longer than a worker takes to start)."""
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        stages = [ds.create_stage(1) for _ in range(2)]
        reader.request(ds[0], stages[0]).get()  # the first worker starts
        time.sleep(0.2)  # worker 0 counts its task done after the result is out
        stuck = reader._pool.procs[0].pid
        os.kill(stuck, signal.SIGSTOP)
        try:
            for _ in range(3):  # until one goes to the stopped worker
                pending = reader.request(ds[1], stages[0])
                time.sleep(0.2)
                if not pending.done():
                    break
                pending.get()
            assert not pending.done()
            # Pending for longer than the second worker's start is worth (dispatch.START_AFTER
            # times the first's start-up), however slow the host.
            d = reader._dispatcher
            time.sleep(2 * START_AFTER * max(d._start_cost(), WAKE_AFTER))
            served = reader.request(ds[2], stages[1])
            deadline = time.monotonic() + 5
            while not served.done():
                assert time.monotonic() < deadline, "the request went to the busy worker"
                time.sleep(0.01)
            np.testing.assert_array_equal(served.get(), np.arange(16, 24))
        finally:
            os.kill(stuck, signal.SIGCONT)
        np.testing.assert_array_equal(pending.get(), np.arange(8, 16))


def test_reader_workers_stand_by_at_the_callers_priority(path, monkeypatch):
    """Both workers, the second started later than the first (by a read split over them)."""
    monkeypatch.setattr(multitables._reader.proxies, "SPLIT_BYTES", 64)
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        reader.request(ds[3], ds.create_stage(1)).get()
        reader.request(ds[:64], ds.create_stage(64)).get()
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, p.pid) for p in reader._pool.procs] == [mine] * 2


def _idle_wakeups(pid: int, seconds: float) -> int:
    p = psutil.Process(pid)
    before = p.num_ctx_switches().voluntary
    time.sleep(seconds)
    return p.num_ctx_switches().voluntary - before


def test_idle_workers_block_instead_of_polling(path):
    """An idle worker wakes once per IDLE_CHECK at most, not ten times a second."""
    with multitables.Reader(path, n_procs=1) as reader, multitables.Streamer(path) as stream:
        ds = reader.get_dataset("x")
        reader.request(ds[3], ds.create_stage(1)).get()
        with stream.get_queue("x", n_procs=1) as queue:
            drain_rows(queue)
            stream_worker = queue._pool.procs[0].pid
        serving = reader._pool.procs[0].pid  # between requests
        assert _idle_wakeups(serving, 1.5) <= 3
        assert _idle_wakeups(stream_worker, 1.5) <= 3  # standing by between queues


# ---- waits with a deadline and a peer check ------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("wait", [False, True])
def test_reader_close_with_hung_workers_takes_one_timeout_not_one_per_worker(path, wait):
    reader = multitables.Reader(path, n_procs=3)
    ds = reader.get_dataset("x")
    reader.request(ds[0:5], ds.create_stage(5)).get()
    pids = [p.pid for p in reader._pool.procs]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    reader.close(wait=wait)
    took = time.monotonic() - t0
    assert alive_after(pids, 1) == []
    assert took < (2.0 if wait else 0.2) + 1, f"close(wait={wait}) took {took:.1f} s"


@pytest.mark.timeout(30)
def test_a_send_blocked_on_a_stopped_worker_ends_when_another_thread_closes(path):
    """A request larger than the channel's buffer, to workers that take nothing: the dispatch
    waits in slices, and gives up once the Reader is closed from another thread."""
    reader = multitables.Reader(path, n_procs=1)
    ds = reader.get_dataset("x")
    reader.request(ds[0:5], ds.create_stage(5)).get()
    pid = reader._pool.procs[0].pid
    os.kill(pid, signal.SIGSTOP)
    coords = np.random.default_rng(0).integers(0, 20_000, 300_000)  # a 2.4 MB message
    stage = ds.create_stage(len(coords))
    outcome = []

    def dispatch():
        try:
            reader.request(ds[coords], stage)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what came
            outcome.append(exc)

    thread = threading.Thread(target=dispatch, daemon=True)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive(), f"the send did not block: {outcome}"
    t0 = time.monotonic()
    reader.close()
    thread.join(5)
    assert not thread.is_alive(), "the dispatch still waits on a closed Reader"
    assert time.monotonic() - t0 < 2
    assert isinstance(outcome[0], multitables.QueueClosedException), outcome
    assert alive_after([pid], 2) == []


@pytest.mark.timeout(30)
def test_a_wait_for_a_free_stage_raises_when_a_worker_dies(path):
    """All stages of the pool are held by a thread that never collects them; a worker dies:
    the request waiting for a stage raises instead of waiting for ever."""
    reader = multitables.Reader(path, n_procs=2)
    try:
        ds = reader.get_dataset("x")
        pool = ds.create_stage_pool(1, 1)
        held = reader.request(ds[1], pool)
        other = threading.Event()  # another thread lives, so the wait is not hopeless at once
        bystander = threading.Thread(target=other.wait, args=(20,), daemon=True)
        bystander.start()
        pid = reader._pool.procs[0].pid
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(multitables.SubprocessException, match=f"pid {pid}"):
            reader.request(ds[2], pool)
        assert time.monotonic() - t0 < 3
        other.set()
        del held
    finally:
        reader.close()


def test_a_wait_for_a_free_stage_ends_when_another_thread_frees_it(path):
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        pool = ds.create_stage_pool(1, 1)
        held = reader.request(ds[1], pool)
        threading.Timer(0.2, held.get).start()
        t0 = time.monotonic()
        np.testing.assert_array_equal(reader.request(ds[2], pool).get(), np.arange(16, 24))
        assert time.monotonic() - t0 < 0.4  # woken by free(), not by a poll


# ---- Queue.close() from another thread --------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("round_", range(5))
def test_queue_closed_by_another_thread_while_consumers_wait(path, round_):
    data = np.arange(20_000 * 8, dtype="<f4").reshape(-1, 8)
    stream = multitables.Streamer(path)
    queue = stream.get_queue("x", n_procs=2, cyclic=True, block_size=50, read_ahead=3)
    unexpected: list[BaseException] = []
    ends: list[str] = []

    def consume():
        try:
            while True:
                guard = queue.get()
                if guard is multitables.QueueClosed:
                    ends.append("QueueClosed")
                    return
                with guard as block:
                    first = int(block[0, 0]) // 8
                    np.testing.assert_array_equal(block[:2], data[first : first + 2])
        except multitables.QueueClosedException:
            ends.append("QueueClosedException")
        except BaseException as exc:  # noqa: BLE001 - anything else is the bug
            unexpected.append(exc)

    threads = [threading.Thread(target=consume, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.05 + 0.05 * round_)
    queue.close()
    for thread in threads:
        thread.join(10)
    assert not any(t.is_alive() for t in threads), "a consumer still waits on a closed queue"
    assert unexpected == [], unexpected
    assert len(ends) == 4
    assert queue.get() is multitables.QueueClosed
    stream.close()
