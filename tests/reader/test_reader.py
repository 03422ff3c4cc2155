"""Reader against numpy/h5py reading the same files: keys, proxies, stages, futures, pools."""

from __future__ import annotations

import pickle
import threading
import time

import h5py
import numpy as np
import pytest
from helpers import N_ROWS, sample, write_h5py, write_pytables
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import multitables

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("reader")
    arrays = d / "arrays.h5"
    truth = {
        "f4": write_h5py(arrays, "f4", sample((N_ROWS, 6, 5), "<f4"), chunks=(8, 6, 5)),
        "gzip": write_h5py(arrays, "gzip", sample((N_ROWS, 4), "<i8", 1), chunks=(10, 4),
                           compression="gzip"),
        "be": write_h5py(arrays, "be", sample((N_ROWS,), ">f8", 2)),
        "img": write_h5py(arrays, "img", sample((N_ROWS, 3, 4, 2), "u1", 3), chunks=(5, 3, 4, 2)),
    }
    tables_path = d / "tables.h5"
    truth.update(write_pytables(tables_path))
    import tables

    with tables.open_file(str(tables_path), "a") as f:
        v = f.create_vlarray("/", "vl", tables.Int32Atom())
        rows = [np.arange(i % 5, dtype="i4") * i for i in range(N_ROWS)]
        for row in rows:
            v.append(row)
        s = f.create_vlarray("/", "strings", tables.VLStringAtom())
        for w in [b"alpha", b"", b"gamma"]:
            s.append(w)
        o = f.create_vlarray("/", "objects", tables.ObjectAtom())
        for obj in [{"a": 1}, [1, 2], "three"]:
            o.append(obj)
        u = f.create_vlarray("/", "unicode", tables.VLUnicodeAtom())
        for w in ["héllo", "wörld"]:
            u.append(w)
        sorted_table = f.create_table("/", "indexed", truth["table"].dtype)
        sorted_table.append(truth["table"])
        sorted_table.cols.score.create_csindex()
    truth["vl"] = rows
    return str(arrays), str(tables_path), truth


@pytest.fixture
def reader(files):
    with multitables.Reader(files[0], n_procs=2) as r:
        yield r


@pytest.fixture
def treader(files):
    with multitables.Reader(files[1], n_procs=2) as r:
        yield r


def fetch(reader, proxy, stage=None):
    stage = stage or proxy.create_stage(max(1, proxy.shape[0] if proxy.shape else 1))
    return reader.request(proxy, stage).get()


KEYS = [
    np.s_[5],
    np.s_[-1],
    np.s_[10:20],
    np.s_[::-3],
    np.s_[90:2:-7, 1],
    np.s_[[5, 1, 5, 96]],
    np.s_[[3, 2], :, [4, 0]],
    np.s_[..., 2],
    np.s_[None, 3:6, np.newaxis],
    np.s_[np.arange(N_ROWS) % 3 == 0],
    np.s_[[[1, 2], [3, 4]], 1:3],
    np.s_[2, 3, 4],
    np.s_[:, [True, False, True, False, True, False]],
    np.s_[[]],
    np.s_[()],
]


@pytest.mark.parametrize("key", KEYS, ids=[repr(k) for k in KEYS])
def test_array_keys_match_numpy(reader, files, key):
    truth = files[2]["f4"]
    ds = reader.get_dataset("/f4")
    stage = ds.create_stage(N_ROWS * 4)
    got = reader.request(ds[key], stage).get()
    expected = truth[key]
    assert type(got) is type(expected)
    assert got.dtype == expected.dtype and np.shape(got) == np.shape(expected)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["gzip", "be", "img"])
def test_layouts_and_dtypes(reader, files, name):
    truth = files[2][name]
    ds = reader.get_dataset(name)
    assert ds.shape == truth.shape and ds.dtype == truth.dtype
    key = np.s_[[40, 3, 3, -1]]
    got = fetch(reader, ds[key])
    assert got.dtype == truth.dtype  # byte order as stored
    np.testing.assert_array_equal(got, truth[key])
    np.testing.assert_array_equal(fetch(reader, ds), truth)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_keys_through_workers(files, data):
    truth = files[2]["img"]
    key = data.draw(
        st.one_of(
            hnp.basic_indices(truth.shape, allow_newaxis=True, allow_ellipsis=True),
            hnp.integer_array_indices(truth.shape[:1], result_shape=hnp.array_shapes(max_dims=2)),
        )
    )
    with multitables.Reader(files[0], n_procs=1) as reader:
        ds = reader.get_dataset("img")
        got = reader.request(ds[key], ds.create_stage(N_ROWS * 4)).get()
    np.testing.assert_array_equal(got, truth[key])
    assert np.shape(got) == truth[key].shape


