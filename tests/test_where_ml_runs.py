"""Reader and Streamer where ML code runs: in torch DataLoader workers (daemonic processes), in
fork and spawn pools, after pickling, and in a child forked from the process that made them."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time

import numpy as np
import pytest
from helpers import Child, alive_after, forked_results, write_h5py

import multitables

pytestmark = pytest.mark.timeout(120)

ROWS = 300


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("ml") / "ml.h5"
    write_h5py(p, "x", _truth(), chunks=(16, 4), compression="gzip")
    return str(p)


def _truth() -> np.ndarray:
    return np.arange(ROWS * 4, dtype="<i8").reshape(ROWS, 4)


@pytest.fixture(scope="module")
def mp_helpers():
    """multiprocessing's long-lived helpers (the resource tracker, started by spawn), started
    before the no-leak fixture looks, since they outlive every test by design."""
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()


def _rows_by_reader(reader: multitables.Reader, rows: list[int]) -> np.ndarray:
    ds = reader.get_dataset("x")
    stage = ds.create_stage(len(rows))
    return reader.request(ds[rows], stage).get()


def _task(args) -> tuple[int, list]:
    reader, rows = args
    return os.getpid(), _rows_by_reader(reader, rows).tolist()


def _stream_task(streamer: multitables.Streamer) -> list:
    return [row.tolist() for row in streamer.get_generator("x", n_procs=2, ordered=True)]


# ---- pickling ---------------------------------------------------------------------------------


def test_reader_and_streamer_pickle_as_their_arguments(path):
    with multitables.Reader(path, n_procs=2, allow_pickle=True, rdcc_nbytes=1 << 20) as reader:
        _rows_by_reader(reader, [1])  # with workers running: they do not travel
        copy = pickle.loads(pickle.dumps(reader))
        try:
            assert (copy.filename, copy.n_procs, copy.allow_pickle, copy.file_kwargs) == (
                path, 2, True, {"rdcc_nbytes": 1 << 20})
            assert copy._pool is None  # started lazily, by its first request
            np.testing.assert_array_equal(_rows_by_reader(copy, [5, 2, 5]), _truth()[[5, 2, 5]])
            assert {p.pid for p in copy._pool.procs}.isdisjoint(p.pid for p in reader._pool.procs)
        finally:
            copy.close()
    with multitables.Streamer(path, rdcc_nbytes=1 << 20) as streamer:
        copy = pickle.loads(pickle.dumps(streamer))
        with copy:
            assert copy.file_kwargs == {"rdcc_nbytes": 1 << 20}
            np.testing.assert_array_equal(np.array(_stream_task(copy)), _truth())


# ---- pools ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_reader_sent_to_a_pool_reads_there_with_workers_of_its_own(path, method, mp_helpers):
    with multitables.Reader(path, n_procs=1) as reader:
        _rows_by_reader(reader, [0])
        tasks = [(reader, [i, ROWS - 1 - i, i]) for i in range(6)]
        with multiprocessing.get_context(method).Pool(2) as pool:
            results = pool.map(_task, tasks)
            pool.close()
            pool.join()
        np.testing.assert_array_equal(_rows_by_reader(reader, [7]), _truth()[[7]])
    for (_, rows), (_, got) in zip(tasks, results, strict=True):
        np.testing.assert_array_equal(got, _truth()[rows])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_streamer_sent_to_a_pool_streams_there(path, method, mp_helpers):
    with multitables.Streamer(path) as streamer:
        with multiprocessing.get_context(method).Pool(2) as pool:
            results = pool.map(_stream_task, [streamer] * 2)
            pool.close()
            pool.join()
    for got in results:
        np.testing.assert_array_equal(np.array(got), _truth())


def _use_inherited(reader, streamer, stage, out) -> None:
    ds = reader.get_dataset("x")
    rows = reader.request(ds[[9, 3]], stage).get()  # a stage the parent's workers had mapped
    stream = _stream_task(streamer)
    out.put((rows.tolist(), stream, [p.pid for p in reader._pool.procs]))
    reader.close()
    streamer.close()


def test_a_reader_made_in_the_parent_works_in_a_forked_child(path):
    """Inherited, not pickled: the child's copy starts workers of its own (their channels are
    its own, so no 'received 0 items of ancdata')."""
    with multitables.Reader(path, n_procs=2) as reader, multitables.Streamer(path) as streamer:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(2)
        reader.request(ds[[0, 1]], stage).get()
        reader.request(ds[[2, 3]], stage).get()  # mapped by both workers, most likely
        list(streamer.get_generator("x", n_procs=2))
        parents = [p.pid for p in reader._pool.procs]
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_use_inherited, args=(reader, streamer, stage, out))
        child.start()
        rows, stream, theirs = out.get(timeout=60)
        child.join(30)
        assert child.exitcode == 0
        np.testing.assert_array_equal(rows, _truth()[[9, 3]])
        np.testing.assert_array_equal(np.array(stream), _truth())
        assert set(theirs).isdisjoint(parents)
        # The owner's workers were left alone by the child's close().
        assert [p.pid for p in reader._pool.procs] == parents
        np.testing.assert_array_equal(_rows_by_reader(reader, [4]), _truth()[[4]])
        out.close()
        out.join_thread()


# ---- torch DataLoader workers (daemonic) -------------------------------------------------------


class _ReaderRows:
    """A map-style dataset reading each row through a Reader made in the main process."""

    def __init__(self, path):
        self.reader = multitables.Reader(path, n_procs=1)

    def __len__(self):
        return ROWS

    def __getitem__(self, i):
        return _rows_by_reader(self.reader, [i])[0]


try:  # torch is optional: without it the DataLoader cases skip
    from torch.utils.data import IterableDataset as _Iterable
except ImportError:
    _Iterable = object  # type: ignore[assignment,misc]


class _StreamerRows(_Iterable):
    """An iterable dataset streaming its worker's share of the rows through a Streamer."""

    def __init__(self, path):
        super().__init__()
        self.streamer = multitables.Streamer(path)

    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        worker, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for i, row in enumerate(self.streamer.get_generator("x", n_procs=2, ordered=True)):
            if i % n == worker:
                yield row


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("kind", ["reader", "streamer"])
def test_inside_torch_dataloader_workers(path, method, kind, mp_helpers):
    torch = pytest.importorskip("torch")
    dataset = _ReaderRows(path) if kind == "reader" else _StreamerRows(path)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2,
                                         multiprocessing_context=method)
    got = np.stack([t.numpy() for t in loader])
    if kind == "reader":
        np.testing.assert_array_equal(got, _truth())
        dataset.reader.close()
    else:
        assert sorted(map(tuple, got)) == sorted(map(tuple, _truth()))
        dataset.streamer.close()


