"""The worker processes shared by both front doors: how they start, serve jobs, fail and stop.

Internal module.

NOTE [ Worker shutdown logic ]
==============================
::

    consumer (Streamer / Reader)                 worker processes (n_procs)
    ────────────────────────────                 ──────────────────────────
    creates shared memory (shm)     ──fork──▶    map the same pages, open the HDF5 file
    waits on a futex word or queue  ◀──────      publish results with release stores
      in slices of WAIT_SLICE s,                 wait for tasks in slices of WAIT_SLICE s,
      checking the workers between               checking the consumer's sentinel between
    close(): stop word, close queues ──────▶     see stop / a closed queue / "stop", exit(0)
      join JOIN_TIMEOUT s, then SIGKILL

A Streamer's workers stand by between its queues (``StandbyWorkers``): at the end of a job they
answer "done" down their connection instead of exiting, and the queue's ``close()`` waits for that
answer (JOIN_TIMEOUT s, then SIGKILL) the way a one-job pool waits for exit. They exit on "stop"
(``Streamer.close()``, garbage collection, interpreter exit), or when their last queue closes
after the Streamer itself is gone.

Guarantees:
1. No hang if a worker dies: every wait of the consumer is sliced, and ``check`` raises
   ``SubprocessException`` naming the worker, its pid and its exit code or signal.
2. No orphans if the consumer dies: workers watch the consumer's process sentinel between wait
   slices (WAIT_SLICE s) and exit; their shared memory is a memfd, freed with the last process.
3. Errors raised inside a worker are sent back (type, message, traceback text, where) through shared
   memory (``ErrorBox``) and re-raised in the consumer's thread where it waits.
4. ``stop()`` is idempotent and safe from ``__del__`` and at interpreter exit; workers ignore
   SIGINT, so Ctrl-C reaches only the consumer, whose cleanup stops them.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import multiprocessing.util  # noqa: F401 - see below
import os
import pickle
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable
from multiprocessing import reduction
from typing import Any, Protocol

from .errors import SubprocessException
from .shm import SharedArena
from .source import OpenFile

# multiprocessing.util's exit hook joins daemon workers without a timeout (forever, for a stopped
# or hung one). Importing it here registers it before the front doors' exit hooks, so it runs after
# them (atexit is last-in, first-out), when they have already stopped or killed every worker.

# Longest a wait sleeps before checking its peers (seconds). See NOTE [ Worker shutdown logic ].
WAIT_SLICE = 0.1
# Longest a consumer goes without checking its workers, even while results keep coming.
CHECK_INTERVAL = 0.5
# How long stop() waits for workers to exit on their own before killing them.
JOIN_TIMEOUT = 2.0

DEFAULT_START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


class Job(Protocol):
    """What workers run: a source of tasks, each a read into shared memory.

    A job must pickle (for the spawn and forkserver start methods); ``attach`` then maps its
    shared memory and prepares its datasets in the worker, once.
    """

    name: str
    filename: str

    def file_kwargs(self) -> dict[str, Any]: ...

    def attach(self, source: OpenFile, worker: int) -> None: ...

    def next_task(self, parent_alive: Callable[[], bool]) -> Any | None:
        """The next task, waiting in slices of WAIT_SLICE; None once the worker should exit."""

    def run(self, task: Any) -> None: ...

    def describe(self, task: Any) -> str:
        """What the task reads, for error messages."""

    def task_failed(self, task: Any, exc: BaseException, where: str) -> bool:
        """Report a failed task; True to go on serving."""

    def fail(self, exc: BaseException, where: str) -> None:
        """Report a failure of the worker itself (the file would not open, say)."""


def _worker_main(job: Job, worker: int) -> None:
    """The loop of a worker that runs one job for its whole life (a Reader's)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _run_job(job, worker, _parent_alive())


def _parent_alive() -> Callable[[], bool]:
    # The process that made the pool: not our parent pid under forkserver, but its sentinel
    # tells under every start method.
    parent = multiprocessing.parent_process()
    return lambda: parent is not None and parent.is_alive()


def _run_job(job: Job, worker: int, parent_alive: Callable[[], bool]) -> None:
    """The one worker loop, for every front door. See NOTE [ Worker shutdown logic ]."""
    where = f"in {job.name} worker {worker} (pid {os.getpid()})"
    try:
        with contextlib.closing(OpenFile(job.filename, job.file_kwargs())) as source:
            job.attach(source, worker)
            while (task := job.next_task(parent_alive)) is not None:
                try:
                    job.run(task)
                except Exception as exc:
                    if not job.task_failed(task, exc, f"{where}, {job.describe(task)}"):
                        return
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the consumer
        job.fail(exc, where)


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


class WorkerPool:
    """``n_procs`` processes running one job; started at once, checked and stopped by the owner."""

    def __init__(self, job: Job, n_procs: int, start_method: str | None, name: str):
        ctx: Any = multiprocessing.get_context(start_method or DEFAULT_START_METHOD)
        self.name = name
        self.procs = [
            ctx.Process(
                target=_worker_main,
                args=(job, i),
                name=f"{name}-worker-{i}",
                daemon=True,
            )
            for i in range(n_procs)
        ]
        try:
            for proc in self.procs:
                proc.start()
        except BaseException:
            self.stop(join_timeout=0)
            raise

    def check(self) -> None:
        """Raise ``SubprocessException`` if a worker died: these workers never exit alone."""
        _raise_if_dead(self.name, self.procs, lambda: self.stop(join_timeout=0))

    def stop(self, join_timeout: float = JOIN_TIMEOUT) -> None:
        """Wait for the workers to exit (the owner has already told them to), then kill the rest.

        One deadline for all of them: hung workers cost one ``join_timeout``, not one each.
        """
        deadline = time.monotonic() + join_timeout
        for proc in self.procs:
            if proc.pid is not None:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                proc.kill()
                proc.join(JOIN_TIMEOUT)
        self.procs = []


# ------------------------------------------------------------------------------- standby workers
#
# A Streamer's workers outlive each queue: they wait for the next job instead of exiting. Starting
# a process (a fork copies the caller's page tables: milliseconds for a process that has imported
# a deep-learning framework, and as much again to exit) then happens once per Streamer, not once
# per pass over the data.

# Stream workers read ahead for a consumer that often needs a core itself (the generator copies
# every row; a training step computes): below its priority, they run in the gaps it leaves.
STANDBY_NICENESS = 10


def _standby_main(conn, worker: int) -> None:
    """The loop of a standby worker: run each job sent down ``conn``, answer, wait for the next.

    The file is opened per job, as a one-job worker does: an HDF5 file open in a standby worker
    would hold its lock, and no process could open the file for writing between two passes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent_alive = _parent_alive()
    try:
        while (job := _receive_job(conn, parent_alive)) is not None:
            _run_job(job, worker, parent_alive)
            del job  # and with it the job's view of its shared memory
            conn.send_bytes(b"done")
    except OSError:
        pass  # the connection is gone: so is the Streamer


def _receive_job(conn, parent_alive: Callable[[], bool]) -> Job | None:
    """The next job, its shared arenas mapped from the descriptors that follow it; None: stop."""
    while not conn.poll(WAIT_SLICE):
        if not parent_alive():
            return None
    try:
        message = conn.recv_bytes()
    except EOFError:
        return None
    if message == b"stop":
        return None
    unpickler = pickle.Unpickler(io.BytesIO(message))
    unpickler.persistent_load = (  # type: ignore[method-assign]
        lambda pid: SharedArena(pid, _fd=reduction.recv_handle(conn)))
    return unpickler.load()


def _send_job(conn, job: Job, pid: int) -> None:
    """Pickle ``job`` down ``conn``, each shared arena in it as a descriptor (SCM_RIGHTS)."""
    arenas: list[SharedArena] = []

    def persistent_id(obj):
        if isinstance(obj, SharedArena):
            arenas.append(obj)
            return obj.nbytes
        return None

    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, pickle.HIGHEST_PROTOCOL)
    pickler.persistent_id = persistent_id  # type: ignore[method-assign]
    pickler.dump(job)
    conn.send_bytes(buf.getvalue())
    for arena in arenas:
        reduction.send_handle(conn, arena.fd, pid)


class _Standby:
    """One standby worker: its process and the parent's end of its connection."""

    def __init__(self, ctx, name: str, worker: int):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_standby_main, args=(child, worker),
                                name=f"{name}-worker-{worker}", daemon=True)
        try:
            self.proc.start()
        finally:
            child.close()
        # Set here, not in the worker: in force before the caller sees it, under any start method.
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + STANDBY_NICENESS)
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, niceness)

    def ask_to_end(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send_bytes(b"stop")

    def wait_or_kill(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the worker to exit, then kill it."""
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join(JOIN_TIMEOUT)
        self.conn.close()


class StandbyWorkers:
    """Worker processes kept between jobs: each job borrows some as a ``Crew``, then gives them
    back. ``close`` ends them; so does garbage collection and the interpreter's exit."""

    def __init__(self, start_method: str | None, name: str):
        self._ctx: Any = multiprocessing.get_context(start_method or DEFAULT_START_METHOD)
        self.name = name
        self._idle: list[_Standby] = []
        self._lock = threading.Lock()  # queues may start and close in different threads
        self._started = 0
        self._closed = False
        self._owner = os.getpid()
        _LIVE_STANDBY.add(self)

    def run(self, job: Job, n_procs: int) -> Crew:
        """Start ``job`` on ``n_procs`` workers, idle ones first."""
        if self._closed:
            raise ValueError(f"this {self.name} is closed")
        crew: list[_Standby] = []
        try:
            while len(crew) < n_procs:
                with self._lock:
                    idle = self._idle.pop() if self._idle else None
                    number, self._started = self._started, self._started + (idle is None)
                fresh = idle is None
                crew.append(idle if idle is not None else _Standby(self._ctx, self.name, number))
                try:
                    _send_job(crew[-1].conn, job, crew[-1].proc.pid)
                except OSError:
                    if fresh:
                        raise
                    crew.pop().wait_or_kill(0)  # it died while idle: take another
        except BaseException:
            _end_all(crew, 0)
            raise
        return Crew(self, crew)

    def _give_back(self, workers: list[_Standby]) -> None:
        """Idle again after a job; ended at once if this is closed."""
        with self._lock:
            if not self._closed:
                self._idle.extend(workers)
                return
        _end_all(workers, JOIN_TIMEOUT)

    def close(self) -> None:
        """End the idle workers (a crew still out ends its own when it stops). Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        _LIVE_STANDBY.discard(self)
        if os.getpid() == self._owner:  # not in a forked copy of the owner: they are its workers
            _end_all(idle, JOIN_TIMEOUT)

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()


class Crew:
    """The standby workers running one job: checked and stopped like a ``WorkerPool``."""

    def __init__(self, standby: StandbyWorkers, workers: list[_Standby]):
        # Weak: once its owner is gone no job can follow, so the workers end with this one.
        self._standby = weakref.ref(standby)
        self._workers = workers
        self.name = standby.name

    @property
    def procs(self) -> list:
        return [w.proc for w in self._workers]

    def check(self) -> None:
        """Raise ``SubprocessException`` if a worker died: standby workers never exit alone."""
        _raise_if_dead(self.name, self.procs, lambda: self.stop(join_timeout=0))

    def stop(self, join_timeout: float = JOIN_TIMEOUT) -> None:
        """Wait for each worker to finish the job (the owner has told them to), one deadline for
        all; those that did go back to standby, the others are killed."""
        deadline = time.monotonic() + join_timeout
        done: list[_Standby] = []
        stuck: list[_Standby] = []
        for worker in self._workers:
            try:
                finished = (worker.proc.exitcode is None
                            and worker.conn.poll(max(0.0, deadline - time.monotonic()))
                            and worker.conn.recv_bytes() == b"done")
            except (OSError, EOFError):
                finished = False
            (done if finished else stuck).append(worker)
        self._workers = []
        _end_all(stuck, 0)
        standby = self._standby()
        if standby is None:
            _end_all(done, JOIN_TIMEOUT)
        else:
            standby._give_back(done)


def _end_all(workers: list[_Standby], timeout: float) -> None:
    """End several workers with one deadline: ask them all first, then wait."""
    for worker in workers:
        worker.ask_to_end()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.wait_or_kill(max(0.0, deadline - time.monotonic()))


# Standby workers alive in this process, ended at interpreter exit, after the queues using them.
_LIVE_STANDBY: weakref.WeakSet[StandbyWorkers] = weakref.WeakSet()


@atexit.register
def _end_live_standby() -> None:
    for standby in list(_LIVE_STANDBY):
        standby.close()
