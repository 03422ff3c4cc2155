"""The Loader's failure model and where it runs: Ctrl-C, a dying parent, exit without close,
pools of either start method. Each process-level case runs in a child Python, watched from
outside."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import h5py
import numpy as np
import pytest
from helpers import Child, alive_after, forked_results, worker_pids

import multitables

pytestmark = pytest.mark.timeout(60)

N = 5000


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("loader-proc") / "p.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=np.arange(N), chunks=(50,))
        f.create_dataset("x", data=np.arange(N * 4.0).reshape(N, 4), chunks=(50, 4),
                         compression="gzip")
    return path


# A child iterating an endless loop of shuffled epochs; it prints its workers' pids first.
_EPOCHS = """
    import json, os, signal, sys, psutil, multitables
    loader = multitables.Loader(sys.argv[1], ["idx", "x"], 10, shuffle=True, n_procs=2,
                                window=100)
    it = iter(loader)
    next(it)
    pids = [p.pid for p in psutil.Process().children()]
    if sys.argv[2] == "stop":
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)  # no unit ever comes again: the loop waits
    print(json.dumps(pids), flush=True)
    if sys.argv[2] == "exit":
        sys.exit(0)
    while True:
        for batch in it:
            pass
        it = iter(loader)
"""


@pytest.mark.parametrize("how", ["running", "stop"])
def test_ctrl_c_shuts_everything_down(path, how):
    with Child(_EPOCHS, path, how, start_new_session=True) as child:
        pids = child.read_pids()
        assert len(pids) == 2
        time.sleep(0.5)
        assert child.poll() is None
        os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        t0 = time.monotonic()
        _, err, left = child.finish(8)
        assert "KeyboardInterrupt" in err, err
        assert time.monotonic() - t0 < 5
        assert left == [], f"workers {left} of {pids} outlived the child"


def test_workers_exit_when_the_parent_is_killed(path):
    with Child(_EPOCHS, path, "running") as child:
        pids = child.read_pids()
        child.pids = []  # they must go by themselves
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        alive = alive_after(pids, 5)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert alive == [], f"workers {alive} outlived their parent"


def test_exit_without_close_mid_epoch(path):
    with Child(_EPOCHS, path, "exit") as child:
        pids = child.read_pids()
        _, err, left = child.finish(15)
        assert child.returncode == 0, err
        assert left == [], f"workers {left} of {pids} outlived the child"


def _epoch_of_rank(args):
    path, rank = args
    with multitables.Loader(path, "idx", 64, shuffle=True, seed=3, rank=rank, world_size=2,
                            n_procs=1) as loader:
        return np.concatenate(list(loader)).tolist()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_loader_in_a_pool(path, method):
    """Pool workers are daemonic processes: the Loader's own workers start there all the same."""
    with multiprocessing.get_context(method).Pool(2) as pool:
        shares = pool.map(_epoch_of_rank, [(path, 0), (path, 1)])
    rows = shares[0] + shares[1]
    assert sorted(rows) == list(range(N))


def _epoch_of(loader):
    return np.concatenate(list(loader)).tolist()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_loader_sent_to_a_pool_plays_there(path, method):
    """A Loader pickles as its arguments and where it stands: the copy plays the same epoch."""
    with multitables.Loader(path, "idx", 64, shuffle=True, seed=5, n_procs=1) as loader:
        loader.set_epoch(4)
        with multiprocessing.get_context(method).Pool(1) as pool:
            there = pool.apply(_epoch_of, (loader,))
        assert there == _epoch_of(loader)


def test_a_forked_copy_starts_its_own_workers(path):
    """A child forked from a process whose Loader has workers plays with workers of its own,
    and leaves the parent's alone."""
    with multitables.Loader(path, "idx", 64, shuffle=True, n_procs=1) as loader:
        here = _epoch_of(loader)  # the parent's workers now stand by
        workers = worker_pids()
        loader.set_epoch(0)
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1) as pool:
            there = pool.apply(_epoch_of, (loader,))
        assert there == here
        assert worker_pids() == workers
        assert _epoch_of(loader) == here  # epoch 0 again, on the parent's own workers


def _rows_checked(loader) -> list[int]:
    """The epoch's rows, each batch's x checked against its rows."""
    rows = []
    for idx, x in loader:
        np.testing.assert_array_equal(x[:, 0], idx * 4.0)
        rows += idx.tolist()
    return rows


def _play_into(loader, results):
    results.put(_rows_checked(loader))


def test_forked_children_inheriting_a_loader_use_memory_of_their_own(path):
    """Children forked (not pickled: DataLoader workers under fork) from a process whose Loader
    kept its last epoch's ring must not share that ring: each reads into its own."""
    with multitables.Loader(path, ["idx", "x"], 64, shuffle=True, n_procs=1) as loader:
        _rows_checked(loader)  # the ring of epoch 0 is kept for the next
        loader.set_epoch(1)
        got = forked_results(_play_into, [(loader,), (loader,)], timeout=30)
        here = _rows_checked(loader)  # epoch 1 here too, on the parent's ring
        assert got == [here, here]
        assert sorted(here) == list(range(N))