def test_out_of_range_and_malformed_keys_raise_like_numpy(reader):
    ds = reader.get_dataset("f4")
    with pytest.raises(IndexError, match="index 97 is out of bounds for axis 0 with size 97"):
        ds[97]
    with pytest.raises(IndexError, match="too many indices"):
        ds[1, 2, 3, 4]
    with pytest.raises(IndexError):
        ds[1.5]
    with pytest.raises(IndexError):
        ds[[0, 1], [0, 1, 2]]


def test_proxy_kinds_shapes_and_dtypes(treader, files):
    truth = files[2]
    table = treader.get_dataset("/table")
    assert isinstance(table, multitables._reader.proxies.TableProxy)
    assert table.shape == (N_ROWS,) and table.dtype == truth["table"].dtype
    assert isinstance(treader.get_dataset("/carray"), multitables._reader.proxies.ArrayProxy)
    vl = treader.get_dataset("/vl")
    assert isinstance(vl, multitables._reader.proxies.VLArrayProxy) and vl.shape == (N_ROWS,)
    col = table.col("image")
    assert col.shape == (N_ROWS, 4, 4) and col.dtype == np.uint8


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda t: t[30:35], lambda r: r[30:35]),
        (lambda t: t["score"][30:35], lambda r: r["score"][30:35]),
        (lambda t: t[30:35]["vec"], lambda r: r[30:35]["vec"]),
        (lambda t: t.col("image")[30:35, ..., :2], lambda r: r["image"][30:35, ..., :2]),
        (lambda t: t["image"][[1, 2, 3]], lambda r: r["image"][[1, 2, 3]]),
        (lambda t: t["image"][[9, 2, 9], 1, ::-1], lambda r: r["image"][[9, 2, 9], 1, ::-1]),
        (lambda t: t["vec"][5], lambda r: r["vec"][5]),
        (lambda t: t[7], lambda r: r[7]),
        (lambda t: t.read(10, 50, 3), lambda r: r[10:50:3]),
        (lambda t: t.read(field="score"), lambda r: r["score"]),
        (lambda t: t.read_coordinates([4, 0, 4], "vec"), lambda r: r["vec"][[4, 0, 4]]),
        (lambda t: t.read_coordinates(np.array([90, 1])), lambda r: r[[90, 1]]),
    ],
)
def test_table_requests(treader, files, make, expected):
    rows = files[2]["table"]
    table = treader.get_dataset("/table")
    got = treader.request(make(table), table.create_stage(N_ROWS)).get()
    want = expected(rows)
    assert np.shape(got) == np.shape(want)
    np.testing.assert_array_equal(got, want)


def test_table_where_runs_numexpr_in_the_worker(treader, files):
    rows = files[2]["table"]
    table = treader.get_dataset("/table")
    stage = table.create_stage(N_ROWS)
    got = treader.request(table.where("(score > 0) & (score < lim)", {"lim": 1.0}), stage).get()
    np.testing.assert_array_equal(got, rows[(rows["score"] > 0) & (rows["score"] < 1.0)])
    got = treader.request(table["vec"].where("score > 0", start=10, stop=80, step=2), stage).get()
    part = rows[10:80:2]
    np.testing.assert_array_equal(got, part["vec"][part["score"] > 0])
    with pytest.raises(multitables.SharedMemoryError, match="stage holds"):
        treader.request(table.where("score > -100"), table.create_stage(3)).get()
    # A bad condition fails in the worker and comes back with its type and traceback.
    with pytest.raises(Exception, match="worker") as info:
        treader.request(table.where("no_such_column > 1"), stage).get()
    assert isinstance(info.value, (KeyError, NameError, ValueError))
    # The stage is still usable.
    assert len(treader.request(table.where("score > 0"), stage).get()) == (rows["score"] > 0).sum()


def test_table_read_sorted(treader, files):
    rows = files[2]["table"]
    table = treader.get_dataset("/indexed")
    stage = table.create_stage(N_ROWS)
    order = np.argsort(rows["score"], kind="stable")
    got = treader.request(table.read_sorted("score", checkCSI=True), stage).get()
    np.testing.assert_array_equal(got, rows[order])
    got = treader.request(table.read_sorted("score", field="vec", start=5, stop=50, step=4),
                          stage).get()
    np.testing.assert_array_equal(got, rows["vec"][order[5:50:4]])
    plain = treader.get_dataset("/table")
    with pytest.raises(ValueError, match="must have associated a 'full' index"):
        plain.read_sorted("score", checkCSI=True)
    with pytest.raises(ValueError, match="no field 'nope'"):
        plain.read_sorted("nope")


