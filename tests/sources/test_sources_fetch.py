"""The parallel range fetcher: neighbours merged, large ranges split (request counts asserted),
several GETs in flight, the bytes straight into the destinations, errors after every GET ends."""

from __future__ import annotations

import multiprocessing
import threading
import time

import numpy as np
import pytest
from conftest import BLOB_NAME

from multitables._sources import open_source
from multitables._sources.cache import ByteCache
from multitables._sources.fetch import Fetcher, plan
from multitables.errors import ObjectChangedError


def requests_of(blob_len, spec):
    """(offset, size, destination) for each (offset, size) of ``spec``."""
    return [(off, n, np.zeros(n, np.uint8)) for off, n in spec]


def check(reqs, blob):
    for off, n, dest in reqs:
        assert dest.tobytes() == blob[off:off + n], (off, n)


def test_neighbours_merge_into_one_get(http, blob):
    # 50 ranges of 1000 bytes, 500 bytes apart (under the gap): one GET; then one far away.
    spec = [(10_000 + i * 1500, 1000) for i in range(50)] + [(2_000_000, 10)]
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(merge_gap=1000) as f:
        reqs = requests_of(len(blob), spec)
        f.fetch(reqs)
        check(reqs, blob)
        assert src.stats.requests == 1 + 2
        assert src.stats.bytes_needed == 50_010
        assert src.stats.bytes_fetched == 1 + 50 * 1000 + 49 * 500 + 10
    gets = [r for m, _, r, _ in http.log[1:]]
    assert sorted(gets) == ["bytes=10000-84499", "bytes=2000000-2000009"]


def test_gap_over_the_limit_is_not_merged(http, blob):
    spec = [(0, 100), (100 + 64 * 1024 + 1, 100)]
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher() as f:
        f.fetch(requests_of(len(blob), spec))
        assert src.stats.requests == 1 + 2


def test_large_range_is_split(http, blob):
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(split_size=1 << 20) as f:
        reqs = requests_of(len(blob), [(7, 2_500_000)])
        f.fetch(reqs)
        check(reqs, blob)
        assert src.stats.requests == 1 + 3
        assert src.stats.bytes_fetched == 1 + 2_500_000


def test_merging_stops_at_the_split_size(http, blob):
    spec = [(i * 100_000, 90_000) for i in range(25)]  # 10 KB gaps, 2.5 MB in all
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(split_size=1 << 20) as f:
        reqs = requests_of(len(blob), spec)
        f.fetch(reqs)
        check(reqs, blob)
        assert src.stats.requests == 1 + 3  # 10 + 10 + 5 ranges


def test_overlapping_and_repeated_ranges(http, blob):
    spec = [(100, 50), (120, 50), (100, 50), (1000, 1), (0, 0)]
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher() as f:
        reqs = requests_of(len(blob), spec)
        f.fetch(reqs)
        check(reqs, blob)
        assert src.stats.requests == 1 + 1


def test_gets_run_in_parallel(http_factory, blob):
    srv = http_factory(latency=0.1)
    spec = [(i * 300_000, 1000) for i in range(8)]  # far apart: 8 GETs
    with open_source(srv.url(BLOB_NAME)) as src, src.fetcher(max_in_flight=8) as f:
        reqs = requests_of(len(blob), spec)
        t0 = time.monotonic()
        f.fetch(reqs)
        elapsed = time.monotonic() - t0
        check(reqs, blob)
        assert src.stats.requests == 1 + 8
        assert elapsed < 0.1 * 8 / 2, elapsed  # serial would take 0.8 s


def test_faults_and_parallel_gets_give_identical_bytes(http_factory, blob):
    srv = http_factory(p503=0.05, preset=0.05, pshort=0.05, seed=7)
    rng = np.random.default_rng(0)
    offsets = np.sort(rng.choice(len(blob) - 20_000, 200, replace=False))
    spec = [(int(o), int(rng.integers(1, 20_000))) for o in offsets]
    with open_source(srv.url(BLOB_NAME), {"retries": 10}) as src, \
            src.fetcher(merge_gap=2000, split_size=256 << 10, max_in_flight=4) as f:
        reqs = requests_of(len(blob), spec)
        f.fetch(reqs)
        check(reqs, blob)


def test_an_error_raises_after_every_get_ends(http, blob):
    src = open_source(http.url(BLOB_NAME))
    http.replace(BLOB_NAME, blob[::-1])
    with src.fetcher(max_in_flight=4) as f:
        reqs = requests_of(len(blob), [(i * 200_000, 10) for i in range(10)])
        with pytest.raises(ObjectChangedError):
            f.fetch(reqs)
    src.close()


