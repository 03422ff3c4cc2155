"""The pool of worker processes of every front door: how they start, stand by, run jobs, fail and
stop (internal).

One pool (``StandbyWorkers``), one job protocol (``worker.Job``), one way to pass messages and
shared memory (``channel.Channel``), one set of timeouts (``timeouts``), one registry of process
hooks (``hooks``), for the Streamer, the Reader and the Loader alike.

NOTE [ Worker shutdown logic ]
==============================
::

    front door (consumer)                          worker process (one per channel)
    ─────────────────────                          ────────────────────────────────
    StandbyWorkers.run(job, n) ──Channel: job───▶  (1) idle: blocks on its channel
      idle workers first, fresh ones started      (2) maps the job's arenas, opens the file,
      lazily (also from a daemonic process);           runs tasks, publishes with release stores
      Crew.add(job): one more, later
    ring jobs (Streamer, Loader):                      ring: free queue → slot → full queue
      wait on the ring's futex words    ◀──────    (3) Reader: stages from its queue, the
    Reader: request in the stage,      ───────▶        request in the stage's header, result
      stage onto a worker's queue                      in the stage, state word DONE
      wait on the stage's state word    ◀──────
    end of job: ring.stop() or "end"   ───────▶    (4) closes the file, answers "done",
    Crew.stop(): "done" within JOIN_TIMEOUT ◀───        back to (1)
      else SIGKILL
    StandbyWorkers.close(): "stop"     ───────▶    (5) exit(0); also on EOF (the parent's end
      join JOIN_TIMEOUT, then SIGKILL                  closed: it exited or died) or a dead
                                                       parent seen between waits

Steps:
(1) Start and stand by (``StandbyWorkers.run``, ``worker.worker_main``, ``_next_job``): workers
    start when a job first needs them and are kept between jobs; an idle worker blocks on its
    channel in IDLE_CHECK slices, checking its parent between them. A job may take more workers
    while it runs (``Crew.add``: a Reader starts its first worker with its first request, the
    others only once the started ones fall behind, ``_reader/dispatch.py``); each joins the
    crew as it starts, so every step below treats it as the others, and none starts once the
    pool is closed.
(2) A job (``_run_job``): the job arrives pickled, each ``SharedArena`` in it as a descriptor
    (``Channel``); the worker opens the HDF5 file, serves tasks until the job's ``next_task``
    returns None, and reports a failure in the job's ``ErrorBox``.
(3) The Reader's requests: a request claims a stage (``Stage.claim``; ``StagePool.take`` waits,
    woken by ``free``/``close``, checking the Reader every CHECK_INTERVAL). The stage's state
    word goes IDLE → PENDING (``Dispatcher.dispatch``, _reader/dispatch.py: the request
    written into the stage's header (as int64 words by ``Selection.put_plain``; a plan with
    index arrays by readspec.to_wire) and the stage pushed onto a worker's
    queue in shared memory; the stage memory's arena goes down the worker's channel before its
    first request there, announced on the queue; a full queue and every send wait in slices
    that give up once the worker dies or the Reader closes) → DONE or FAILED (the worker; its
    exception in the stage's ErrorBox) →
    IDLE (``Request._release`` through ``Stage.free``, once the result is taken). The memory of
    a closed stage is dropped in the workers that mapped it ("drop", at the next dispatch). An
    idle worker sleeps on its queue in IDLE_CHECK slices, checking its parent; the Reader closes
    the queues when it closes.
(4) End of a job: the owner stops the ring (``Ring.stop``: stop word, queues closed, waiters
    woken) or closes its workers' queues and sends "end" (``Crew.end``, the Reader); each worker
    answers "done" and stands by again; ``Crew.stop`` waits for the answers with one deadline
    (JOIN_TIMEOUT, or what the caller gives) and kills the workers that did not answer.
(5) End of the pool (``StandbyWorkers.close``, ``_end_all``): "stop" to every idle worker, one
    join deadline for all, then SIGKILL. A crew still out ends its workers when it stops.
(6) Exit hooks (``hooks``): one atexit hook, registered after multiprocessing.util's (imported
    first) so that it runs before it, closes in ``hooks.EXIT_ORDER`` the live queues, Readers,
    Loaders, dask's files and pools, which stop or kill every worker (multiprocessing's own joins
    would wait forever on a stopped one). A daemonic process (a DataLoader worker) runs no
    atexit hooks: multiprocessing's exit function terminates our workers, daemonic too.
(7) Fork (``hooks.FORK_CHILD_ORDER``): a child forked from the owner closes its copies of the
    parent's channel ends (``channel``), then forgets the parent's workers (``pool``, ``reader``);
    its copies start their own, and its ``close`` never touches the owner's.

Guarantees:
1. No hang if a worker dies: every wait and every send of the consumer is sliced (WAIT_SLICE),
   and ``Crew.check`` raises ``SubprocessException`` naming the worker, its pid and its exit code
   or signal; a closed front door ends a blocked send of another thread within a slice.
2. No orphans if the consumer dies: a worker's channel ends in EOF once its parent's end is gone
   (step 7), and workers check their parent between slices; shared memory is a memfd, freed
   with the last process.
3. Errors raised inside a worker are sent back (type, message, traceback text, where) through
   shared memory (``ErrorBox``) and re-raised in the consumer's thread where it waits.
4. ``close``/``stop`` are idempotent and safe from ``__del__``, from another thread and at
   interpreter exit; workers ignore SIGINT, so Ctrl-C reaches only the consumer, whose cleanup
   stops them; hung workers cost one JOIN_TIMEOUT in all, not one each.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ..errors import ClosedError, SubprocessException
from . import hooks, timeouts
from .channel import DONE, END, STOP, Channel, no_check
from .worker import Job, worker_main

# Workers start by fork (explicitly: Python 3.14 changes the default); spawn and forkserver work.
START_METHOD = "fork"

# Stream and Loader workers read ahead for a consumer that often needs a core itself (the
# generator copies every row; a training step computes): below its priority, they run in the gaps
# it leaves. A Reader's serve requests someone waits for: at the caller's priority.
STANDBY_NICENESS = 10

_START_LOCK = threading.Lock()


def _start(proc) -> None:
    """Start ``proc``, also from a daemonic process (a DataLoader worker, a Pool's worker).

    multiprocessing refuses children to daemonic processes because it would not join them at
    exit; ours need no join: they are daemonic themselves (terminated by multiprocessing's exit
    function), and a parent that dies without it closes their channels (NOTE [ Worker shutdown
    logic ], guarantee 2).
    """
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    with _START_LOCK:
        missing = object()
        daemonic = config.get("daemon", missing)
        config["daemon"] = False
        try:
            proc.start()
        finally:
            if daemonic is missing:
                del config["daemon"]
            else:
                config["daemon"] = daemonic


class _Worker:
    """One worker process and the parent's end of its channel."""

    def __init__(self, ctx, name: str, number: int, niceness: int):
        self.channel, theirs = Channel.pair()
        self.channel.keep_from_children()  # before the fork: the worker must not keep it
        self.name = f"{name} worker"
        self.proc = ctx.Process(target=worker_main, args=(theirs, number),
                                name=f"{name}-worker-{number}", daemon=True)
        try:
            _start(self.proc)
        except BaseException:
            self.channel.close()
            raise
        finally:
            theirs.close()
        if niceness:
            # Set here, not in the worker: in force before the caller sees it, any start method.
            nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
            with contextlib.suppress(ProcessLookupError):
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, nice)

    def alive(self) -> bool:
        return self.proc.exitcode is None

    def send(self, message: Any, check: Callable[[], None] = no_check) -> None:
        """Send ``message``; BrokenPipeError if the worker has exited meanwhile."""

        def check_both() -> None:
            if not self.alive():
                raise BrokenPipeError(f"{self.name} (pid {self.proc.pid}) has exited")
            check()

        self.channel.send(message, check_both)

    def post(self, message: Any) -> None:
        """Send ``message`` if it goes at once: a stopped worker with a full channel, or a dead
        one, is killed or reaped by whoever ends it, not waited for here."""

        def give_up() -> None:
            raise TimeoutError

        with contextlib.suppress(OSError):
            self.channel.send(message, give_up)

    def ask_to_end(self) -> None:
        """Send STOP if it goes at once."""
        self.post(STOP)

    def wait_done(self, deadline: float) -> bool:
        """Wait until ``deadline`` (monotonic) for DONE; False if it died or did not answer."""
        while True:
            try:
                message = self.channel.receive(
                    max(0.0, min(timeouts.WAIT_SLICE, deadline - time.monotonic())))
            except (OSError, EOFError):
                return False
            if message == DONE:
                return True
            if not self.alive() or time.monotonic() >= deadline:
                return False

    def wait_or_kill(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the worker to exit, then kill it; close the channel."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(timeouts.JOIN_TIMEOUT)
        self.channel.close()


def _end_all(workers: list[_Worker], timeout: float) -> None:
    """End several workers with one deadline: ask them all first, then wait, then kill."""
    for worker in workers:
        worker.ask_to_end()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.wait_or_kill(max(0.0, deadline - time.monotonic()))


def _raise_if_dead(name: str, procs: list, stop: Callable[[], None]) -> None:
    """Stop the rest and raise ``SubprocessException`` naming the first worker that has exited."""
    for i, proc in enumerate(procs):
        code = proc.exitcode
        if code is not None:
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            stop()
            raise SubprocessException(
                f"{name} worker {i} (pid {proc.pid}) exited unexpectedly with {how}"
            )


class StandbyWorkers:
    """The worker pool of one front door: processes started when a job first needs them and
    kept between jobs; each job borrows some as a ``Crew`` and gives them back. ``close`` ends
    them; so do garbage collection and the interpreter's exit."""

    def __init__(self, start_method: str | None, name: str, niceness: int = STANDBY_NICENESS):
        self._ctx: Any = multiprocessing.get_context(start_method or START_METHOD)
        self.name = name
        self._niceness = niceness
        self._idle: list[_Worker] = []
        self._lock = threading.Lock()  # jobs may start and stop in different threads
        self._started = 0
        self._closed = False
        self._owner = os.getpid()
        hooks.track("pools", self)

    def run(self, job: Job, n_procs: int) -> Crew:
        """Start ``job`` on ``n_procs`` workers, idle ones first, fresh ones for the rest; a
        crew may take more later (``Crew.add``)."""
        if self._closed:
            raise ClosedError(f"this {self.name} is closed")
        self._reap_idle()
        crew: list[_Worker] = []
        try:
            while len(crew) < n_procs:
                crew.append(self.lend(job))
        except BaseException:
            _end_all(crew, 0)
            raise
        return Crew(self, crew)

    def lend(self, job: Job) -> _Worker:
        """One worker running ``job``: an idle one, else one started now."""
        if self._closed:
            raise ClosedError(f"this {self.name} is closed")
        while True:
            worker = self._take_idle()
            fresh = worker is None
            if worker is None:
                with self._lock:
                    number, self._started = self._started, self._started + 1
                worker = _Worker(self._ctx, self.name, number, self._niceness)
            try:
                worker.send(job)
            except OSError:
                worker.wait_or_kill(0)
                if fresh:
                    raise
                continue  # an idle one died since _reap_idle: take another
            except BaseException:
                _end_all([worker], 0)
                raise
            return worker

    def _reap_idle(self) -> None:
        """Reap the idle workers that died (killed while standing by): left in the list, each
        would linger as a zombie, one process more than asked for, until ``close``."""
        with self._lock:
            live: list[_Worker] = []
            dead: list[_Worker] = []
            for worker in self._idle:  # one look each: one that dies now is in one list only
                (live if worker.alive() else dead).append(worker)
            self._idle = live
        for worker in dead:
            worker.wait_or_kill(0)

    def _take_idle(self) -> _Worker | None:
        """A live idle worker, if any; one that died since ``_reap_idle`` is reaped here."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                worker = self._idle.pop()
            if worker.alive():
                return worker
            worker.wait_or_kill(0)

    def _give_back(self, workers: list[_Worker]) -> None:
        """Idle again after a job; ended at once if this is closed."""
        with self._lock:
            if not self._closed:
                self._idle.extend(workers)
                return
        _end_all(workers, timeouts.JOIN_TIMEOUT)

    def close(self) -> None:
        """End the idle workers (a crew still out ends its own when it stops). Idempotent.
        See NOTE [ Worker shutdown logic ], step (5)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        hooks.untrack("pools", self)
        if os.getpid() == self._owner:  # not in a forked copy of the owner: they are its workers
            _end_all(idle, timeouts.JOIN_TIMEOUT)

    def forget_inherited(self) -> None:
        """In a forked child: the workers are the parent's; this copy starts its own."""
        self._idle = []
        self._lock = threading.Lock()
        self._owner = os.getpid()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


class Crew:
    """The workers running one job: checked, sent messages, and stopped by the job's owner."""

    def __init__(self, standby: StandbyWorkers, workers: list[_Worker]):
        # Weak: once its owner is gone no job can follow, so the workers end with this one.
        self._standby = weakref.ref(standby)
        self._workers = workers
        self.name = standby.name

    @property
    def procs(self) -> list:
        return [w.proc for w in self._workers]

    def check(self) -> None:
        """Raise ``SubprocessException`` if a worker died: workers never exit during a job."""
        _raise_if_dead(self.name, self.procs, lambda: self.stop(join_timeout=0))

    def add(self, job: Job) -> None:
        """Lend one more worker to this crew's job (``job``: that job, as this worker is to
        run it): a front door may start workers as it finds them worth it (a Reader's second
        worker, once the first falls behind). See NOTE [ Worker shutdown logic ], step (1)."""
        standby = self._standby()
        if standby is None:
            raise ClosedError(f"this {self.name}'s workers are closed")
        self._workers.append(standby.lend(job))

    def send(self, worker: int, message: Any, check: Callable[[], None] = no_check) -> None:
        """Send ``message`` to the job's ``worker``-th worker, in slices that call ``check``."""
        self._workers[worker].send(message, check)

    def end(self) -> None:
        """Tell workers that read their channel during the job (a Reader's) that it is over.
        See NOTE [ Worker shutdown logic ], step (4)."""
        for worker in self._workers:
            worker.post(END)

    def stop(self, join_timeout: float | None = None) -> None:
        """Wait for each worker to finish the job (the owner has told them to), one deadline for
        all; those that did go back to standby, the others are killed. See NOTE [ Worker
        shutdown logic ], step (4)."""
        if join_timeout is None:
            join_timeout = timeouts.JOIN_TIMEOUT
        deadline = time.monotonic() + join_timeout
        done: list[_Worker] = []
        stuck: list[_Worker] = []
        for worker in self._workers:
            (done if worker.wait_done(deadline) else stuck).append(worker)
        self._workers = []
        _end_all(stuck, 0)
        standby = self._standby()
        if standby is None:
            _end_all(done, timeouts.JOIN_TIMEOUT)
        else:
            standby._give_back(done)


# Pools alive in this process, ended at interpreter exit, after the front doors using them.
_LIVE_STANDBY: weakref.WeakSet[StandbyWorkers] = weakref.WeakSet()


def _forget_inherited_pools() -> None:
    """A forked child (our worker, a DataLoader worker) forgets the parent's idle workers. See
    NOTE [ Worker shutdown logic ], step (7)."""
    for standby in hooks.tracked("pools"):
        standby.forget_inherited()


hooks.on_fork("pools", after_in_child=_forget_inherited_pools)