def test_vlarrays(treader, files):
    rows = files[2]["vl"]
    vl = treader.get_dataset("/vl")
    stage = vl.create_stage(1000)
    got = treader.request(vl[[5, 1, 5]], stage).get()
    assert got.dtype == object and got.shape == (3,)
    for g, i in zip(got, [5, 1, 5], strict=True):
        np.testing.assert_array_equal(g, rows[i])
    one = treader.request(vl[7], stage).get()
    np.testing.assert_array_equal(one, rows[7])
    every = treader.request(vl, stage).get()
    assert [r.tolist() for r in every] == [r.tolist() for r in rows]
    strings = treader.get_dataset("/strings")
    assert list(treader.request(strings, strings.create_stage(100)).get()) == [
        b"alpha", b"", b"gamma"]
    with multitables.Reader(files[1], n_procs=1, allow_pickle=True) as trusting:
        objects = trusting.get_dataset("/objects")
        assert list(trusting.request(objects[::-1], objects.create_stage(500)).get()) == [
            "three", [1, 2], {"a": 1}]
    uni = treader.get_dataset("/unicode")
    assert list(treader.request(uni, uni.create_stage(100)).get()) == ["héllo", "wörld"]
    with pytest.raises(multitables.SharedMemoryError, match="stage holds"):
        treader.request(vl, vl.create_stage(10)).get()


def test_get_variants(reader, files):
    truth = files[2]["f4"]
    ds = reader.get_dataset("f4")
    stage = ds.create_stage(10)
    assert reader.request(ds[3:6], stage).get_direct(lambda a: float(a.sum())) == pytest.approx(
        float(truth[3:6].sum()), rel=1e-5)
    with reader.request(ds[3:6], stage).get_unsafe() as data:
        assert not data.flags.owndata
        np.testing.assert_array_equal(data, truth[3:6])
    with reader.request(ds[[8, 2]], stage).get_proxy() as data:
        np.testing.assert_array_equal(np.asarray(data), truth[[8, 2]])
        assert data.shape == (2, 6, 5)
        assert float((data + 1).sum()) == pytest.approx(float((truth[[8, 2]] + 1).sum()), 1e-5)
        kept = data
    with pytest.raises(ReferenceError, match="released"):
        kept.shape  # noqa: B018 - the access itself must raise
    with pytest.raises(ReferenceError):
        kept[0]
    with pytest.raises(ReferenceError):
        np.asarray(kept)


def test_exceptions_inside_get_blocks_free_the_stage(reader, files):
    ds = reader.get_dataset("f4")
    stage = ds.create_stage(5)
    for method in ("get_unsafe", "get_proxy"):
        with pytest.raises(ZeroDivisionError):
            with getattr(reader.request(ds[0:5], stage), method)():
                1 / 0  # noqa: B018
    np.testing.assert_array_equal(reader.request(ds[1], stage).get(), files[2]["f4"][1])


def test_stage_rules(reader, files):
    ds = reader.get_dataset("f4")
    stage = ds.create_stage(4)
    assert stage.shape == (4, 6, 5) and stage.nbytes == 4 * 6 * 5 * 4
    assert ds.create_stage((4, 6)).shape == (4, 6, 5)
    with pytest.raises(multitables.SharedMemoryError,
                       match=r"stage holds 480 bytes but the result needs 600 \(shape \(5, 6, 5\)"):
        reader.request(ds[0:5], stage).get()
    pending = reader.request(ds[0:4], stage)
    with pytest.raises(RuntimeError, match="still serving an earlier request"):
        reader.request(ds[0:4], stage)
    np.testing.assert_array_equal(pending.get(), files[2]["f4"][0:4])
    with pytest.raises(RuntimeError, match="already taken"):
        pending.get()
    with pytest.raises(ValueError, match="more dimensions"):
        ds.create_stage((1, 2, 3, 4))
    with pytest.raises(ValueError, match="holds nothing"):
        ds.create_stage(0)