def _first_get_fails(src) -> list[int]:
    """Make ``src``'s GET at offset 0 fail at once and the others take 50 ms; the offsets of
    the GETs running, as they run."""
    running: list[int] = []
    read = src.read_segments

    def slow_or_failing(offset, segments):
        running.append(offset)
        try:
            if offset == 0:
                raise ConnectionAbortedError("the first GET fails at once")
            time.sleep(0.05)
            read(offset, segments)
        finally:
            running.remove(offset)

    src.read_segments = slow_or_failing
    return running


def test_no_get_still_writes_when_fetch_raises(http, blob):
    src = open_source(http.url(BLOB_NAME))
    running = _first_get_fails(src)
    with src.fetcher(max_in_flight=4) as f:
        with pytest.raises(ConnectionAbortedError):
            f.fetch(requests_of(len(blob), [(i * 200_000, 10) for i in range(10)]))
        assert running == []
    src.close()


def test_local_source_reads_inline(source_dir, blob):
    with open_source(str(source_dir[0] / BLOB_NAME)) as src, src.fetcher() as f:
        reqs = requests_of(len(blob), [(0, 10), (10, 10), (30, 10), (100_000, 5)])
        f.fetch(reqs)
        check(reqs, blob)
        assert f._pool is None and src.stats.requests == 3  # adjacent ranges: one preadv


def test_destination_checks(http, blob):
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher() as f:
        with pytest.raises(ValueError, match="destination of 5 bytes for 10 bytes"):
            f.fetch([(0, 10, bytearray(5))])
        with pytest.raises(ValueError, match="outside"):
            f.fetch([(len(blob) - 5, 10, bytearray(10))])
        with pytest.raises(TypeError, match="read-only"):
            f.fetch([(0, 3, b"abc")])


def test_second_epoch_from_the_disk_cache(http, blob, tmp_path):
    cache = ByteCache(tmp_path / "cache", 1 << 20)
    spec = [(i * 100_000, 4000) for i in range(20)]  # gaps over 64 KiB
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(cache=cache) as f:
        f.fetch(requests_of(len(blob), spec))
        assert src.stats.requests == 1 + 20
        reqs = requests_of(len(blob), spec)
        f.fetch(reqs)
        check(reqs, blob)
        assert src.stats.requests == 1 + 20 and f.cache_hits == 20


@pytest.mark.parametrize("split", [1 << 20, 700])
def test_done_is_called_once_per_request_when_its_bytes_are_in(http, blob, tmp_path, split):
    # Merged neighbours, a range split over several GETs (split 700), an overlap, an empty
    # range and (second fetch) cache hits: each index once, its bytes already in place.
    spec = [(10_000 + i * 1500, 1000) for i in range(20)] + [(2_000_000, 3000), (5, 0),
                                                             (10_500, 800), (900_000, 10)]
    with open_source(http.url(BLOB_NAME)) as src, \
            src.fetcher(merge_gap=1000, split_size=split,
                        cache=ByteCache(str(tmp_path / "c"), 1 << 20)) as f:
        for _ in range(2):
            reqs = requests_of(len(blob), spec)
            seen: list[int] = []

            def done(i, reqs=reqs, seen=seen):
                off, n, dest = reqs[i]
                assert dest.tobytes() == blob[off:off + n], (off, n)
                seen.append(i)

            f.fetch(reqs, done)
            assert sorted(seen) == list(range(len(spec)))
            check(reqs, blob)


def test_an_error_in_done_is_the_fetch_error(http, blob):
    def done(i):
        raise KeyError("decoder")

    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(merge_gap=0) as f, \
            pytest.raises(KeyError, match="decoder"):
        f.fetch(requests_of(len(blob), [(0, 10), (500_000, 10)]), done)


def test_plan_keeps_views_in_place():
    buf = bytearray(30)
    views = [memoryview(buf)[0:10], memoryview(buf)[10:30]]
    (g,) = plan([(100, views[0]), (115, views[1])], merge_gap=5, split_size=1 << 20)
    assert g.offset == 100 and g.nbytes == 35 and g.scatter is None
    assert [s.nbytes for s in g.segments] == [10, 5, 20]
    assert g.segments[0].obj is buf and g.segments[2].obj is buf  # no staging copy


