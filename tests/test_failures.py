"""The failure model (DESIGN.md): dead workers, dead parents, Ctrl-C, cleanup, leaks, bad input,
start methods, shared memory that runs out and files that change under the readers.

Anything that could crash or hang the test process itself (a dying parent, Ctrl-C, a rlimit, a
segfault) runs in a child Python; the test watches it from outside with psutil.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import multiprocessing
import os
import re
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import h5py
import numpy as np
import psutil
import pytest
from helpers import N_ROWS, sample, write_h5py, write_pytables

import multitables

pytestmark = pytest.mark.timeout(60)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG_ROWS, BIG_COLS = 4000, 256  # 4 MB of float32 in gzip chunks of 64 rows


# ---- files and helpers ----------------------------------------------------------------------


def _write_big(path) -> np.ndarray:
    rng = np.random.default_rng(7)
    data = rng.integers(0, 8, (BIG_ROWS, BIG_COLS)).astype("<f4")
    return write_h5py(path, "x", data, chunks=(64, BIG_COLS), compression="gzip")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("failures")
    path = d / "data.h5"
    truth = {"x": _write_big(path)}
    truth["small"] = write_h5py(path, "small", sample((N_ROWS, 3), "<f8"))
    with h5py.File(path, "a") as f:
        f.create_dataset("empty", shape=(0, 3), dtype="f4")
        f.create_group("group")
        f.create_dataset("table", data=np.zeros(N_ROWS, [("a", "i4"), ("b", "f8")]))
    tables_path = d / "tables.h5"
    truth.update(write_pytables(tables_path))
    return str(path), str(tables_path), truth


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _drain_rows(queue) -> list[np.ndarray]:
    blocks = []
    for guard in queue.iter():
        with guard as block:
            blocks.append(block.copy())
    return blocks


def _alive_after(pids, timeout: float) -> list[int]:
    """The pids still running (zombies count as gone) once ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not _gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if not n.startswith("torch_")}


