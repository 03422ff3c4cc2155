"""The worker-side parallel range reader: many (offset, size, destination) requests of one source
become few GETs (neighbours merged, large ranges split), several in flight, each writing its
bytes straight into the destinations."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from .._engine import hooks
from . import scratch
from .base import Source, as_writable

DEFAULT_MERGE_GAP = 64 << 10
DEFAULT_SPLIT_SIZE = 8 << 20
DEFAULT_IN_FLIGHT = 8
# How long ``Fetcher.prestart`` waits for its threads to start (threads busy with GETs of
# another fetch would hold up its tasks: then it gives up).
PRESTART_WAIT = 0.5


@dataclasses.dataclass
class Get:
    """One request to the source: fill ``segments`` from ``offset`` on. ``scatter`` is set for
    a merged range whose parts overlap: the body goes to one scratch buffer and is copied out
    to (view, position in the body) pairs. ``owners`` says which of the ranges given to ``plan``
    each segment (each scatter pair) writes, -1 for a gap between them."""

    offset: int
    segments: list[memoryview]
    scatter: list[tuple[memoryview, int]] | None = None
    owners: list[int] = dataclasses.field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments)


def plan(requests: Iterable[tuple[int, memoryview]], merge_gap: int, split_size: int) -> list[Get]:
    """The GETs that fill every (offset, view) of ``requests``: sorted by offset, neighbours
    closer than ``merge_gap`` bytes share one GET as long as it stays within ``split_size``
    (the bytes between them land in a scratch buffer and are dropped), and one range larger
    than ``split_size`` is cut into GETs of ``split_size``, each into its own slice of the
    destination.

    >>> views = [memoryview(bytearray(n)) for n in (10, 10, 30)]
    >>> [(g.offset, g.nbytes) for g in plan(zip((0, 15, 1000), views), 8, 1 << 20)]
    [(0, 25), (1000, 30)]
    >>> [(g.offset, g.nbytes) for g in plan([(0, memoryview(bytearray(25)))], 8, 10)]
    [(0, 10), (10, 10), (20, 5)]
    """
    todo = sorted(((off, v, n) for n, (off, v) in enumerate(requests) if v.nbytes),
                  key=lambda r: r[0])
    gets: list[Get] = []
    i = 0
    while i < len(todo):
        start, first, owner = todo[i]
        if first.nbytes > split_size:
            for a in range(0, first.nbytes, split_size):
                gets.append(Get(start + a, [first[a:a + split_size]], owners=[owner]))
            i += 1
            continue
        group = [todo[i]]
        end = start + first.nbytes
        i += 1
        while i < len(todo):
            off, v, _ = todo[i]
            new_end = max(end, off + v.nbytes)
            if off - end > merge_gap or new_end - start > split_size:
                break
            group.append(todo[i])
            end = new_end
            i += 1
        gets.append(_merged(group, start, end))
    return gets


def _merged(group: list[tuple[int, memoryview, int]], start: int, end: int) -> Get:
    overlapping = any(group[k][0] < group[k - 1][0] + group[k - 1][1].nbytes
                      for k in range(1, len(group)))
    if overlapping:
        # Rare (the same bytes wanted twice): one scratch body, copied to each destination.
        body = memoryview(bytearray(end - start))
        return Get(start, [body], [(v, off - start) for off, v, _ in group],
                   [owner for _, _, owner in group])
    gaps = [group[k][0] - (group[k - 1][0] + group[k - 1][1].nbytes)
            for k in range(1, len(group))]
    scratch = memoryview(bytearray(max(gaps, default=0)))
    segments, owners = [group[0][1]], [group[0][2]]
    for gap, (_, v, owner) in zip(gaps, group[1:], strict=True):
        if gap:
            segments.append(scratch[:gap])  # the same scratch for every gap: it is dropped
            owners.append(-1)
        segments.append(v)
        owners.append(owner)
    return Get(start, segments, owners=owners)


class Fetcher:
    """Reads many ranges of ``source`` at once: ``fetch([(offset, size, dest), ...])`` returns
    when every destination holds its bytes, or raises the first error once no GET is still
    writing into a destination.

    For a network source, up to ``max_in_flight`` GETs run at a time on a small thread pool
    made in the process that calls ``fetch`` (a forked child makes its own, as it makes its
    own connections). A local source reads inline (``preadv`` of merged neighbours).

    ``cache`` (a :class:`~multitables._sources.cache.ByteCache`) is asked first for each
    request, and given what was fetched. ``stats`` of the source count requests, bytes fetched
    and needed, retries and latencies; ``cache_hits``/``cache_bytes`` count what the cache gave.
    """

    def __init__(self, source: Source, *, max_in_flight: int | None = None,
                 merge_gap: int | None = None, split_size: int | None = None,
                 cache: Any = None) -> None:
        remote = source.remote
        self.source = source
        self.max_in_flight = max_in_flight or (DEFAULT_IN_FLIGHT if remote else 1)
        self.merge_gap = (DEFAULT_MERGE_GAP if remote else 0) if merge_gap is None else merge_gap
        self.split_size = split_size or (DEFAULT_SPLIT_SIZE if remote else 1 << 62)
        if self.max_in_flight < 1 or self.merge_gap < 0 or self.split_size < 1:
            raise ValueError("max_in_flight and split_size must be >= 1, merge_gap >= 0")
        self.cache = cache
        self.cache_hits = self.cache_bytes = 0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # The pool whose threads ``prestart`` last met, and how many.
        self._prestarted: tuple[Any, int] = (None, 0)
        self._pid = 0
        self._lock = threading.Lock()
        _live.add(self)

    def fetch(self, requests: Iterable[tuple[int, int, Any]],
              done: Callable[[int], None] | None = None) -> None:
        """Fill each ``dest`` (a writable buffer of at least ``size`` bytes) with the ``size``
        bytes at ``offset``.

        ``done(i)``, when given, is called once request ``i`` (counted in the order given) holds
        its bytes, from the thread whose GET completed it, while other GETs are still running:
        so a caller can use each range (decode a chunk) as it arrives. An exception it raises
        is the fetch's error, as a failed GET's is."""
        keep, gets, run = self._prepare(requests, done)
        if len(gets) <= 1 or self.max_in_flight == 1:
            for g in gets:
                run(g)
        else:
            self._run_parallel(gets, run)
        self._keep(keep)

    def start(self, requests: Iterable[tuple[int, int, Any]],
              done: Callable[[int], None] | None = None,
              end: Callable[[BaseException | None], None] | None = None) -> None:
        """``fetch`` that returns at once: the GETs run on the thread pool, ``done(i)`` as
        ``fetch`` calls it, then ``end(error)`` once, from the thread of the last GET to finish,
        once no GET writes into a destination any more: with None when every request holds its
        bytes, else with the first error (the GETs not yet begun are then skipped). A request
        found in the cache is ``done`` before ``start`` returns; ``start`` itself raises only
        for requests it cannot take (a destination too small, a range past the end)."""
        keep, gets, run = self._prepare(requests, done)
        _Started(self, keep, gets, run, end or _ignore).submit(self._executor())

    def _prepare(self, requests: Iterable[tuple[int, int, Any]],
                 done: Callable[[int], None] | None
                 ) -> tuple[list[tuple[int, memoryview]], list[Get], Callable[[Get], None]]:
        """The ranges to give the cache once every GET has run, the GETs, and what runs one
        GET. With ``done``, each range goes to the cache as it lands instead, before ``done``
        hands it over: its destination is then its owner's, to reuse."""
        todo: list[tuple[int, memoryview]] = []
        indices: list[int] = []  # of each ``todo`` entry among the requests
        needed = 0
        for i, (offset, size, dest) in enumerate(requests):
            view = as_writable(dest)
            if view.nbytes < size:
                raise ValueError(f"destination of {view.nbytes} bytes for {size} bytes at "
                                 f"{offset}")
            self.source.check_range(offset, size)
            needed += size
            view = view[:size]
            if self.cache is not None and size and \
                    self.cache.get_into(self.source.identity, offset, view):
                self.cache_hits += 1
                self.cache_bytes += size
                if done is not None:
                    done(i)
                continue
            if not size and done is not None:
                done(i)
                continue
            todo.append((offset, view))
            indices.append(i)
        self.source.stats.add(needed=needed)
        gets = plan(todo, self.merge_gap, self.split_size)
        if done is None:
            return todo, gets, self._run
        if self.cache is not None:
            done = _CachedFirst(self.cache, self.source.identity,
                                dict(zip(indices, todo, strict=True)), done)
        return [], gets, _Completion(todo, indices, gets, done, self._run)

    def _keep(self, todo: list[tuple[int, memoryview]]) -> None:
        """What was fetched, given to the cache."""
        if self.cache is not None:
            for offset, view in todo:
                self.cache.put(self.source.identity, offset, view)

    def _run(self, g: Get, landed: Callable[[int], None] | None = None) -> None:
        if landed is None:
            self.source.read_segments(g.offset, g.segments)
        else:
            self.source.read_segments(g.offset, g.segments, landed)
        if g.scatter is not None:
            body = g.segments[0]
            for view, at in g.scatter:
                view[:] = body[at:at + view.nbytes]

    def _run_parallel(self, gets: list[Get], run: Callable[[Get], None]) -> None:
        pool = self._executor()
        # Largest first, so that one big GET does not start last and finish alone.
        futures = [pool.submit(run, g) for g in sorted(gets, key=lambda g: -g.nbytes)]
        error: BaseException | None = None
        for f in futures:
            try:
                f.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the others
                if error is None:
                    error = e
                    for other in futures:
                        other.cancel()
        # Every future is done or cancelled here: no thread still writes into a destination.
        if error is not None:
            raise error

    def prestart(self, n: int) -> None:
        """Start ``n`` of the thread pool's threads now (at most ``max_in_flight``). The pool
        starts one when a GET finds none idle, and ``Thread.start`` waits for the new thread
        to run: behind fetch threads busy reading and decoding, a GIL switch interval (5 ms)
        each. A process about to start many GETs at once (a worker at a job's start) starts
        its threads first, while it is idle.

        A pool's threads run until it is closed: once ``n`` have met here, a later call for
        no more than ``n`` (a kept fetcher's next job) returns at once. Meeting them again
        woke every idle thread in turn, 1.5-4.5 ms before a job's first GET on 2 busy cores."""
        n = min(n, self.max_in_flight)
        if n < 1 or not self.source.remote:
            return
        pool = self._executor()
        started_pool, started = self._prestarted
        if started_pool is pool and started >= n:
            return
        # Each task holds its thread until all have one, so that each submit starts a thread.
        everyone = threading.Barrier(n + 1)
        for _ in range(n):
            pool.submit(_meet, everyone)
        if _meet(everyone):
            self._prestarted = (pool, n)

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.max_in_flight, thread_name_prefix="multitables-fetch")
                self._pid = os.getpid()
            return self._pool

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        self._pool = None  # its threads stayed in the parent

    def close(self) -> None:
        """Stop the thread pool (idempotent); the source stays open."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            pool.shutdown(wait=True)

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Completion:
    """Runs the GETs of one fetch and calls ``done(i)`` for each request once every segment
    that writes it holds its bytes (a request larger than the split size takes several GETs):
    as each segment lands, while the rest of its GET's body is still coming, so that a caller
    decodes a chunk while the next ones arrive."""

    def __init__(self, todo: list[tuple[int, memoryview]], indices: list[int], gets: list[Get],
                 done: Callable[[int], None], run: Callable[..., None]) -> None:
        self._done, self._run, self._indices = done, run, indices
        self._lock = threading.Lock()
        self._pending = [0] * len(todo)  # segments of each request not yet in
        for g in gets:
            for k in g.owners:
                if k >= 0:
                    self._pending[k] += 1

    def __call__(self, g: Get) -> None:
        if g.scatter is None:
            self._run(g, lambda s: self._landed(g.owners[s]))
        else:  # the destinations are written after the body: all at the end
            self._run(g)
            for k in g.owners:
                self._landed(k)

    def _landed(self, k: int) -> None:
        if k < 0:
            return  # a gap
        with self._lock:
            self._pending[k] -= 1
            finished = not self._pending[k]
        if finished:
            self._done(self._indices[k])


class _CachedFirst:
    """``done(i)`` after request ``i``'s bytes went to the cache."""

    def __init__(self, cache: Any, identity: tuple, ranges: dict[int, tuple[int, memoryview]],
                 done: Callable[[int], None]) -> None:
        self._cache, self._identity, self._ranges, self._done = cache, identity, ranges, done

    def __call__(self, i: int) -> None:
        offset, view = self._ranges[i]
        self._cache.put(self._identity, offset, view)
        self._done(i)