def test_fetcher_rejects_bad_settings(http):
    with open_source(http.url(BLOB_NAME)) as src:
        with pytest.raises(ValueError):
            Fetcher(src, merge_gap=-1)


def _child_fetches(fetcher, spec, conn):
    reqs = requests_of(0, spec)
    fetcher.fetch(reqs)
    conn.send([dest.tobytes() for _, _, dest in reqs])
    fetcher.close()
    fetcher.source.close()


def test_fetcher_after_fork_makes_its_own_threads_and_connections(http, blob):
    spec = [(i * 300_000, 100) for i in range(6)]
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(max_in_flight=3) as f:
        f.fetch(requests_of(len(blob), spec))  # the parent's pool and connections exist
        ctx = multiprocessing.get_context("fork")
        here, there = ctx.Pipe()
        p = ctx.Process(target=_child_fetches, args=(f, spec, there))
        p.start()
        assert here.poll(10), "the child did not answer"
        assert here.recv() == [blob[o:o + n] for o, n in spec]
        p.join(10)
        here.close(), there.close()
        reqs = requests_of(len(blob), spec)
        f.fetch(reqs)  # the parent's still work
        check(reqs, blob)


class _Ended:
    """``end`` of a ``Fetcher.start``: what it was called with, and a wait for it."""

    def __init__(self):
        self.calls: list[BaseException | None] = []
        self.event = threading.Event()

    def __call__(self, error):
        self.calls.append(error)
        self.event.set()

    def wait(self):
        assert self.event.wait(10), "end was never called"
        time.sleep(0.01)  # a second call would come now
        assert len(self.calls) == 1, self.calls
        return self.calls[0]


def test_start_returns_at_once_and_ends_once_every_request_is_in(http, blob, tmp_path):
    # Merged neighbours, a split range, an empty one: done(i) once each, then end(None) once,
    # after the last; the second start finds everything in the cache and ends before returning.
    spec = [(10_000 + i * 1500, 1000) for i in range(20)] + [(2_000_000, 3000), (5, 0),
                                                             (900_000, 10)]
    src = open_source(http.url(BLOB_NAME))
    gate, read = threading.Event(), src.read_segments

    def gated(offset, segments, *landed):  # no GET ends before start has returned
        assert gate.wait(10)
        read(offset, segments, *landed)

    src.read_segments = gated
    with src, src.fetcher(merge_gap=1000, split_size=700,
                          cache=ByteCache(str(tmp_path / "c"), 1 << 20)) as f:
        for cached in (False, True):
            reqs = requests_of(len(blob), spec)
            seen: list[int] = []
            ended = _Ended()

            def end(error, seen=seen, ended=ended):
                assert sorted(seen) == list(range(len(spec)))
                ended(error)

            gate.clear()
            f.start(reqs, seen.append, end)
            assert ended.event.is_set() == cached
            gate.set()
            assert ended.wait() is None
            check(reqs, blob)
            assert f.cache_hits == (len(spec) - 1 if cached else 0)  # the empty one aside


def test_start_ends_with_the_first_error_once_no_get_writes(http, blob):
    src = open_source(http.url(BLOB_NAME))
    running = _first_get_fails(src)
    with src.fetcher(max_in_flight=4, merge_gap=0) as f:
        ended = _Ended()
        f.start(requests_of(len(blob), [(i * 200_000, 10) for i in range(10)]), None,
                lambda error: ended((error, list(running))))
        error, still_running = ended.wait()
        assert isinstance(error, ConnectionAbortedError) and still_running == []
    src.close()


def test_start_ends_once_when_a_thread_cannot_be_started(http, blob, monkeypatch):
    """A submit that raised (no thread to start) left the GETs after it uncounted: ``end``
    never came, and a worker waiting for its reads waited for ever."""
    import concurrent.futures

    real = concurrent.futures.ThreadPoolExecutor.submit
    submitted = []

    def second_fails(self, fn, *args):
        submitted.append(fn)
        if len(submitted) == 2:
            raise RuntimeError("can't start new thread")
        return real(self, fn, *args)

    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(merge_gap=0) as f:
        monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", second_fails)
        ended, calls = _Ended(), []
        reqs = requests_of(len(blob), [(i * 200_000, 10) for i in range(4)])
        f.start(reqs, None, lambda error: (calls.append(error), ended(error)))
        error = ended.wait()
        assert isinstance(error, RuntimeError) and "new thread" in str(error)
        time.sleep(0.2)
        assert len(calls) == 1 and len(submitted) == 2