_DAEMON_PARENT = """
    import json, multiprocessing, sys, time, multitables

    def serve(path, out):
        reader = multitables.Reader(path, n_procs=2)
        ds = reader.get_dataset("x")
        reader.request(ds[[1, 2]], ds.create_stage(2)).get()
        queue = multitables.Streamer(path).get_queue("x", n_procs=2, cyclic=True, block_size=8)
        with queue.get():
            pass
        out.put([p.pid for p in reader._pool.procs] + [p.pid for p in queue._pool.procs])
        time.sleep(600)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        daemon = ctx.Process(target=serve, args=(sys.argv[1], out), daemon=True)
        daemon.start()
        print(json.dumps([daemon.pid] + out.get(timeout=60)), flush=True)
        time.sleep(600)
"""


@pytest.mark.timeout(60)
def test_workers_of_a_daemonic_process_exit_when_it_is_killed(path):
    with Child(_DAEMON_PARENT, path) as child:
        daemon, *workers = child.read_pids()
        # The Streamer's two and the Reader's one: it starts another only once requests wait.
        assert len(workers) == 3
        child.pids = [daemon]  # the workers must go by themselves
        os.kill(daemon, signal.SIGKILL)
        t0 = time.monotonic()
        alive = alive_after(workers, 5)
        Child._kill_workers(alive)
        assert alive == [], (
            f"workers {alive} outlived their daemonic parent by {time.monotonic() - t0:.1f} s")


def _get_inherited(queue, out) -> None:
    try:
        queue.get()
    except RuntimeError as exc:
        out.put(str(exc))
    else:
        out.put("no error")


def test_a_queue_inherited_by_a_forked_child_names_the_fix_instead_of_taking_blocks(path):
    with multitables.Streamer(path) as streamer:
        with streamer.get_queue("x", n_procs=1, ordered=True, block_size=10) as queue:
            ctx = multiprocessing.get_context("fork")
            out = ctx.Queue()
            child = ctx.Process(target=_get_inherited, args=(queue, out))
            child.start()
            message = out.get(timeout=30)
            child.join(30)
            assert "make the queue in this process" in message, message
            with queue.get() as block:  # the child took nothing
                np.testing.assert_array_equal(block, _truth()[:10])
            out.close()
            out.join_thread()


def _read_many(reader, stage, seed, out) -> None:
    ds = reader.get_dataset("x")
    rng = np.random.default_rng(seed)
    wrong = 0
    for _ in range(200):
        rows = rng.integers(0, ROWS, 2)
        wrong += not np.array_equal(reader.request(ds[rows], stage).get(), _truth()[rows])
    out.put(wrong)
    reader.close()


def test_forked_children_read_an_inherited_stage_into_pages_of_their_own(path):
    """Two children forked from a process whose Reader made a stage (DataLoader workers under
    fork) each use that stage: each must read into memory of its own, not the parent's pages,
    which they would share."""
    with multitables.Reader(path, n_procs=1) as reader:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(2)
        reader.request(ds[[0, 1]], stage).get()
        wrong = forked_results(_read_many, [(reader, stage, seed) for seed in range(2)])
        assert wrong == [0, 0]
        np.testing.assert_array_equal(reader.request(ds[[5, 7]], stage).get(), _truth()[[5, 7]])