def test_request_pool_with_a_loader_thread(reader, files):
    """The how-to's concurrent pattern: a thread makes requests, the caller collects them."""
    truth = files[2]["f4"]
    ds = reader.get_dataset("f4")
    pool = ds.create_stage_pool(1, 4)
    reqs = multitables.RequestPool()

    def loader():
        for i in range(N_ROWS):
            reqs.add(reader.request(ds[i : i + 1], pool))

    thread = threading.Thread(target=loader)
    thread.start()
    for i in range(N_ROWS):
        np.testing.assert_array_equal(reqs.next(timeout=10).get(), truth[i : i + 1])
    thread.join(10)
    assert not thread.is_alive()


def test_pool_exhausted_by_a_single_thread_raises(reader, monkeypatch):
    ds = reader.get_dataset("f4")
    pool = ds.create_stage_pool(1, 2)
    # Other threads alive (a library's, say) do not take this thread's results: no wait for
    # ever, but LONE_WAIT s for a request this thread may have handed over by hand.
    monkeypatch.setattr(multitables._reader.stages, "LONE_WAIT", 0.5)
    stop = threading.Event()
    bystander = threading.Thread(target=stop.wait)
    bystander.start()
    try:
        held = [reader.request(ds[i], pool) for i in range(2)]
        with pytest.raises(RuntimeError, match="all 2 stages of the pool"):
            reader.request(ds[3], pool)
        held[0].get()
        reader.request(ds[3], pool).get()
    finally:
        stop.set()
        bystander.join()


def test_pool_exhausted_by_a_producer_waits_for_its_consumer(reader, files):
    """Requests handed to a RequestPool may be taken by another thread: the producer waits for
    it to free a stage instead of raising."""
    ds = reader.get_dataset("f4")
    truth = files[2]["f4"]
    pool = ds.create_stage_pool(1, 2)
    requests = multitables.RequestPool()
    got = []

    def consumer():
        for _ in range(6):
            got.append(requests.next(timeout=20).get())

    thread = threading.Thread(target=consumer)
    for i in range(2):
        requests.add(reader.request(ds[i], pool))
    thread.start()
    for i in range(2, 6):  # the pool is full: each request waits for the consumer
        requests.add(reader.request(ds[i], pool))
    thread.join(20)
    assert not thread.is_alive()
    np.testing.assert_array_equal(np.array(got), truth[:6])


def test_close_and_use_after_close(files):
    reader = multitables.Reader(files[0], n_procs=2)
    ds = reader.get_dataset("f4")
    stage = ds.create_stage(2)
    reader.request(ds[0], stage).get()
    reader.close(wait=True)
    reader.close()
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        reader.request(ds[0], stage)
    with pytest.raises(multitables.QueueClosedException, match="closed"):
        reader.get_dataset("f4")


def test_selection_and_specs_pickle(reader):
    spec = reader.get_dataset("f4")[[3, 1], 2].spec()
    again = pickle.loads(pickle.dumps(spec))
    assert again.shape == spec.shape == (2, 5)
    assert repr(again.selection) == repr(spec.selection)


def test_subarray_field_of_a_multidimensional_compound(tmp_path):
    dtype = np.dtype([("x", "<f4"), ("v", "<i4", (3,))])
    data = np.zeros((6, 4), dtype)
    data["x"] = np.arange(24).reshape(6, 4)
    data["v"] = np.arange(72).reshape(6, 4, 3)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        f["c"] = data
    with multitables.Reader(path, n_procs=1) as reader:
        ds = reader.get_dataset("c")
        stage = ds.create_stage(6)
        for key in [np.s_[0:3, 1, [2, 0]], np.s_[[4, 1, 4], ::-1], np.s_[5], np.s_[..., 1]]:
            got = reader.request(ds["v"][key], stage).get()
            np.testing.assert_array_equal(got, data["v"][key])


