"""The parent goes: killed, interrupted by Ctrl-C while it waits, or exiting without close().
Its workers go too, within seconds. Each case runs in a child Python, watched from outside."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers import Child, alive_after, shm_entries

pytestmark = pytest.mark.timeout(60)


# A child with a running cyclic queue and a Reader with a request never collected (split over
# both workers, so that the second starts too); it prints the pids of their workers. The scripts
# below go on from there.
_QUEUE_AND_PENDING_REQUEST = """
    import json, sys, time, multitables
    multitables._reader.proxies.SPLIT_BYTES = 64
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
def test_workers_exit_when_the_parent_is_killed(data_files):
    shm_before = shm_entries()
    with Child(_PARENT_DIES, data_files[0]) as child:
        pids = child.read_pids()
        assert len(pids) == 4
        time.sleep(0.3)
        child.pids = []  # they must go by themselves
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        t0 = time.monotonic()
        alive = alive_after(pids, 5)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        took = time.monotonic() - t0
        assert alive == [], f"workers {alive} outlived their parent by {took:.1f} s"
    assert shm_entries() - shm_before == set()


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
def test_ctrl_c_while_waiting_shuts_everything_down(data_files, code):
    with Child(code, data_files[0], start_new_session=True) as child:
        pids = child.read_pids()
        time.sleep(0.5)  # blocked in get() by now
        assert child.poll() is None
        os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        t0 = time.monotonic()
        _, err, left = child.finish(8)
        took = time.monotonic() - t0
        assert "KeyboardInterrupt" in err, err
        assert child.returncode != 0
        assert took < 5, f"the child took {took:.1f} s to exit after Ctrl-C"
        assert left == [], f"workers {left} of {pids} outlived the child"


@pytest.mark.timeout(40)
def test_interpreter_exit_without_close(data_files):
    shm_before = shm_entries()
    with Child(_QUEUE_AND_PENDING_REQUEST, data_files[0]) as child:  # its end: the exit
        pids = child.read_pids()
        t0 = time.monotonic()
        _, err, left = child.finish(15)
        took = time.monotonic() - t0
        assert child.returncode == 0, err
        assert took < 4, f"exit took {took:.1f} s"
        assert left == [], f"workers {left} of {pids} outlived the child"
    assert shm_entries() - shm_before == set()
