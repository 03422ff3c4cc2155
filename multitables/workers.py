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

Guarantees:
1. No hang if a worker dies: every wait of the consumer is sliced, and ``WorkerPool.check`` raises
   ``SubprocessException`` naming the worker, its pid and its exit code or signal.
2. No orphans if the consumer dies: workers watch the consumer's process sentinel between wait
   slices (WAIT_SLICE s) and exit; their shared memory is a memfd, freed with the last process.
3. Errors raised inside a worker are sent back (type, message, traceback text, where) through shared
   memory (``ErrorBox``) and re-raised in the consumer's thread where it waits.
4. ``stop()`` is idempotent and safe from ``__del__`` and at interpreter exit; workers ignore
   SIGINT, so Ctrl-C reaches only the consumer, whose cleanup stops them.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util  # noqa: F401 - see below
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol

from .errors import SubprocessException
from .source import open_file

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

    def attach(self, file, worker: int) -> None: ...

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
    """The one worker loop, for every front door. See NOTE [ Worker shutdown logic ]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    where = f"in {job.name} worker {worker} (pid {os.getpid()})"
    # The process that made the pool: not our parent pid under forkserver, but its sentinel
    # tells under every start method.
    parent = multiprocessing.parent_process()

    def parent_alive() -> bool:
        return parent is not None and parent.is_alive()

    try:
        with open_file(job.filename, job.file_kwargs()) as file:
            job.attach(file, worker)
            while (task := job.next_task(parent_alive)) is not None:
                try:
                    job.run(task)
                except Exception as exc:
                    if not job.task_failed(task, exc, f"{where}, {job.describe(task)}"):
                        return
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the consumer
        job.fail(exc, where)


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

    def check(self, exit_ok: bool = True) -> None:
        """Raise ``SubprocessException`` if a worker died without being asked to.

        ``exit_ok``: whether a worker may have finished on its own (a stream that has ended);
        workers that serve requests never do.
        """
        for i, proc in enumerate(self.procs):
            code = proc.exitcode
            if code is not None and (code != 0 or not exit_ok):
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                self.stop(join_timeout=0)
                raise SubprocessException(
                    f"{self.name} worker {i} (pid {proc.pid}) exited unexpectedly with {how}"
                )

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
