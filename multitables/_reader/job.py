"""The worker side of a Reader (internal): a job that serves the requests of one worker's queue.

See ``control`` for the memory it shares with the Reader and ``dispatch`` for the Reader's side.
"""

from __future__ import annotations

import time
from typing import Any

import h5py
import numpy as np

from .._engine import timeouts
from .._engine._ringbuf import CLOSED
from .._engine._ringbuf import TIMEOUT as TIMEOUT_ITEM
from .._engine.channel import END, TIMEOUT
from .._engine.worker import parent_channel, worker_place
from .._hdf5 import rawread
from .._hdf5.chunkcache import chunk_cache
from .._hdf5.filejob import FileJob
from .._hdf5.source import FileRef, OpenFile
from . import control
from .control import NOTICE, Task, decode_item
from .readspec import ReadSpec, element_dtype, execute, take_wire
from .stages import DONE, FAILED, StageMemory

# A worker that finished a request watches its queue this long before sleeping: a caller's next
# request often follows soon, and waking a sleeping process costs about as much as serving a
# one-row request (bench/README.md, "The Reader's waits"). One worker at a time watches (the
# caller hands it the next request): several would take the cores that the caller and the busy
# workers need.
WORKER_SPIN = 100e-6


class RequestJob(FileJob):
    """Serve the requests of this worker's queue.

    Control memory (``control``): the watching worker (see WORKER_SPIN); per worker, the count of
    requests it finished (the caller prefers awake workers, ``Dispatcher.pick_worker``) and its
    queue (``NOTICE`` or the stage memory whose header holds the request); then an ``ErrorBox``
    for failures of a worker itself. Channel messages, one per NOTICE: ("map", memory id, arena)
    before a worker's first request on a stage's memory, ("drop", memory id) once it is freed,
    ("read", memory id, spec, part, parts) for a request too large for the header.
    The Reader closes the queues when it closes. See NOTE [ Worker shutdown logic ] in
    _engine/pool.py.
    """

    name = "Reader"

    def __init__(self, filename: FileRef, file_kwargs: dict[str, Any], n_procs: int, arena,
                 worker: int):
        self.filename = filename
        self.kwargs = file_kwargs
        self.n_procs = n_procs
        self.control = arena
        self.worker = worker  # which of the control memory's queues is this worker's

    def file_kwargs(self) -> dict[str, Any]:
        return chunk_cache(self.kwargs, "random")

    def attach_file(self, source: OpenFile, worker: int) -> None:
        # ``worker``, the process's number in its pool, names it; the job says which it serves.
        worker = self.worker
        # This process's map of the file is populated ahead of the reads (a thread maps its pages
        # in large steps, where random rows would fault them in a few at a time: 200-300 us a
        # 64-row batch of a cold map, 60-80 warm) and kept while the process serves.
        rawread.keep_maps()
        self.channel = parent_channel()
        buffer = self.control.buffer
        self.done = control.done_counter(buffer, worker)
        self.busy = control.busy_counter(buffer, worker)
        self.queue = control.work_queue(buffer, worker)
        self.spinner = control.spinner(buffer)
        self.me = worker + 1  # as the spinner word names it
        self.memories: dict[int, StageMemory] = {}
        self.dtypes: dict[tuple, np.dtype] = {}  # see _dataset
        control.ready_stamp(buffer, worker).store(time.monotonic_ns())

    def next_task(self, parent_alive) -> Task | None:
        """(memory id, part, parts, the request or None when it lies in the header), or None at
        the end. See NOTE [ Worker shutdown logic ], step (3): sleep on the queue, check the
        parent."""
        while True:
            item = self.queue.try_pop()
            if item == TIMEOUT_ITEM and self.spinner.compare_exchange(0, self.me):
                try:
                    item = self.queue.pop(0.0, 1, WORKER_SPIN)
                finally:
                    self.spinner.set(0)
            if item == TIMEOUT_ITEM:
                item = self.queue.pop(timeouts.IDLE_CHECK)
            if item == TIMEOUT_ITEM:
                if not parent_alive():
                    return None
            elif item == CLOSED:
                return None
            elif item != NOTICE:
                return decode_item(item)
            else:
                task = self._take_message(parent_alive)
                if task is END:
                    return None
                if task is not None:
                    return task

    def _take_message(self, parent_alive):
        """Act on the channel message a NOTICE announced: a task, None, or END."""
        # The notice goes first (a message of several packets fills the socket until read), so
        # the message may still be on its way; END comes instead if its send failed.
        while (message := self.channel.receive(timeouts.IDLE_CHECK)) is TIMEOUT:
            if not parent_alive():
                return END
        if message == END:
            return END
        if message[0] == "map":
            self.memories[message[1]] = StageMemory(message[2])
        elif message[0] == "drop":
            memory = self.memories.pop(message[1], None)
            if memory is not None:
                memory.close()
        elif message[0] == "read":
            _, memory_id, spec, part, parts = message
            return memory_id, part, parts, spec
        return None

    def run(self, task: Task) -> None:
        start = time.thread_time_ns()
        memory_id, part, parts, spec = task
        memory = self.memories[memory_id]
        if parts > 1:
            try:
                self._run_part(task, memory)
            finally:
                self.busy.fetch_add(time.thread_time_ns() - start)
            return
        if spec is None:
            spec = take_wire(memory)
        execute(spec, self._dataset(spec), memory)
        self.busy.fetch_add(time.thread_time_ns() - start)  # before the caller can see it done
        memory.state.store(DONE)
        self.done.fetch_add(1)

    def _dataset(self, spec: ReadSpec) -> h5py.Dataset:
        """The dataset ``spec`` reads, with ``spec.dtype`` filled in: worked out once per job
        (h5py builds a dataset's dtype anew each time it is asked, at a cost: bench/README.md)."""
        dataset = self.source.dataset(spec.path)
        if spec.dtype is None:
            key = (spec.kind, spec.path, spec.field)
            dtype = self.dtypes.get(key)
            if dtype is None:
                dtype = self.dtypes[key] = element_dtype(spec, dataset)
            spec.dtype = dtype
        return dataset

    def _run_part(self, task: Task, memory: StageMemory) -> None:
        """One part of a split request. The last part to finish publishes DONE, or FAILED with
        the first failed part's error: until then the stage's data is still being written."""
        memory_id, part, parts, spec = task
        try:
            if spec is None:
                spec = take_wire(memory, part, parts)
            execute(spec, self._dataset(spec), memory)
        except Exception as exc:
            if memory.parts_failed.fetch_add(1) == 0:
                where = f"{worker_place(self.name, self.worker)}, "
                memory.errors.put(exc, where + self.describe((memory_id, part, parts, spec)))
        finally:
            self.done.fetch_add(1)
            if memory.parts_done.fetch_add(1) + 1 == parts:
                memory.state.store(FAILED if memory.parts_failed.load() else DONE)

    def describe(self, task: Task) -> str:
        memory_id, part, parts, spec = task
        of = f" (part {part + 1} of {parts})" if parts > 1 else ""
        if spec is None:
            return f"reading the request in stage memory {memory_id}{of} in {self.filename}"
        field = f" field {spec.field!r}" if spec.field else ""
        return (f"reading {spec.path}{field} ({spec.kind}, result {spec.shape}){of} in "
                f"{self.filename}")

    def task_failed(self, task: Task, exc: BaseException, where: str) -> bool:
        memory = self.memories.get(task[0])
        if memory is None:
            self.fail(exc, where)
            return False
        memory.errors.put(exc, where)  # a part's failures are its own (_run_part)
        memory.state.store(FAILED)
        self.done.fetch_add(1)
        return True

    def fail(self, exc: BaseException, where: str) -> None:
        control.error_box(self.control.buffer, self.n_procs).put(exc, where)