@contextlib.contextmanager
def _child(code: str, *args, **kwargs):
    """A child Python running ``code`` (argv[1:] = args), its stdout and stderr piped. On the
    way out it is killed if still running, with the worker pids the test put in ``proc.pids``
    (a stopped worker would hold the pipes open), and its pipes are closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, **kwargs,
    )
    proc.pids = []
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in proc.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def _read_pids(proc: subprocess.Popen, timeout: float = 30) -> list[int]:
    """The worker pids the child prints as its first line of stdout (a JSON list)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    ready = sel.select(timeout)
    sel.close()
    line = proc.stdout.readline() if ready else ""
    if not line:
        proc.kill()
        pytest.fail(f"child printed nothing (rc {proc.wait(10)}); stderr:\n{proc.stderr.read()}")
    proc.pids = json.loads(line)
    return proc.pids


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str, list[int]]:
    """Wait for the child to exit: its stdout, its stderr and its workers still running 2 s
    later (killed then). Fails (killing it and its workers) on timeout."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in proc.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)
        pytest.fail(f"child still running {timeout} s later; stderr:\n{proc.stderr.read()[-3000:]}")
    left = _alive_after(proc.pids, 2)
    for pid in left:  # stopped workers left behind would hold the pipes open
        os.kill(pid, signal.SIGKILL)
    return proc.stdout.read(), proc.stderr.read(), left


def _drain_until_error(get, deadline_s: float) -> tuple[BaseException | None, float]:
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < deadline_s:
            get()
    except Exception as exc:
        return exc, time.monotonic() - t0
    return None, time.monotonic() - t0


# ---- a worker dies --------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [0, 1])
def test_worker_killed_during_cyclic_stream(files, victim):
    path, _, _ = files
    queue = multitables.Streamer(path).get_queue("x", n_procs=2, cyclic=True, block_size=10)
    for _ in range(20):
        with queue.get():
            pass
    pids = [p.pid for p in queue._pool.procs]
    os.kill(pids[victim], signal.SIGKILL)

    def consume():
        with queue.get():
            pass

    exc, took = _drain_until_error(consume, 5)
    assert isinstance(exc, multitables.SubprocessException), exc
    assert took < 2, f"noticed after {took:.2f} s"
    msg = str(exc)
    assert f"worker {victim}" in msg and f"pid {pids[victim]}" in msg and "signal 9" in msg, msg
    assert _alive_after(pids, 1) == []
    assert queue.get() is multitables.QueueClosed  # closed by the failure
    queue.close()


def test_worker_killed_during_finite_stream(files, monkeypatch):
    monkeypatch.setattr(multitables.streamjob, "SLOT_TARGET_BYTES", 1)  # 400 slots of 10 rows
    path, _, truth = files
    queue = multitables.Streamer(path).get_queue("x", n_procs=2, block_size=10, ordered=True)
    for i in range(20):
        with queue.get() as block:
            np.testing.assert_array_equal(block, truth["x"][10 * i : 10 * i + 10])
    pids = [p.pid for p in queue._pool.procs]
    os.kill(pids[0], signal.SIGKILL)

    def consume_slowly():  # 400 blocks at 10 ms: the stream outlasts the detection
        guard = queue.get()
        assert guard is not multitables.QueueClosed, "the stream ended without an error"
        with guard:
            time.sleep(0.01)

    exc, took = _drain_until_error(consume_slowly, 5)
    assert isinstance(exc, multitables.SubprocessException), exc
    assert took < 2, f"noticed after {took:.2f} s"
    assert f"pid {pids[0]}" in str(exc) and "signal 9" in str(exc)
    assert _alive_after(pids, 1) == []


@pytest.mark.parametrize("victim", [0, 1])
def test_worker_killed_then_requests(files, victim):
    path, _, truth = files
    reader = multitables.Reader(path, n_procs=2)
    try:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(100)
        np.testing.assert_array_equal(reader.request(ds[0:5], stage).get(), truth["x"][0:5])
        pids = [p.pid for p in reader._pool.procs]
        os.kill(pids[victim], signal.SIGKILL)
        assert _alive_after([pids[victim]], 2) == []
        exc, took = _drain_until_error(lambda: reader.request(ds[0:50], stage).get(), 5)
        assert isinstance(exc, multitables.SubprocessException), (
            f"requests kept being served for {took:.1f} s by a pool with a dead worker"
        )
        assert took < 2, f"noticed after {took:.2f} s"
        msg = str(exc)
        assert f"worker {victim}" in msg and f"pid {pids[victim]}" in msg and "signal 9" in msg
        assert _alive_after(pids, 1) == []
    finally:
        reader.close()


def test_worker_killed_during_a_pending_request(files):
    path, _, truth = files
    reader = multitables.Reader(path, n_procs=2)
    try:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(BIG_ROWS)
        reader.request(ds[0:5], stage).get()
        pids = [p.pid for p in reader._pool.procs]
        for pid in pids:  # freeze the read half-way: the request stays pending
            os.kill(pid, signal.SIGSTOP)
        request = reader.request(ds[:], stage)
        time.sleep(0.3)
        assert not request.done()
        os.kill(pids[0], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(multitables.SubprocessException,
                           match=rf"worker 0 \(pid {pids[0]}\).*signal 9"):
            request.get()
        assert time.monotonic() - t0 < 2
        assert _alive_after(pids, 2) == []
        with pytest.raises(multitables.QueueClosedException):
            reader.request(ds[0:5], stage)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        reader.close()


# ---- the parent dies, or gets Ctrl-C --------------------------------------------------------

# A child with a running cyclic queue and a Reader with a request never collected; it prints
# the pids of their workers. The scripts below go on from there.
_QUEUE_AND_PENDING_REQUEST = """
    import json, sys, time, multitables
    path = sys.argv[1]
    queue = multitables.Streamer(path).get_queue("x", n_procs=2, cyclic=True, block_size=10)
    with queue.get():
        pass
    reader = multitables.Reader(path, n_procs=2)
    ds = reader.get_dataset("x")
    stage = ds.create_stage(1000)
    reader.request(ds[0:5], stage).get()
    pending = reader.request(ds[0:1000], stage)
    pids = [p.pid for p in queue._pool.procs] + [p.pid for p in reader._pool.procs]
    print(json.dumps(pids), flush=True)
"""

_PARENT_DIES = _QUEUE_AND_PENDING_REQUEST + """
    while True:
        with queue.get():
            time.sleep(0.05)
"""


@pytest.mark.timeout(40)
def test_workers_exit_when_the_parent_is_killed(files):
    shm_before = _shm()
    with _child(_PARENT_DIES, files[0]) as child:
        pids = _read_pids(child)
        assert len(pids) == 4
        time.sleep(0.3)
        child.pids = []  # they must go by themselves
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        t0 = time.monotonic()
        alive = _alive_after(pids, 5)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        took = time.monotonic() - t0
        assert alive == [], f"workers {alive} outlived their parent by {took:.1f} s"
    assert _shm() - shm_before == set()


_CTRL_C_QUEUE = """
    import json, os, signal, sys, multitables
    queue = multitables.Streamer(sys.argv[1]).get_queue(
        "x", n_procs=1, cyclic=True, block_size=10, read_ahead=2)
    with queue.get():
        pass
    pids = [p.pid for p in queue._pool.procs]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # no block ever comes again
    print(json.dumps(pids), flush=True)
    while True:
        with queue.get():
            pass
"""

_CTRL_C_REQUEST = """
    import json, os, signal, sys, multitables
    reader = multitables.Reader(sys.argv[1], n_procs=2)
    ds = reader.get_dataset("x")
    stage = ds.create_stage(100)
    reader.request(ds[0:5], stage).get()
    pids = [p.pid for p in reader._pool.procs]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    request = reader.request(ds[0:100], stage)
    print(json.dumps(pids), flush=True)
    request.get()
