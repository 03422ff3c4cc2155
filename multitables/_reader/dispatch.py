"""The Reader's side of its workers (internal): the control memory, the choice of a worker for
each request, and the messages that map and drop stage memory in them.

See ``control`` for the memory's layout and ``job`` for the workers' side.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import Any

from .._engine import timeouts
from .._engine._ringbuf import Counter, SlotQueue, Word
from .._engine.errbox import ErrorBox
from .._engine.pool import Crew, StandbyWorkers
from .._engine.shm import SharedArena
from .._hdf5.source import FileRef
from . import control
from .control import NOTICE, encode_item
from .job import RequestJob
from .memory import MemoryKeeper
from .readspec import ReadSpec, put_wire
from .stages import IDLE, PENDING, Stage

# A sleeping worker is woken for a request once the awake ones have each had a request pending
# this long, and only where a request costs a worker more than WAKE_RATIO times what it costs
# the caller: else the caller is what limits the pace, and on a machine whose cores the caller
# and one worker keep busy, a second worker only takes CPU from them (bench/README.md, "The
# Reader's waits").
WAKE_AFTER = 1e-3
WAKE_RATIO = 1.5
# The costs are running means over about this many requests (an exponential average) ...
PACE_WEIGHT = 1 / 16
# ... of gaps between requests of at most this long (a pause between epochs is no one's cost).
PACE_GAP = 10e-3
QUEUE_FULL_WAIT = 1e-4
# A Reader starts its first worker with its first request, and another only once every started
# one has had a request pending for this many times what the first took to start (a fork, the
# file opened): a second worker costs its start-up and its own first touches of the file's
# pages, which a loop whose requests come back in microseconds never earns back (bench/README.md,
# "The caller's CPU, the default n_procs and cold starts"). A multiple, not one start-up: a
# worker that lost its core for a while on a busy machine delays a request by about that much.
START_AFTER = 3


class Dispatcher:
    """Hands a Reader's requests to its workers: the first started with the first request, the
    others as the started ones fall behind (``worth_starting``).

    Made anew in each process (a forked copy of a Reader starts workers of its own). The caller
    holds the Reader's lock around ``dispatch`` and ``stop``; ``check`` is the Reader's own
    check, which raises once the Reader closed or its workers failed (and then closes it), for
    the waits here to call between their slices.
    """

    def __init__(self, filename: FileRef, file_kwargs: dict[str, Any], n_procs: int,
                 start_method: str | None, memory: MemoryKeeper, check: Callable[[], None]):
        self.filename = filename
        self.file_kwargs = file_kwargs
        self.n_procs = n_procs
        self.start_method = start_method
        self.memory = memory
        self.check = check
        self.workers: StandbyWorkers | None = None
        self.pool: Crew | None = None
        self.started = 0  # workers of the crew: the first ``started`` of the n_procs queues
        self.started_ns = 0  # when the first worker was started (time.monotonic_ns)
        self.start_cost: float | None = None  # seconds it took to be ready, once known
        self.arena: SharedArena | None = None
        self.errors: ErrorBox | None = None
        self.done: list[Counter] = []
        self.queues: list[SlotQueue] = []
        self.spinner: Word | None = None
        self.sent_at: list[collections.deque[float]] = []  # of each request pending
        self.finished: list[int] = []  # each worker's count of finished requests, last seen
        self.next_check = 0.0
        # What a request costs the caller (the time between its requests, less the time it
        # waited for results: ``waited``) and a worker (their busy counters), running means.
        self.busy: list[Counter] = []
        self.ready: list[Counter] = []  # when each worker became ready (control.ready_stamp)
        self.caller_cost = 0.0
        self.worker_cost: float | None = None
        self.last_sent = 0.0
        self.waited = 0.0  # seconds the caller waited for results since its last request
        self.seen = (0, 0)  # finished requests, their busy nanoseconds: at the last update

    def dispatch(self, stage: Stage, specs: Sequence[ReadSpec]) -> None:
        """Hand the read (or its parts, one per worker) to workers: written into the stage's
        header, the stage pushed onto the worker's queue (``pick_worker``). See NOTE [ Worker
        shutdown logic ], step (3): every send and push waits in slices and gives up once a
        worker dies or the Reader closes."""
        parts = len(specs)
        if self.pool is None:
            self.pool = self._start()
        elif time.monotonic() > self.next_check:
            self.check()  # a dead worker among live ones never times a wait out
        several = self.n_procs > 1  # else there is no choice to make, nor to keep track of
        if parts == 1:
            if several:
                busy = self.pending()
                self._pace()
                workers = [self._start_one() if self.started < self.n_procs
                           and self.worth_starting(busy) else self.pick_worker(busy)]
            else:
                workers = [0]
        else:
            while self.started < parts:  # a large read: it is worth every worker it is split over
                self._start_one()
            busy = self.pending()
            workers = sorted(range(self.started), key=busy.__getitem__)[:parts]
            stage.memory.parts_done.store(0)
            stage.memory.parts_failed.store(0)
        dropped = self.memory.dropped
        while dropped:
            memory_id, holders = dropped.pop()
            for w in holders:
                self._tell(w, ("drop", memory_id))
        memory = stage.memory
        for worker in workers:
            if worker not in memory.sent_to:
                self._tell(worker, ("map", memory.id, memory.arena))
                memory.sent_to.add(worker)
        if parts == 1 and put_wire(specs[0], memory):
            worker = workers[0]  # the commonest: one request, in the header
            memory.state.set(PENDING)
            try:
                self._push(worker, encode_item(memory.id, 0, 1))
            except BaseException:
                memory.state.set(IDLE)  # no worker has it: the stage is free again
                raise
            if several:
                self.sent_at[worker].append(time.monotonic())
            return
        memory.state.set(PENDING)
        part = 0
        try:
            for part, (worker, spec) in enumerate(zip(workers, specs, strict=True)):
                if put_wire(spec, memory, part, parts):
                    self._push(worker, encode_item(memory.id, part, parts))
                else:
                    self._tell(worker, ("read", memory.id, spec, part, parts))
                if several:
                    self.sent_at[worker].append(time.monotonic())
        except BaseException:
            if part == 0:  # no worker has any of it: the stage is free again
                memory.state.set(IDLE)
            raise

    def pending(self) -> list[int]:
        """The requests each started worker has not finished."""
        busy = []
        for w in range(self.started):
            sent_at, finished = self.sent_at[w], self.done[w].load()
            for _ in range(finished - self.finished[w]):
                sent_at.popleft()
            self.finished[w] = finished
            busy.append(len(sent_at))
        return busy

    def _pace(self) -> None:
        """Update the running means of what a request costs the caller and a worker."""
        now = time.monotonic()
        gap = max(min(now - self.last_sent, PACE_GAP) - self.waited, 0.0)
        if not self.last_sent:
            pass  # the first request: no gap yet
        elif not self.caller_cost:
            self.caller_cost = gap
        else:
            self.caller_cost += (gap - self.caller_cost) * PACE_WEIGHT
        self.last_sent, self.waited = now, 0.0
        finished = sum(self.finished)
        if finished - self.seen[0] >= 8:  # a few at a time: a read of the counters costs too
            busy_ns = sum(counter.load() for counter in self.busy)
            cost = (busy_ns - self.seen[1]) * 1e-9 / (finished - self.seen[0])
            self.seen = (finished, busy_ns)
            self.worker_cost = cost if self.worker_cost is None else (
                self.worker_cost + (cost - self.worker_cost) * 8 * PACE_WEIGHT)

    def worth_waking(self) -> bool:
        """Whether a second worker can raise the pace: a request costs a worker more than it
        costs the caller, by WAKE_RATIO (not known before the first few requests are done: a
        second worker woken needlessly at a cold start maps the file too, at a cost)."""
        return self.worker_cost is not None and self.worker_cost > WAKE_RATIO * self.caller_cost

    def worth_starting(self, busy: list[int]) -> bool:
        """Whether to start one more worker for the next request: every started one has a
        request pending for START_AFTER times what the first took to start, so that a new one
        would have served the next sooner (a caller with one request at a time never starts
        one: there is nothing a second worker could do meanwhile). A worker's CPU per request
        does not decide it, as it does a wake-up (``worth_waking``): the reads of a file in an
        object store wait on the network, and a first pass's requests cost a worker its first
        touches of the file's pages, which a new worker would pay again."""
        if not all(busy) or (start_cost := self._start_cost()) is None:
            return False
        # The latest of the workers' oldest requests: every one has waited at least this long.
        sent = max(self.sent_at[w][0] for w in range(self.started))
        return time.monotonic() - sent > START_AFTER * max(start_cost, WAKE_AFTER)

    def _start_cost(self) -> float | None:
        """What starting the first worker took, from the fork to its file open (once known)."""
        if self.start_cost is None and self.ready:
            ready = self.ready[0].load()
            if ready:
                self.start_cost = max(ready - self.started_ns, 0) * 1e-9
        return self.start_cost

    def pick_worker(self, busy: list[int]) -> int:
        """The worker for the next request: an awake one (it has requests pending, or it is
        watching its queue), unless the oldest it has pending was sent WAKE_AFTER ago (a slow
        read: the next request should not wait behind it); then the least busy. Waking a
        sleeping worker costs both processes CPU time (bench/README.md, "The Reader's
        waits"), and on a machine whose cores the caller and one worker keep busy a second
        worker only takes CPU from them: it is woken when the awake ones fall behind and a
        request costs a worker more than the caller (``worth_waking``). Until then one worker
        serves, even where another is awake."""
        watching = self.spinner.load() - 1 if self.spinner is not None else -1
        awake = [w for w, pending in enumerate(busy) if pending or w == watching]
        if awake:
            if self.worth_waking():
                worker = min(awake, key=busy.__getitem__)
            else:
                # The caller sets the pace: one worker serves, the one that has requests
                # (another that watches its queue would take a core the caller and it need).
                worker = next((w for w in awake if busy[w]), awake[0])
            if not busy[worker] or time.monotonic() - self.sent_at[worker][0] < WAKE_AFTER:
                return worker
        return busy.index(min(busy))

    def _tell(self, worker: int, message) -> None:
        """Announce ``message`` with a NOTICE, and send it down the worker's channel."""
        pool = self.pool
        assert pool is not None
        self._push(worker, NOTICE)
        try:
            # Between the slices of a send the worker does not take: the Reader's check.
            pool.send(worker, message, self.check)
        except OSError:
            self.check()  # a dead worker closed its end: say which one
            raise

    def _push(self, worker: int, item: int) -> None:
        """Queue ``item`` for ``worker``; a full queue (QUEUE_ITEMS pending) is waited on."""
        queue = self.queues[worker]
        while True:
            try:
                return queue.push(item)
            except OverflowError:
                self.check()
                time.sleep(QUEUE_FULL_WAIT)

    def _start(self) -> Crew:
        """The control memory of ``n_procs`` workers, and the first worker (started now, or
        standing by) on this Reader's one job; the others start as they are worth it
        (``worth_starting``)."""
        n = self.n_procs
        self.arena = SharedArena(control.nbytes(n), name="multitables-reader")
        buffer = self.arena.buffer
        self.spinner = control.spinner(buffer)
        self.done = [control.done_counter(buffer, w) for w in range(n)]
        self.ready = [control.ready_stamp(buffer, w) for w in range(n)]
        self.busy = [control.busy_counter(buffer, w) for w in range(n)]
        self.queues = [control.work_queue(buffer, w, True) for w in range(n)]
        self.errors = control.error_box(buffer, n)
        self.sent_at = [collections.deque() for _ in range(n)]
        self.finished = [0] * n
        if self.workers is None:
            self.workers = StandbyWorkers(self.start_method, "Reader", niceness=0)
        self.started_ns = time.monotonic_ns()
        crew = self.workers.run(self._job(0), 1)
        self.started = 1
        return crew

    def _job(self, worker: int) -> RequestJob:
        assert self.arena is not None
        return RequestJob(self.filename, self.file_kwargs, self.n_procs, self.arena, worker)

    def _start_one(self) -> int:
        """Start the next worker (see NOTE [ Worker shutdown logic ], step (1)); its index."""
        assert self.pool is not None
        self.pool.add(self._job(self.started))
        self.started += 1
        return self.started - 1

    def raise_failure(self) -> None:
        """Raise the workers' failure, if any: a worker's own error, or a worker that died."""
        if self.errors is not None and self.errors.full():
            raise self.errors.exception()
        self.next_check = time.monotonic() + timeouts.CHECK_INTERVAL
        if self.pool is not None:
            self.pool.check()

    def stop(self, wait: bool) -> None:
        """Stop the workers: they may finish their current reads with ``wait`` (up to
        JOIN_TIMEOUT), else any still busy after STOP_GRACE are killed. See NOTE [ Worker
        shutdown logic ], steps (4), (5)."""
        if self.pool is not None:
            for worker in range(self.n_procs):  # no local left to view the arena below
                self.queues[worker].close()  # the worker ends its job once it is drained
            self.pool.end()
            self.pool.stop(join_timeout=timeouts.JOIN_TIMEOUT if wait else timeouts.STOP_GRACE)
            self.pool = None
        if self.workers is not None:
            self.workers.close()
            self.workers = None
        if self.arena is not None:
            # Drop the views first: a mapping with views left lives as long as this object.
            self.done, self.busy, self.queues, self.errors = [], [], [], None
            self.ready = []
            self.spinner = None
            self.arena.close()