def test_h5py_variable_length_strings_come_back_as_h5py_gives_them(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("utf8", data=["héllo", "", "wörld"], dtype=h5py.string_dtype())
        f.create_dataset("ascii", data=[b"ab", b"c"], dtype=h5py.string_dtype("ascii"))
    with h5py.File(path, "r") as f:
        truth = {name: f[name][()] for name in f}
    with multitables.Reader(path, n_procs=1) as reader:
        for name, expected in truth.items():
            ds = reader.get_dataset(name)
            stage = ds.create_stage(64)
            assert list(reader.request(ds, stage).get()) == list(expected)
            assert reader.request(ds[-1], stage).get() == expected[-1]


def test_dropped_stages_are_unmapped_in_the_workers(files):
    """A stage per request, dropped after use: worker descriptors and memory do not grow."""
    import gc

    import psutil

    with multitables.Reader(files[0], n_procs=1) as reader:
        ds = reader.get_dataset("f4")

        def one_request(i):
            stage = ds.create_stage(50)
            np.testing.assert_array_equal(reader.request(ds[i], stage).get(), files[2]["f4"][i])

        one_request(0)
        worker = psutil.Process(reader._pool.procs[0].pid)
        fds = worker.num_fds()
        for i in range(60):
            one_request(i % N_ROWS)
            gc.collect()
        assert worker.num_fds() <= fds + 2


def test_allow_pickle_is_off_unless_asked_for(files):
    with multitables.Reader(files[1], n_procs=1) as reader:
        assert reader.allow_pickle is False
    with multitables.Reader(files[1], n_procs=1, allow_pickle=True) as reader:
        assert reader.allow_pickle is True


def test_a_request_too_large_for_its_stage_header_travels_down_the_channel(tmp_path):
    """A key of many unsorted rows pickles to more than a stage's request area: it is sent down
    the worker's channel instead, and reads the same."""
    from multitables._reader import stages

    truth = sample((60_000,), "<i4")
    write_h5py(tmp_path / "rows.h5", "x", truth, chunks=(1000,))
    rows = np.random.default_rng(1).permutation(60_000)[:20_000]
    with multitables.Reader(tmp_path / "rows.h5", n_procs=1) as reader:
        ds = reader.get_dataset("x")
        key = ds[rows]
        assert len(pickle.dumps(key.spec())) > stages._REQUEST_BYTES
        stage = ds.create_stage(len(rows))
        np.testing.assert_array_equal(reader.request(key, stage).get(), truth[rows])
        np.testing.assert_array_equal(reader.request(ds[rows[:5]], stage).get(), truth[rows[:5]])


def test_requests_beyond_a_full_worker_queue_wait_for_room(files, monkeypatch):
    """More requests pending on a worker than its queue holds: the caller waits for the worker
    to take some, and every result is right."""
    from multitables._reader import control

    monkeypatch.setattr(control, "QUEUE_ITEMS", 4)
    monkeypatch.setattr(control, "PER_WORKER", control.DONE_BYTES + control.SlotQueue.nbytes(4))
    truth = files[2]["f4"]
    with multitables.Reader(files[0], n_procs=1) as reader:
        ds = reader.get_dataset("f4")
        stages = [ds.create_stage(3) for _ in range(12)]
        requests = [reader.request(ds[[i, 0, i]], stage) for i, stage in enumerate(stages)]
        for i, request in enumerate(requests):
            np.testing.assert_array_equal(request.get(), truth[[i, 0, i]])


def test_a_caller_bound_loop_starts_one_worker(files, monkeypatch):
    """A Reader starts its first worker with its first request and no other up front: a loop
    whose requests come back about as fast as it makes them (here: never one pending for as
    long as START_AFTER says, made huge) is served by that one, its results right."""
    from multitables._reader import dispatch

    monkeypatch.setattr(dispatch, "START_AFTER", 1e9)
    truth = files[2]["f4"]
    with multitables.Reader(files[0], n_procs=2) as reader:
        ds = reader.get_dataset("f4")
        pool = ds.create_stage_pool(8, 5)
        reqs = multitables.RequestPool()
        keys = [np.random.default_rng(i).choice(len(truth), 8, replace=False) for i in range(60)]
        for i, key in enumerate(keys):
            reqs.add(reader.request(ds[key.tolist(), ...], pool))
            if i >= 4:
                np.testing.assert_array_equal(reqs.next().get(), truth[keys[i - 4]])
        for key in keys[-4:]:
            np.testing.assert_array_equal(reqs.next().get(), truth[key])
        assert len(reader._pool.procs) == 1 and reader._dispatcher.started == 1


def test_another_worker_starts_once_every_started_one_has_a_request_waiting_too_long():
    """worth_starting: only once every started worker has a request pending for START_AFTER
    times what the first worker took to start (known once it is ready); a worker with none
    pending, or a younger request, keeps to the workers started."""
    import collections

    from multitables._engine._ringbuf import Counter
    from multitables._reader import dispatch
    from multitables._reader.memory import MemoryKeeper

    d = dispatch.Dispatcher("f.h5", {}, 3, None, MemoryKeeper(), lambda: None)
    words = bytearray(64)
    d.ready = [Counter(words, 0)]
    d.started, d.started_ns = 2, time.monotonic_ns()
    now = time.monotonic()
    old = now - 3.5 * dispatch.START_AFTER * 0.01  # well past START_AFTER start-ups of 10 ms
    d.sent_at = [collections.deque([old] * 2), collections.deque([old])]
    assert not d.worth_starting([2, 1])  # the first worker is not ready: no start-up known
    d.ready[0].store(d.started_ns + 10_000_000)  # ready 10 ms after it was started
    assert d.worth_starting([2, 1])
    assert d.start_cost == pytest.approx(0.01)
    assert not d.worth_starting([2, 0])  # one of them is idle: it takes the next request
    d.sent_at[1] = collections.deque([now + 60])  # a request just sent to the second
    assert not d.worth_starting([2, 1])


def test_a_second_worker_starts_when_the_first_falls_behind(tmp_path, monkeypatch):
    """Slow requests (64 rows, each decoding a compressed chunk) queue up on the first worker;
    once each pending one has waited longer than a worker takes to start (START_AFTER made 1
    here: the test's requests are slow, but not by much), the second starts, and both serve."""
    from multitables._reader import dispatch

    monkeypatch.setattr(dispatch, "START_AFTER", 1)
    truth = sample((4096, 256), "<f8")
    write_h5py(tmp_path / "slow.h5", "x", truth, chunks=(64, 256), compression="gzip")
    keys = [np.random.default_rng(i).choice(4096, 64, replace=False) for i in range(24)]
    with multitables.Reader(tmp_path / "slow.h5", n_procs=2) as reader:
        ds = reader.get_dataset("x")
        pool = ds.create_stage_pool(64, 6)
        pending: list = []
        for key in keys:
            if len(pending) == 5:
                done_key, request = pending.pop(0)
                np.testing.assert_array_equal(request.get(), truth[done_key])
            pending.append((key, reader.request(ds[key], pool)))
        for done_key, request in pending:
            np.testing.assert_array_equal(request.get(), truth[done_key])
        assert reader._dispatcher.started == 2
        assert all(reader._dispatcher.finished), reader._dispatcher.finished


@pytest.fixture
def small_split(monkeypatch):
    from multitables._reader import proxies

    monkeypatch.setattr(proxies, "SPLIT_BYTES", 64)


def test_large_requests_are_split_over_the_workers(files, small_split):
    """A read of one slice or one index array, large enough, goes to every worker in parts of
    consecutive result rows, and reads as one: arrays, a compressed dataset, a table's field."""
    arrays, tables_path, truth = files
    keys = [np.s_[3:90], np.s_[-80:], np.s_[::1], np.array([7, 3, 96, 3, -1, 50] * 9),
            list(range(95, 5, -2))]
    for path, expected, field in [("f4", truth["f4"], None), ("gzip", truth["gzip"], None),
                                  ("table", truth["table"]["score"], "score")]:
        with multitables.Reader(tables_path if field else arrays, n_procs=3) as reader:
            ds = reader.get_dataset(path if not field else "/table")
            ds = ds[field] if field else ds
            stage = ds.create_stage(N_ROWS)
            for key in keys:
                proxy = ds[key]
                assert len(proxy.split(3) or []) in (2, 3), (path, key)
                np.testing.assert_array_equal(reader.request(proxy, stage).get(), expected[key])
            assert all(reader._dispatcher.finished), reader._dispatcher.finished


def test_a_failed_part_fails_the_request_once_every_part_is_done(files, small_split,
                                                                 monkeypatch):
    """One part's error is raised by get(), after the other parts have finished writing: the
    stage then serves the next request with nothing of the failed one left in it."""
    from multitables._reader import job

    execute = job.execute

    def failing_execute(spec, dataset, memory):
        if spec.at:
            raise OSError("a bad chunk")
        time.sleep(0.2)  # the other part fails long before this one is done
        execute(spec, dataset, memory)

    monkeypatch.setattr(job, "execute", failing_execute)  # before the workers fork
    truth = files[2]["f4"]
    with multitables.Reader(files[0], n_procs=2) as reader:
        ds = reader.get_dataset("f4")
        stage = ds.create_stage(N_ROWS)
        with pytest.raises(OSError, match="a bad chunk") as info:
            reader.request(ds[0:N_ROWS], stage).get()
        assert "part 2 of 2" in str(info.value)
        assert sum(done.load() for done in reader._dispatcher.done) == 2  # both parts were done
        np.testing.assert_array_equal(reader.request(ds[5:6], stage).get(), truth[5:6])


def test_a_record_taken_by_get_is_its_own(treader, files):
    rows = files[2]["table"]
    table = treader.get_dataset("/table")
    stage = table.create_stage(1)
    record = treader.request(table[3], stage).get()
    assert isinstance(record, np.void)
    treader.request(table[5], stage).get()  # the next result lands where the first lay
    assert record == rows[3]


def test_a_freed_stage_is_idle_before_another_request_can_claim_it(reader):
    # Freed the other way round, a request claiming the stage in between (another thread) would
    # have its PENDING overwritten by IDLE, and its get() return before the worker wrote.
    stage = reader.get_dataset("f4").create_stage(2)
    stage.claim(object())
    stage.memory.state.set(multitables._reader.stages.DONE)
    seen = []
    state = stage.memory.state

    class Watch:
        def set(self, value):
            seen.append((value, stage.owner is None))
            state.set(value)

        def __getattr__(self, name):
            return getattr(state, name)

    stage.memory.state = Watch()
    try:
        stage.free()
    finally:
        stage.memory.state = state
    assert seen == [(multitables._reader.stages.IDLE, False)]


def test_a_request_pool_filled_past_its_stages_by_a_lone_thread_raises(reader, monkeypatch):
    # Requests in a RequestPool may be taken by another thread; with none running, nothing can
    # free a stage, and the wait would never end.
    monkeypatch.setattr(multitables._reader.stages.threading, "active_count", lambda: 1)
    ds = reader.get_dataset("f4")
    pool = ds.create_stage_pool(1, 2)
    pending = multitables.RequestPool()
    for i in range(2):
        pending.add(reader.request(ds[i], pool))
    with pytest.raises(RuntimeError, match="no other thread runs"):
        reader.request(ds[3], pool)
    pending.next().get()
    pending.add(reader.request(ds[3], pool))


def test_a_fields_stage_holds_the_field(treader, files):
    rows = files[2]["table"]
    table = treader.get_dataset("/table")
    assert table.create_stage(8).nbytes == 8 * rows.dtype.itemsize  # whole rows
    score = table["score"].create_stage(8)
    assert score.nbytes == 8 * 4 and score.dtype == np.dtype("<f4")
    image = table["image"]  # a subarray field: (4, 4) of u1 per row
    for shape in (8, (8, 4, 4)):
        stage = image.create_stage(shape)
        assert stage.shape == (8, 4, 4) and stage.nbytes == 8 * 16
        got = treader.request(image[[5, 1, 5]], stage).get()
        np.testing.assert_array_equal(got, rows["image"][[5, 1, 5]])


def test_a_second_worker_is_woken_only_where_a_request_costs_a_worker_more_than_the_caller():
    """pick_worker's veto (worth_waking): not before the workers' cost per request is known
    (the first few requests), and then only where it exceeds WAKE_RATIO times the caller's
    (the gaps between its requests, less the time it waited for results)."""
    from multitables._engine._ringbuf import Counter
    from multitables._reader import dispatch
    from multitables._reader.memory import MemoryKeeper

    d = dispatch.Dispatcher("f.h5", {}, 2, None, MemoryKeeper(), lambda: None)
    counters = bytearray(128)
    d.busy = [Counter(counters, 0), Counter(counters, 64)]
    d.finished = [0, 0]
    clock = iter(range(1, 1000))
    dispatch_time = dispatch.time

    class FakeTime:
        @staticmethod
        def monotonic():
            return next(clock) * 1e-3  # a request every 1 ms

    try:
        dispatch.time = FakeTime  # type: ignore[assignment]
        for _ in range(4):
            d._pace()
        assert d.worker_cost is None and not d.worth_waking()
        assert d.caller_cost == pytest.approx(1e-3)
        d.waited = 0.6e-3  # the caller waited for most of the next gap: it costs 0.4 ms
        d._pace()
        assert d.caller_cost == pytest.approx(1e-3 - 0.6e-3 / 16)
        d.finished = [6, 2]
        d.busy[0].fetch_add(6_000_000)  # 8 requests, 1 ms of a worker's CPU each
        d.busy[1].fetch_add(2_000_000)
        d._pace()
        assert d.worker_cost == pytest.approx(1e-3)
        assert not d.worth_waking()  # 1 ms against ~1 ms of the caller's: no second worker
        d.finished = [14, 2]
        d.busy[0].fetch_add(8 * 3_000_000)  # 3 ms each now
        d._pace()
        assert d.worker_cost == pytest.approx(1e-3 + (3e-3 - 1e-3) * 8 / 16)
        assert d.worth_waking()
    finally:
        dispatch.time = dispatch_time


def test_workers_count_their_cpu_per_request(files):
    """Each worker adds the CPU time of every request it serves to its busy counter, which the
    caller reads to weigh a second worker; results stay right."""
    truth = files[2]["f4"]
    with multitables.Reader(files[0], n_procs=2) as reader:
        ds = reader.get_dataset("f4")
        pool = ds.create_stage_pool(8, 3)
        keys = [np.random.default_rng(i).choice(len(truth), 8, replace=False) for i in range(40)]
        for key in keys:
            np.testing.assert_array_equal(reader.request(ds[key.tolist(), ...], pool).get(),
                                          truth[key])
        d = reader._dispatcher
        d.pending()  # reads the workers' finished counts
        assert sum(d.finished) == 40
        assert sum(counter.load() for counter in d.busy) > 0
        assert d.worker_cost is not None and d.worker_cost > 0


def test_one_worker_serves_while_a_second_is_not_worth_waking():
    """pick_worker: while worth_waking says no, requests go to the first awake worker that has
    requests (not the least busy one, nor a sleeping one), unless its oldest request waits past
    WAKE_AFTER (a slow or stuck read: the next one must not wait behind it); once it says yes,
    to the least busy awake worker, or to a sleeping one when the awake fall behind."""
    import collections

    from multitables._reader import dispatch
    from multitables._reader.memory import MemoryKeeper

    d = dispatch.Dispatcher("f.h5", {}, 3, None, MemoryKeeper(), lambda: None)
    just = time.monotonic() + 60  # sent just now: not WAKE_AFTER ago, however slow the host
    d.sent_at = [collections.deque([just] * n) for n in (3, 2, 0)]
    d.caller_cost, d.worker_cost = 1e-3, 1e-3
    assert d.pick_worker([3, 2, 0]) == 0
    assert d.pick_worker([0, 2, 0]) == 1
    assert d.pick_worker([0, 0, 0]) == 0
    old = time.monotonic() - 1.0  # long past WAKE_AFTER
    d.sent_at = [collections.deque([old] * n) for n in (3, 2, 0)]
    assert d.pick_worker([3, 2, 0]) == 2  # worker 0 is stuck: not behind it
    d.worker_cost = 2e-3
    assert d.pick_worker([3, 2, 0]) == 2  # both awake ones fell behind: the sleeping one
    d.sent_at = [collections.deque([just] * n) for n in (3, 2, 0)]
    assert d.pick_worker([3, 2, 0]) == 1  # the least busy awake one


def test_a_workers_map_of_the_file_is_populated_ahead_of_its_reads(tmp_path):
    """Scattered rows are copied from the worker's map of the file; the map is populated ahead
    of the reads (every page of it mapped, where the reads alone would map a few around each
    row), as the Loader's workers populate theirs."""
    import os

    path = tmp_path / "rows.h5"
    truth = sample((2048, 1024), "<f4")  # 8 MiB of 4 KiB rows
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=truth, chunks=(64, 1024))
    size = os.path.getsize(path)
    with multitables.Reader(str(path), n_procs=1) as reader:
        ds = reader.get_dataset("x")
        stage = ds.create_stage(2)
        np.testing.assert_array_equal(reader.request(ds[[1500, 3]], stage).get(), truth[[1500, 3]])
        pid = reader._pool.procs[0].pid
        deadline = time.monotonic() + 30
        while (mapped := _mapped_kib(pid, str(path))) < size // 1024 - 4:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    assert mapped >= size // 1024 - 4, (mapped, size // 1024)


def _mapped_kib(pid: int, path: str) -> int:
    """The kibibytes of ``path`` mapped in process ``pid`` (its maps' Rss)."""
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def test_a_map_is_populated_a_step_at_a_time_and_read_ahead_where_the_kernel_cannot(monkeypatch):
    """Each step is a call of its own, in order, over the whole map; once a call finds that the
    kernel cannot populate, the rest is left to one call (which reads it ahead instead)."""
    from multitables._hdf5 import rawread

    image = np.zeros(5 * rawread._POPULATE_STEP // 2, np.uint8)
    for works in (True, False):
        calls = []

        def populate(image, start=0, stop=-1, calls=calls, works=works):
            calls.append((start, stop))
            return works

        monkeypatch.setattr(rawread, "populate", populate)
        rawread._populate(image)
        step = rawread._POPULATE_STEP
        if works:
            assert calls == [(0, step), (step, 2 * step), (2 * step, 3 * step)]
        else:
            assert calls == [(0, step), (step, -1)]