"""


@pytest.mark.timeout(40)
@pytest.mark.parametrize("code", [_CTRL_C_QUEUE, _CTRL_C_REQUEST], ids=["queue", "request"])
def test_ctrl_c_while_waiting_shuts_everything_down(files, code):
    with _child(code, files[0], start_new_session=True) as child:
        pids = _read_pids(child)
        time.sleep(0.5)  # blocked in get() by now
        assert child.poll() is None
        os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        t0 = time.monotonic()
        _, err, left = _finish(child, 8)
        took = time.monotonic() - t0
        assert "KeyboardInterrupt" in err, err
        assert child.returncode != 0
        assert took < 5, f"the child took {took:.1f} s to exit after Ctrl-C"
        assert left == [], f"workers {left} of {pids} outlived the child"


@pytest.mark.timeout(30)
def test_close_with_hung_workers_takes_one_join_timeout_not_one_per_worker(files):
    """A hung pool (workers stopped) is killed after JOIN_TIMEOUT in all, whatever n_procs is."""
    queue = multitables.Streamer(files[0]).get_queue("x", n_procs=3, cyclic=True, block_size=10)
    with queue.get():
        pass
    pids = [p.pid for p in queue._pool.procs]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    queue.close()
    took = time.monotonic() - t0
    assert _alive_after(pids, 1) == []
    assert took < multitables.workers.JOIN_TIMEOUT + 1, f"close() took {took:.1f} s"


# ---- exceptions inside the blocks that hold shared memory ---------------------------------


@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt, GeneratorExit])
def test_exception_in_guard_releases_the_only_slot(files, monkeypatch, exc_type):
    monkeypatch.setattr(multitables.streamjob, "SLOT_TARGET_BYTES", 1)  # one block per slot
    path, _, truth = files
    data = truth["x"]
    with multitables.Streamer(path).get_queue(
        "x", n_procs=2, read_ahead=1, block_size=10, ordered=True, cyclic=True
    ) as queue:
        for i in range(5):
            with pytest.raises(exc_type):
                with queue.get() as block:
                    np.testing.assert_array_equal(block, data[10 * i : 10 * i + 10])
                    raise exc_type("inside the guard")
        guard = queue.get()  # taken, never entered, dropped: released too
        del guard
        gc.collect()
        for i in range(6, 9):
            with queue.get() as block:
                np.testing.assert_array_equal(block, data[10 * i : 10 * i + 10])


@pytest.mark.parametrize("method", ["get_unsafe", "get_proxy", "get_direct"])
@pytest.mark.parametrize("exc_type", [ValueError, KeyboardInterrupt])
def test_exception_in_result_block_frees_the_stage(files, method, exc_type):
    path, _, truth = files
    with multitables.Reader(path, n_procs=1) as reader:
        ds = reader.get_dataset("small")
        pool = ds.create_stage_pool(10, 1)  # one stage: a leak would block the next request

        def boom(result):
            raise exc_type("inside the block")

        for i in range(3):
            request = reader.request(ds[i : i + 10], pool)
            with pytest.raises(exc_type):
                if method == "get_direct":
                    request.get_direct(boom)
                else:
                    with getattr(request, method)() as result:
                        boom(result)
        got = reader.request(ds[[5, 1]], pool).get()
        np.testing.assert_array_equal(got, truth["small"][[5, 1]])


# ---- close, garbage collection, interpreter exit, use after close --------------------------


def test_queue_close_is_idempotent_and_get_after_close_is_queue_closed(files):
    stream = multitables.Streamer(files[0])
    queue = stream.get_queue("x", n_procs=2, cyclic=True, block_size=10)
    guard = queue.get()
    pids = [p.pid for p in queue._pool.procs]
    queue.close()
    queue.close()
    stream.close()
    stream.close()
    assert _alive_after(pids, 1) == []
    assert queue.get() is multitables.QueueClosed
    assert queue.get() is multitables.QueueClosed
    assert list(queue.iter()) == []
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        with guard:
            pass
    guard.release()  # harmless after close


def test_closing_a_queue_from_another_thread_wakes_a_blocked_get(files):
    queue = multitables.Streamer(files[0]).get_queue(
        "x", n_procs=1, cyclic=True, block_size=10, read_ahead=1)
    with queue.get():
        pass
    pid = queue._pool.procs[0].pid
    os.kill(pid, signal.SIGSTOP)  # nothing more will come
    got = []
    thread = threading.Thread(target=lambda: got.append(queue.get()))
    try:
        thread.start()
        time.sleep(0.3)
        threading.Timer(0.1, lambda: os.kill(pid, signal.SIGCONT)).start()
        queue.close()
        thread.join(5)
        assert not thread.is_alive()
        assert got and (got[0] is multitables.QueueClosed or isinstance(got[0], multitables.Guard))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        queue.close()


def test_reader_close_and_stop_are_idempotent_and_use_after_close_raises(files):
    path, _, _ = files
    reader = multitables.Reader(path, n_procs=2)
    ds = reader.get_dataset("small")
    stage = ds.create_stage(5)
    reader.request(ds[0:5], stage).get()
    pids = [p.pid for p in reader._pool.procs]
    reader.close()
    reader.close()
    reader.stop()
    assert _alive_after(pids, 1) == []
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        reader.request(ds[0:5], stage)
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        reader.get_dataset("small")
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        ds.create_stage(5)
    # The stage died with its reader: another reader refuses it.
    with multitables.Reader(path, n_procs=1) as other:
        with pytest.raises(multitables.QueueClosedException, match="stage of /small is closed"):
            other.request(other.get_dataset("small")[0:5], stage)
    stopped = multitables.Reader(path, n_procs=1)
    stopped.request(stopped.get_dataset("small")[0], stopped.get_dataset("small").create_stage(1))
    stopped.stop()
    stopped.stop()
    stopped.close()


_PENDING_THEN_CLOSE = """
    import sys, multitables
    reader = multitables.Reader(sys.argv[1], n_procs=2)
    ds = reader.get_dataset("x")
    stage = ds.create_stage(4000)
    request = reader.request(ds[:], stage)
    reader.close()
    for name, call in [("done", request.done), ("get", request.get)]:
        try:
            call()
            print(name, "returned")
        except multitables.QueueClosedException as exc:
            print(name, "QueueClosedException", exc)
        except Exception as exc:
            print(name, type(exc).__name__, exc)
