"""The worker side of the engine: a worker process's life, and the jobs it runs (internal). See
NOTE [ Worker shutdown logic ] in :mod:`multitables._engine.pool`."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from collections.abc import Callable
from typing import Any, Protocol

from . import timeouts
from .channel import DONE, END, STOP, TIMEOUT, Channel


class Job(Protocol):
    """What workers run: a source of tasks, each a read into shared memory.

    A job must pickle (it travels down a ``Channel``, its arenas as descriptors); ``attach``
    then maps its shared memory and opens what it reads in the worker, once per job: the engine
    itself opens no file.
    """

    name: str

    def attach(self, worker: int) -> None:
        """Prepare the job in this worker: map its memory, open what it reads."""

    def detach(self) -> None:
        """Close what ``attach`` opened; the job is over in this worker."""

    def next_task(self, parent_alive: Callable[[], bool]) -> Any | None:
        """The next task, waiting in slices; None once the job is over for this worker."""

    def run(self, task: Any) -> None: ...

    def describe(self, task: Any) -> str:
        """What the task reads, for error messages."""

    def task_failed(self, task: Any, exc: BaseException, where: str) -> bool:
        """Report a failed task; True to go on serving."""

    def fail(self, exc: BaseException, where: str) -> None:
        """Report a failure of the worker itself (the file would not open, say)."""



# In a worker process: its end of the channel to its parent (a Reader's job reads requests on it).
_CHANNEL: Channel | None = None


def parent_channel() -> Channel:
    """This worker's channel to its parent; only in a worker process."""
    if _CHANNEL is None:
        raise RuntimeError("not in a multitables worker process")
    return _CHANNEL


def worker_main(channel: Channel, worker: int) -> None:
    """A worker's life: run each job its channel brings, answer DONE, stand by for the next.

    The file is opened per job: an HDF5 file open in an idle worker would hold its lock, and no
    process could open the file for writing between two passes. See NOTE [ Worker shutdown
    logic ], steps (1), (2), (4) and (5).
    """
    global _CHANNEL
    # What the parent held is never garbage here: a full collection would walk all of it and
    # copy every page it touches (160 ms, for a parent with torch imported).
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _CHANNEL = channel
    parent_alive = _parent_alive()

    def check_parent() -> None:
        if not parent_alive():
            raise BrokenPipeError("the parent is gone")

    try:
        while (job := _next_job(channel, parent_alive)) is not None:
            _run_job(job, worker, parent_alive)
            del job  # and with it the job's view of its shared memory
            channel.send(DONE, check_parent)
    except (OSError, EOFError):
        pass  # the channel is gone: so is the parent


def _next_job(channel: Channel, parent_alive: Callable[[], bool]) -> Job | None:
    """The next job, blocking; None: exit. See NOTE [ Worker shutdown logic ], step (1)."""
    while True:
        message = channel.receive(timeouts.IDLE_CHECK)
        if message is TIMEOUT:
            if not parent_alive():
                return None
        elif message == STOP:
            return None
        elif message != END and not isinstance(message, tuple):
            # An END that crossed a job's own end on the way is no news; nor are requests
            # (tuples) sent to a job that has already ended: one that failed to open its file.
            return message


def _parent_alive() -> Callable[[], bool]:
    """Whether the process that made the pool still runs. Our parent pid under fork and spawn: a
    dead parent's children are adopted by another, at once. Under forkserver the parent is the
    server; its sentinel tells (a pipe that processes forked later may keep open, so slower)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return lambda: False
    if parent.pid == os.getppid():
        return lambda: os.getppid() == parent.pid
    return parent.is_alive


def worker_place(name: str, worker: int) -> str:
    """Where an error in this worker process happened, as its report names it."""
    return f"in {name} worker {worker} (pid {os.getpid()})"


def _run_job(job: Job, worker: int, parent_alive: Callable[[], bool]) -> None:
    """One job in one worker, for every front door. See NOTE [ Worker shutdown logic ], (2)."""
    where = worker_place(job.name, worker)
    try:
        job.attach(worker)
        try:
            while (task := job.next_task(parent_alive)) is not None:
                try:
                    job.run(task)
                except Exception as exc:
                    if not job.task_failed(task, exc, f"{where}, {job.describe(task)}"):
                        return
        finally:
            job.detach()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the consumer
        job.fail(exc, where)