def test_start_ends_with_an_error_raised_by_done(http, blob):
    def done(i):
        raise KeyError("decoder")

    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(merge_gap=0) as f:
        ended = _Ended()
        f.start(requests_of(len(blob), [(0, 10), (500_000, 10)]), done, ended)
        assert isinstance(ended.wait(), KeyError)


def test_done_comes_as_each_range_lands_while_its_get_still_runs(http, blob):
    # Two neighbours in one GET: the first is done before the GET reads the second's bytes.
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher() as f:
        reqs = requests_of(len(blob), [(1000, 5000), (6000, 500_000)])
        seen = []

        def done(i):
            if i == 0:
                assert not reqs[1][2].any()  # not read yet
            seen.append(i)

        f.fetch(reqs, done)
        assert seen == [0, 1] and src.stats.requests == 1 + 1
        check(reqs, blob)


def test_a_retried_get_never_writes_again_into_a_range_already_done(http, blob, monkeypatch):
    # Once done(i), a destination is its owner's (a slot handed over, then reused): the retry
    # of a GET cut after it landed reads those bytes again into scratch, not into it.
    from multitables._sources import transport

    real_read, cut = transport.Transport._read, []

    def cut_once(self, resp, segments, length, deadline, landed=None):
        if not cut and landed is not None:
            cut.append(1)
            real_read(self, resp, segments[:1], segments[0].nbytes, deadline, landed)
            raise transport.Retry("cut after the first range")
        real_read(self, resp, segments, length, deadline, landed)

    monkeypatch.setattr(transport.Transport, "_read", cut_once)
    with open_source(http.url(BLOB_NAME), {"retries": 2}) as src, src.fetcher() as f:
        reqs = requests_of(len(blob), [(1000, 5000), (6000, 50_000)])

        def done(i):
            if i == 0:
                reqs[0][2][:] = 7  # its owner writes it

        f.fetch(reqs, done)
        assert cut and src.stats.retries == 1
        assert (reqs[0][2] == 7).all()
        assert reqs[1][2].tobytes() == blob[6000:56_000]


@pytest.mark.parametrize("started", [False, True])
def test_the_cache_keeps_a_range_before_done_hands_it_over(http, blob, tmp_path, started):
    # After done(i) the destination is its owner's (a slot the consumer reuses at once): what
    # the cache keeps must be the fetched bytes, not what the owner writes there next.
    spec = [(i * 100_000, 4000) for i in range(6)]
    with open_source(http.url(BLOB_NAME)) as src, \
            src.fetcher(cache=ByteCache(str(tmp_path / "c"), 1 << 20)) as f:
        reqs = requests_of(len(blob), spec)

        def reuse(i):
            reqs[i][2][:] = 0xEE

        if started:
            ended = _Ended()
            f.start(reqs, reuse, ended)
            assert ended.wait() is None
        else:
            f.fetch(reqs, reuse)
        again = requests_of(len(blob), spec)
        f.fetch(again)
        assert f.cache_hits == len(spec)
        check(again, blob)


def test_prestart_starts_the_threads_before_the_gets(http, blob):
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(max_in_flight=6) as f:
        f.prestart(4)
        assert f._pool is not None and len(f._pool._threads) == 4
        f.prestart(10)  # no more than max_in_flight; the idle ones are used first
        assert len(f._pool._threads) == 6
        reqs = requests_of(len(blob), [(i * 300_000, 100) for i in range(6)])
        f.fetch(reqs)
        check(reqs, blob)
        assert len(f._pool._threads) == 6
    with open_source(str(http.root / BLOB_NAME)) as local, local.fetcher() as f:
        f.prestart(4)  # a local source reads inline: no threads
        assert f._pool is None


def test_prestart_again_wakes_no_thread_once_they_have_met(http, blob, monkeypatch):
    with open_source(http.url(BLOB_NAME)) as src, src.fetcher(max_in_flight=6) as f:
        f.prestart(4)
        pool = f._pool
        submitted = []
        submit = pool.submit
        monkeypatch.setattr(pool, "submit", lambda *a, **k: submitted.append(a) or submit(*a, **k))
        f.prestart(4)  # a kept fetcher's next job: its threads run already
        f.prestart(2)
        assert submitted == []
        f.prestart(6)  # more than met before: they meet again
        assert len(submitted) == 6 and len(pool._threads) == 6
        f.prestart(5)
        assert len(submitted) == 6
        reqs = requests_of(len(blob), [(i * 300_000, 100) for i in range(6)])
        f.fetch(reqs)
        check(reqs, blob)