"""


def test_pending_request_of_a_closed_reader_raises_not_crashes(files):
    with _child(_PENDING_THEN_CLOSE, files[0]) as child:
        out, err, _ = _finish(child, 30)
    assert child.returncode == 0, f"child died with {child.returncode}:\n{err[-3000:]}"
    lines = dict(line.split(" ", 1) for line in out.splitlines())
    assert lines["get"].startswith("QueueClosedException"), out


def test_dropped_queue_and_reader_are_collected(files):
    path, _, _ = files
    queue = multitables.Streamer(path).get_queue("x", n_procs=2, cyclic=True, block_size=10)
    with queue.get():
        pass
    qpids = [p.pid for p in queue._pool.procs]
    del queue
    gc.collect()
    assert _alive_after(qpids, 1) == []
    reader = multitables.Reader(path, n_procs=2)
    ds = reader.get_dataset("small")
    reader.request(ds[0:5], ds.create_stage(5)).get()
    rpids = [p.pid for p in reader._pool.procs]
    del reader, ds
    gc.collect()
    assert _alive_after(rpids, 2) == []


@pytest.mark.timeout(40)
def test_interpreter_exit_without_close(files):
    shm_before = _shm()
    with _child(_QUEUE_AND_PENDING_REQUEST, files[0]) as child:  # its end: the exit
        pids = _read_pids(child)
        t0 = time.monotonic()
        _, err, left = _finish(child, 15)
        took = time.monotonic() - t0
        assert child.returncode == 0, err
        assert took < 4, f"exit took {took:.1f} s"
        assert left == [], f"workers {left} of {pids} outlived the child"
    assert _shm() - shm_before == set()


# ---- no leaks over many cycles ------------------------------------------------------------


@pytest.mark.timeout(90)
def test_many_create_use_close_cycles_leak_nothing(files):
    path, _, truth = files
    me = psutil.Process()
    stream = multitables.Streamer(path)

    def cycle(i):
        n_procs = 1 + i % 2
        with stream.get_queue("small", n_procs=n_procs, block_size=10, ordered=True) as queue:
            with queue.get() as block:
                np.testing.assert_array_equal(block, truth["small"][:10])
        with multitables.Reader(path, n_procs=n_procs) as reader:
            ds = reader.get_dataset("small")
            np.testing.assert_array_equal(
                reader.request(ds[[i % N_ROWS, 3]], ds.create_stage(2)).get(),
                truth["small"][[i % N_ROWS, 3]],
            )

    def snapshot():
        gc.collect()
        children = [p for p in me.children(recursive=True) if not _gone(p.pid)]
        return dict(children=len(children), threads=threading.active_count(),
                    fds=me.num_fds(), shm=len(_shm()), rss=me.memory_info().rss)

    for i in range(20):
        cycle(i)
    time.sleep(0.2)
    before = snapshot()
    t0 = time.monotonic()
    for i in range(200):
        cycle(i)
    took = time.monotonic() - t0
    time.sleep(0.2)
    after = snapshot()
    for key in ("children", "threads", "fds", "shm"):
        assert after[key] <= before[key], f"{key}: {before[key]} -> {after[key]}"
    growth = (after["rss"] - before["rss"]) / 2**20
    assert growth < 20, f"RSS grew by {growth:.1f} MiB over 200 cycles"
    assert took < 60


# ---- bad input ----------------------------------------------------------------------------


def _bad_input_calls(path, tables_path):
    """(front door, what goes wrong, call, exception type, message pattern)."""
    missing = os.path.join(os.path.dirname(path), "missing.h5")
    directory = os.path.dirname(path)
    not_hdf5 = os.path.join(os.path.dirname(path), "not_hdf5.h5")
    S = multitables.Streamer  # noqa: N806
    R = multitables.Reader  # noqa: N806
    return [
        ("missing file", lambda: S(missing).get_queue("x"), FileNotFoundError, re.escape(missing)),
        ("missing file", lambda: R(missing).get_dataset("x"), FileNotFoundError,
         re.escape(missing)),
        ("unreadable", lambda: S(directory).get_queue("x"), OSError, re.escape(directory)),
        ("unreadable", lambda: R(directory).get_dataset("x"), OSError, re.escape(directory)),
        ("not hdf5", lambda: S(not_hdf5).get_queue("x"), OSError, re.escape(not_hdf5)),
        ("not hdf5", lambda: R(not_hdf5).get_dataset("x"), OSError, re.escape(not_hdf5)),
        ("no path", lambda: S(path).get_queue("/no/such"), KeyError, "/no/such"),
        ("no path", lambda: R(path).get_dataset("/no/such"), KeyError, "/no/such"),
        ("group", lambda: S(path).get_queue("group"), TypeError, "'group'.*not a dataset"),
        ("group", lambda: R(path).get_dataset("group"), TypeError, "'group'.*not a dataset"),
        ("empty", lambda: S(path).get_queue("empty"), ValueError, "/empty.*empty"),
        ("block_size 0", lambda: S(path).get_queue("x", block_size=0), ValueError,
         "block_size must be >= 1, got 0"),
        ("block_size -3", lambda: S(path).get_queue("x", block_size=-3), ValueError,
         "block_size.*-3"),
        ("block_size float", lambda: S(path).get_queue("x", block_size=2.5), TypeError,
         "block_size.*2.5"),
        ("block_size str", lambda: S(path).get_queue("x", block_size="10"), TypeError,
         "block_size.*'10'"),
        ("read_ahead 0", lambda: S(path).get_queue("x", read_ahead=0), ValueError,
         "read_ahead must be >= 1, got 0"),
        ("n_procs 0", lambda: S(path).get_queue("x", n_procs=0), ValueError,
         "n_procs must be >= 1, got 0"),
        ("n_procs 0", lambda: R(path, n_procs=0), ValueError, "n_procs must be >= 1, got 0"),
        ("n_procs -1", lambda: R(path, n_procs=-1), ValueError, "n_procs.*-1"),
        ("n_procs float", lambda: R(path, n_procs=1.5), TypeError, "n_procs.*1.5"),
        ("field", lambda: S(tables_path).get_queue("/table", field="nope"), ValueError,
         "no field 'nope'"),
        ("field", lambda: R(tables_path).get_dataset("/table")["nope"], ValueError,
         "no field 'nope'"),
        ("field", lambda: R(tables_path).get_dataset("/table").col("nope"), ValueError,
         "no field 'nope'"),
        ("h5py kwarg", lambda: S(path, bogus_option=1).get_queue("x"), TypeError,
         "bogus_option"),
        ("h5py kwarg", lambda: R(path, bogus_option=1).get_dataset("x"), TypeError,
         "bogus_option"),
    ]


def test_bad_input_raises_in_the_caller_naming_the_value(files):
    path, tables_path, _ = files
    with open(os.path.join(os.path.dirname(path), "not_hdf5.h5"), "w") as f:
        f.write("this is not an HDF5 file\n" * 100)
    children_before = len(psutil.Process().children(recursive=True))
    for what, call, exc_type, pattern in _bad_input_calls(path, tables_path):
        with pytest.raises(exc_type, match=pattern) as info:
            call()
        assert type(info.value) is not multitables.SubprocessException, what
        # Raised before any worker started.
        assert len(psutil.Process().children(recursive=True)) == children_before, what


@pytest.mark.parametrize(
    "key, pattern",
    [
        (np.s_[BIG_ROWS], f"index {BIG_ROWS} is out of bounds for axis 0 with size {BIG_ROWS}"),
        (np.s_[-BIG_ROWS - 1], f"index {-BIG_ROWS - 1} is out of bounds"),
        (np.s_[[1, BIG_ROWS + 5]], f"index {BIG_ROWS + 5} is out of bounds"),
        (np.s_[0, BIG_COLS], f"index {BIG_COLS} is out of bounds for axis 1"),
        (np.s_[1, 2, 3], "too many indices"),
        (np.s_[1.5], "only integers"),
        (np.s_[np.ones(3, bool)], "boolean index did not match"),
    ],
)
def test_bad_keys_raise_index_error(files, key, pattern):
    with multitables.Reader(files[0], n_procs=1) as reader:
        ds = reader.get_dataset("x")
        with pytest.raises(IndexError, match=pattern):
            ds[key]
        with pytest.raises(IndexError):
            np.zeros((BIG_ROWS, BIG_COLS), "f4")[key]  # numpy agrees


def test_stage_too_small_names_both_sizes(files):
    with multitables.Reader(files[0], n_procs=1) as reader:
        ds = reader.get_dataset("small")
        stage = ds.create_stage(2)
        with pytest.raises(multitables.SharedMemoryError,
                           match=r"stage holds 48 bytes but the result needs 120"):
            reader.request(ds[0:5], stage).get()
        np.testing.assert_array_equal(reader.request(ds[0:2], stage).get(), files[2]["small"][:2])


# ---- start methods ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp_helpers():
    """multiprocessing's own long-lived helpers (the fork server, the resource tracker), started
    before the no-leak fixture looks, since they outlive every test by design."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()