class _Started:
    """The GETs of one ``Fetcher.start``, each a task of the fetcher's pool; the last to finish
    gives the fetched ranges to the cache and calls ``end``."""

    def __init__(self, fetcher: Fetcher, todo: list[tuple[int, memoryview]], gets: list[Get],
                 run: Callable[[Get], None], end: Callable[[BaseException | None], None]):
        self._fetcher, self._todo, self._run, self._end = fetcher, todo, run, end
        self._gets = sorted(gets, key=lambda g: -g.nbytes)  # largest first, as fetch does
        self._left = len(gets)
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def submit(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        if not self._gets:
            self._finish()
        for k, g in enumerate(self._gets):
            try:
                pool.submit(self._one, g)
            except BaseException as e:  # noqa: BLE001 - no thread to start: handed to ``end``
                # The GETs submitted run on; those not are over, failed: ``end`` comes once,
                # after the last that runs.
                with self._lock:
                    if self._error is None:
                        self._error = e
                    self._left -= len(self._gets) - k
                    last = not self._left
                if last:
                    self._finish()
                return

    def _one(self, g: Get) -> None:
        try:
            if self._error is None:  # after an error, the GETs not yet begun are skipped
                self._run(g)
        except BaseException as e:  # noqa: BLE001 - handed to ``end``
            with self._lock:
                if self._error is None:
                    self._error = e
        with self._lock:
            self._left -= 1
            last = not self._left
        if last:
            self._finish()

    def _finish(self) -> None:
        error = self._error
        if error is None:
            try:
                self._fetcher._keep(self._todo)
            except BaseException as e:  # noqa: BLE001 - handed to ``end``
                error = e
        self._end(error)


def _ignore(error: BaseException | None) -> None:
    pass


def _meet(barrier: threading.Barrier) -> bool:
    """Whether everyone met; False when a thread was slow to start (the others go on)."""
    try:
        barrier.wait(PRESTART_WAIT)
    except threading.BrokenBarrierError:
        return False
    return True


_live: weakref.WeakSet[Fetcher] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for f in list(_live):
        f._after_fork_in_child()
    scratch.SCRATCH._after_fork_in_child()


hooks.on_fork("fetchers", after_in_child=_after_fork_in_child)