def _take(queue, n: int) -> list[np.ndarray]:
    blocks = []
    for _ in range(n):
        guard = queue.get()
        assert guard is not multitables.QueueClosed, f"the stream ended after {len(blocks)} blocks"
        with guard as block:
            blocks.append(block.copy())
    return blocks


def _assert_workers_wait(pool, idle: float = 0.5) -> None:
    """Idle workers must wait for work, not leave (a stream would then stall for ever)."""
    time.sleep(idle)
    gone = [(p.pid, p.exitcode) for p in pool.procs if not p.is_alive()]
    assert not gone, f"workers (pid, exit code) {gone} left after {idle} s idle"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_start_methods(files, method, mp_helpers, monkeypatch):
    monkeypatch.setattr(multitables.streamjob, "SLOT_TARGET_BYTES", 1)  # many small slots
    path, tables_path, truth = files
    with multitables.Streamer(path, start_method=method) as stream:
        with stream.get_queue("x", n_procs=2, block_size=100, ordered=True, read_ahead=2,
                              remainder=True) as queue:
            blocks = _take(queue, 5)
            _assert_workers_wait(queue._pool)
            blocks += _take(queue, BIG_ROWS // 100 - 5)
            assert queue.get() is multitables.QueueClosed
    np.testing.assert_array_equal(np.concatenate(blocks), truth["x"])
    with multitables.Streamer(tables_path, start_method=method) as stream:
        with stream.get_queue("/table", n_procs=2, block_size=13, ordered=True, field="vec",
                              remainder=True) as queue:
            blocks = _take(queue, -(-N_ROWS // 13))
    np.testing.assert_array_equal(np.concatenate(blocks), truth["table"]["vec"])
    with multitables.Reader(tables_path, n_procs=2, start_method=method) as reader:
        table = reader.get_dataset("/table")
        stage = table.create_stage(N_ROWS)
        key = [50, 3, 50, 96]
        np.testing.assert_array_equal(reader.request(table[key], stage).get(), truth["table"][key])
        _assert_workers_wait(reader._pool)
        np.testing.assert_array_equal(reader.request(table[10:40:3], stage).get(),
                                      truth["table"][10:40:3])
        image = table["image"]
        np.testing.assert_array_equal(reader.request(image[[7, 1], 2], stage).get(),
                                      truth["table"]["image"][[7, 1], 2])
        carray = reader.get_dataset("/carray")
        np.testing.assert_array_equal(
            reader.request(carray[::-7], carray.create_stage(N_ROWS)).get(),
            truth["carray"][::-7])


# ---- shared memory that runs out ----------------------------------------------------------

_FSIZE_LIMITED = """
    import re, resource, signal, sys, multitables
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    path = sys.argv[1]
    try:
        multitables.Streamer(path).get_queue("x", n_procs=1, block_size=2000, read_ahead=4)
        print("queue: no error")
    except multitables.SharedMemoryError as exc:
        print("queue:", str(exc).replace("\\n", " "))
    with multitables.Reader(path, n_procs=1) as reader:
        ds = reader.get_dataset("x")
        try:
            ds.create_stage(2000)
            print("stage: no error")
        except multitables.SharedMemoryError as exc:
            print("stage:", str(exc).replace("\\n", " "))
        small = ds.create_stage(10)  # what fits still works
        print("small:", reader.request(ds[0:10], small).get().shape)
"""


def _bytes_named(message: str) -> int:
    numbers = [int(n) for n in re.findall(r"(\d+) bytes", message)]
    assert numbers, message
    return max(numbers)


@pytest.mark.timeout(40)
def test_shared_memory_shortage_is_an_error_not_sigbus(files):
    with _child(_FSIZE_LIMITED, files[0]) as child:
        out, err, _ = _finish(child, 30)
    assert child.returncode == 0, f"child died with {child.returncode}:\n{err[-3000:]}"
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    slot_bytes = 2000 * BIG_COLS * 4
    assert _bytes_named(lines["queue"]) >= 4 * slot_bytes, lines["queue"]
    assert _bytes_named(lines["stage"]) >= slot_bytes, lines["stage"]
    assert lines["small"] == "(10, 256)"


@contextlib.contextmanager
def _file_size_limit(nbytes: int):
    """A safety net: no memfd of this process can grow beyond ``nbytes`` (ftruncate fails with
    EFBIG). Needed because fallocate on a memfd does not fail fast: asked for a terabyte it
    reserves pages at gigabytes a second until the machine runs out (tried on the test machine;
    only SIGKILL interrupts it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


def _refused_by_itself(exc: BaseException) -> bool:
    """False when only the safety net (EFBIG from ftruncate) stopped the reservation."""
    cause = exc.__cause__
    return not (isinstance(cause, OSError) and cause.errno == errno.EFBIG)


@pytest.mark.timeout(30)
def test_absurd_sizes_raise_shared_memory_error_quickly(tmp_path):
    path = tmp_path / "wide.h5"
    with h5py.File(path, "w") as f:  # rows of 1 MiB, nothing stored
        f.create_dataset("x", shape=(4, 1 << 18), dtype="f4", chunks=(1, 1 << 18))
    t0 = time.monotonic()
    with _file_size_limit(4 << 30):
        with pytest.raises(multitables.SharedMemoryError, match=r"\d{13} bytes") as queue_error:
            multitables.Streamer(path).get_queue("x", n_procs=1, block_size=1,
                                                 read_ahead=10**6)
        with multitables.Reader(path, n_procs=1) as reader:
            ds = reader.get_dataset("x")
            with pytest.raises(multitables.SharedMemoryError, match=r"\d{13} bytes") as stage_error:
                ds.create_stage(10**6)
    assert time.monotonic() - t0 < 5
    assert _bytes_named(str(queue_error.value)) >= 10**6 * (1 << 20)
    assert _bytes_named(str(stage_error.value)) >= 10**6 * (1 << 20)
    for exc in (queue_error.value, stage_error.value):
        assert _refused_by_itself(exc), (
            "only the test's RLIMIT_FSIZE net stopped a 1 TB reservation; without it the "
            f"library would have fallocated until the machine ran out of memory: {exc}"
        )


# ---- files that change under the readers ---------------------------------------------------


def _damage(path, how: str) -> None:
    size = os.path.getsize(path)
    if how == "truncate":
        os.truncate(path, size // 3)
    else:
        with h5py.File(path, "r") as f:  # garbage over the middle third of the chunks
            dsid = f["x"].id
            n = dsid.get_num_chunks()
            infos = [dsid.get_chunk_info(i) for i in range(n // 3, 2 * n // 3)]
        rng = np.random.default_rng(3)
        with open(path, "r+b") as f:
            for info in infos:
                f.seek(info.byte_offset)
                f.write(rng.integers(0, 256, info.size, dtype=np.uint8).tobytes())


def _assert_worker_error(exc: BaseException | None) -> None:
    assert exc is not None, "the damaged file was read without an error"
    assert isinstance(exc, (OSError, multitables.SubprocessException)), repr(exc)
    if not isinstance(exc, multitables.SubprocessException):
        assert "the worker's traceback" in str(exc), str(exc)


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_file_damaged_during_a_stream(tmp_path, how):
    """Several workers fail at once: the consumer must get the error, never a quiet end."""
    for attempt in range(5):
        path = tmp_path / f"damaged{attempt}.h5"
        _write_big(path)
        queue = multitables.Streamer(path, rdcc_nbytes=0).get_queue(
            "x", n_procs=3, cyclic=True, block_size=64)
        try:
            for _ in range(100):  # every worker has opened the file and is reading
                with queue.get():
                    pass
            _damage(path, how)

            def consume(queue=queue, attempt=attempt):
                guard = queue.get()
                assert guard is not multitables.QueueClosed, (
                    f"attempt {attempt}: the stream ended quietly instead of raising")
                with guard:
                    pass

            exc, took = _drain_until_error(consume, 5)
            _assert_worker_error(exc)
            assert took < 3
        finally:
            queue.close()


@pytest.mark.parametrize("how", ["truncate", "garbage"])
def test_file_damaged_before_a_request(tmp_path, how):
    path = tmp_path / "damaged.h5"
    truth = _write_big(path)
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(BIG_ROWS)
        np.testing.assert_array_equal(reader.request(ds[0:10], stage).get(), truth[0:10])
        _damage(path, how)
        exc, _ = _drain_until_error(lambda: reader.request(ds[:], stage).get(), 0.01)
        _assert_worker_error(exc)
        # A failed read is the request's error: the reader and the stage go on serving.
        if not reader._closed:
            np.testing.assert_array_equal(reader.request(ds[0:10], stage).get(), truth[0:10])


# ---- the suite's no-leak fixture ---------------------------------------------------------

_LEAKY_TESTS = """
    import multiprocessing, os, time

    def test_leaves_a_process():
        multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,),
                                                    daemon=True).start()

    def test_leaves_shared_memory():
        open("/dev/shm/{name}", "w").close()

    def test_clean():
        pass
"""


@pytest.mark.timeout(60)
def test_no_leaks_fixture_catches_leaks(tmp_path):
    shutil.copy(os.path.join(REPO, "tests", "conftest.py"), tmp_path / "conftest.py")
    name = f"multitables-test-leak-{os.getpid()}"
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(_LEAKY_TESTS).format(name=name))
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
             "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)],
            capture_output=True, text=True, timeout=50, cwd=tmp_path,
        )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "test left child processes" in out, out
    assert f"test left /dev/shm entries: ['{name}']" in out, out
    assert re.search(r"\b3 passed, 2 errors\b", out), out  # teardown errors of 2 of 3 tests


def test_worker_oserror_keeps_errno_and_filename(tmp_path):
    """An OSError from a worker comes back as one: its type and errno, the file in its text."""
    import errno as errno_codes

    from multitables.errbox import ErrorBox

    box = ErrorBox(bytearray(1 << 14), 0, 1 << 14)
    box.put(FileNotFoundError(errno_codes.ENOENT, "No such file", "/x/y.h5"), "in worker 0")
    exc = box.exception()
    assert isinstance(exc, FileNotFoundError)
    assert exc.errno == errno_codes.ENOENT
    assert "No such file: '/x/y.h5'" in str(exc) and "in worker 0" in str(exc)


# ---- workers standing by between the queues of a Streamer ---------------------------------


@pytest.mark.timeout(60)
def test_a_standby_worker_killed_while_idle_is_replaced(files):
    with multitables.Streamer(files[0]) as stream:
        with stream.get_queue("x", n_procs=2, ordered=True) as queue:
            pids = [p.pid for p in queue._pool.procs]
            _drain_rows(queue)
        os.kill(pids[0], signal.SIGKILL)
        assert _alive_after([pids[0]], 5) == []
        with stream.get_queue("x", n_procs=2, ordered=True, remainder=True) as queue:
            now = [p.pid for p in queue._pool.procs]
            got = np.concatenate(_drain_rows(queue))
    assert pids[0] not in now and pids[1] in now
    np.testing.assert_array_equal(got, files[2]["x"])


@pytest.mark.timeout(60)
def test_a_standby_worker_killed_in_a_later_queue_raises(files):
    with multitables.Streamer(files[0]) as stream:
        with stream.get_queue("x", n_procs=2) as queue:
            _drain_rows(queue)
        queue = stream.get_queue("x", n_procs=2, cyclic=True, block_size=64)
        with queue.get():
            pass
        victim = queue._pool.procs[1].pid
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(multitables.SubprocessException, match=f"pid {victim}"):
            for _ in range(100_000):
                with queue.get():
                    pass
        queue.close()
        with stream.get_queue("x", n_procs=2, ordered=True, remainder=True) as queue:
            got = np.concatenate(_drain_rows(queue))
    np.testing.assert_array_equal(got, files[2]["x"])


def _close_copies(streamer, queue, reader) -> None:
    """In a forked child (a DataLoader worker, say): close the copies it inherited, as garbage
    collection or an exit hook there would."""
    queue.close()
    reader.close()
    streamer.close()


@pytest.mark.timeout(60)
def test_copies_closed_in_a_forked_child_leave_the_owners_workers_alone(files):
    path, _, truth = files
    streamer = multitables.Streamer(path)
    queue = streamer.get_queue("x", n_procs=2, ordered=True, remainder=True)
    pids = sorted(p.pid for p in queue._pool.procs)
    with queue.get() as block:
        head = block.copy()
    with multitables.Reader(path, n_procs=2) as reader:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(10)
        child = multiprocessing.get_context("fork").Process(
            target=_close_copies, args=(streamer, queue, reader))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        np.testing.assert_array_equal(reader.request(ds[5:15], stage).get(), truth["x"][5:15])
    rest = _drain_rows(queue)  # the stream went on: the child's copy did not stop it
    np.testing.assert_array_equal(np.concatenate([head, *rest]), truth["x"])
    queue.close()
    with streamer.get_queue("x", n_procs=2) as queue:
        assert sorted(p.pid for p in queue._pool.procs) == pids  # still standing by
    streamer.close()


@pytest.mark.timeout(30)
def test_a_queue_whose_workers_failed_to_start_leaves_nothing_to_close_at_exit(files,
                                                                              monkeypatch):
    def fail(self, job, n_procs):
        raise OSError(errno.EAGAIN, "fork: Resource temporarily unavailable")

    monkeypatch.setattr(multitables.workers.StandbyWorkers, "run", fail)
    with pytest.raises(OSError, match="fork") as failure:
        multitables.Streamer(files[0]).get_queue("x", n_procs=2)
    assert failure.traceback  # keeps the half-made queue alive, as a logged traceback would
    multitables.streamer._close_live_queues()  # the interpreter's exit hook: must not raise


@pytest.mark.timeout(60)
def test_workers_that_reported_a_read_error_serve_the_next_queue(tmp_path):
    path = tmp_path / "damaged.h5"
    truth = _write_big(path)
    with multitables.Streamer(path, rdcc_nbytes=0) as stream:
        queue = stream.get_queue("x", n_procs=2, cyclic=True, block_size=64)
        pids = sorted(p.pid for p in queue._pool.procs)
        with queue.get():
            pass
        _damage(path, "garbage")

        def consume():
            with queue.get():
                pass

        exc, _ = _drain_until_error(consume, 5)
        _assert_worker_error(exc)
        queue.close()
        os.remove(path)
        _write_big(path)  # the same data again, in a new file
        with stream.get_queue("x", n_procs=2, ordered=True, remainder=True) as queue:
            assert sorted(p.pid for p in queue._pool.procs) == pids
            got = np.concatenate(_drain_rows(queue))
    np.testing.assert_array_equal(got, truth)
