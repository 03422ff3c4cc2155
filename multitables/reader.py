"""Random access with numpy-style keys: requests served by workers into shared-memory stages."""

from __future__ import annotations

import collections
import functools
import os
import threading
import time
import weakref
from typing import Any

import h5py
import numpy as np

from ._engine import hooks, timeouts
from ._engine._ringbuf import CLOSED, Counter, SlotQueue, Word
from ._engine._ringbuf import TIMEOUT as TIMEOUT_ITEM
from ._engine.channel import END, TIMEOUT
from ._engine.errbox import ErrorBox
from ._engine.pool import Crew, StandbyWorkers
from ._engine.shm import SharedArena
from ._engine.worker import parent_channel, worker_place
from ._hdf5.chunkcache import chunk_cache
from ._hdf5.filejob import FileJob
from ._hdf5.source import (
    OpenFile,
    check_positive_int,
    default_n_procs,
    describe,
    get_dataset,
    open_file,
)
from ._reader.futures import Request
from ._reader.lending import lend
from ._reader.proxies import DatasetProxy, make_proxy
from ._reader.readspec import ARRAY, ReadSpec, element_dtype, execute, from_wire, to_wire
from ._reader.stages import DONE, FAILED, IDLE, MAX_PARTS, PENDING, Stage, StageMemory, StagePool
from .errors import ClosedError, SubprocessException

__all__ = ["Reader"]

_ERROR_BYTES = 1 << 16
# Control memory: which worker is watching its queue (see WORKER_SPIN), then per worker the
# count of requests it finished and its queue of work, then an ErrorBox.
_SPINNER = 0
_WORKERS = 64
_DONE = 64
_QUEUE_ITEMS = 1024  # a caller with more requests pending on one worker waits for room
_PER_WORKER = _DONE + SlotQueue.nbytes(_QUEUE_ITEMS)
# Items of a worker's queue: a request (or a part of one) written in a stage memory's header
# (``_encode_item``), or NOTICE: a message waits on the worker's channel (a stage memory to map
# or drop, a request too large for the header).
NOTICE = 0
# A worker that finished a request watches its queue this long before sleeping: a caller's next
# request often follows within tens of microseconds, and waking a sleeping process costs ~40 us
# on a virtual machine, as much as serving a one-row request. One worker at a time watches (the
# caller hands it the next request): several would take the cores that the caller and the busy
# workers need.
WORKER_SPIN = 100e-6
# A sleeping worker is woken for a request once the awake ones have each had a request pending
# this long.
WAKE_AFTER = 1e-3
QUEUE_FULL_WAIT = 1e-4
# Memory that came back from results, kept for stages of its size (see Reader._keep_spare).
MAX_SPARES = 8
MAX_SPARE_BYTES = 256 << 20


class _RequestJob(FileJob):
    """The worker side of a Reader: serve the requests of this worker's queue.

    Control memory: the watching worker (see WORKER_SPIN); per worker, the count of requests it
    finished (the caller prefers awake workers, ``Reader._pick_worker``) and its queue
    (``NOTICE`` or the stage memory whose header holds the request); then an ``ErrorBox`` for
    failures of a worker itself. Channel messages, one per NOTICE: ("map", memory id, arena)
    before a worker's first request on a stage's memory, ("drop", memory id) once it is freed,
    ("read", memory id, spec) for a request too large for the header.
    The Reader closes the queues when it closes. See NOTE [ Worker shutdown logic ] in
    _engine/pool.py.
    """

    name = "Reader"

    def __init__(self, filename: str, file_kwargs: dict[str, Any], n_procs: int, control):
        self.filename = filename
        self.kwargs = file_kwargs
        self.n_procs = n_procs
        self.control = control

    def file_kwargs(self) -> dict[str, Any]:
        return chunk_cache(self.kwargs, "random")

    def attach_file(self, source: OpenFile, worker: int) -> None:
        self.channel = parent_channel()
        at = _WORKERS + _PER_WORKER * worker
        self.done = Counter(self.control.buffer, at)
        self.queue = SlotQueue(self.control.buffer, at + _DONE, _QUEUE_ITEMS)
        self.spinner = Word(self.control.buffer, _SPINNER)
        self.me = worker + 1  # as the spinner word names it
        self.worker = worker
        self.memories: dict[int, StageMemory] = {}
        self.dtypes: dict[tuple, np.dtype] = {}  # see _dataset

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
                return _decode_item(item)
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
        memory_id, part, parts, spec = task
        memory = self.memories[memory_id]
        if parts > 1:
            self._run_part(task, memory)
            return
        if spec is None:
            spec = from_wire(memory.request())
        execute(spec, self._dataset(spec), memory)
        memory.state.store(DONE)
        self.done.fetch_add(1)

    def _dataset(self, spec: ReadSpec) -> h5py.Dataset:
        """The dataset ``spec`` reads, with ``spec.dtype`` filled in: worked out once per job
        (h5py builds a dataset's dtype anew each time it is asked, ~2 us)."""
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
                spec = from_wire(memory.request(part, parts))
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
        ErrorBox(self.control.buffer, _errors_at(self.n_procs), _ERROR_BYTES).put(exc, where)


def _errors_at(n_procs: int) -> int:
    return _WORKERS + _PER_WORKER * n_procs


# A task of a worker: stage memory id, part, parts (1: the whole request), the request (None: it
# lies in the memory's header).
Task = tuple[int, int, int, "ReadSpec | None"]


def _encode_item(memory_id: int, part: int, parts: int) -> int:
    """A worker queue's item for part ``part`` of ``parts`` of the request in a stage memory."""
    return (memory_id * MAX_PARTS + part) * MAX_PARTS + (parts - 1) + 1  # 0 is NOTICE


def _decode_item(item: int) -> Task:
    rest, parts = divmod(item - 1, MAX_PARTS)
    memory_id, part = divmod(rest, MAX_PARTS)
    return memory_id, part, parts + 1, None


class Reader:
    """Random access to the datasets of one HDF5 file, read by worker processes.

    Parameters
    ----------
    filename : str or path
        The HDF5 file; opened (read-only) by ``get_dataset``, so a missing file raises there.
    n_procs : int, optional
        Worker processes serving requests. By default the CPUs this process may run on
        (``os.sched_getaffinity``), at most 4.
    start_method : {'fork', 'spawn', 'forkserver'}, optional
        How workers start; fork by default.
    allow_pickle : bool
        Unpickle the object rows of PyTables ``VLArray``s of ``ObjectAtom`` (their bytes are
        pickles, and unpickling runs whatever code the file holds). Off by default, as for
        ``np.load``: reading such rows then raises an error that names this flag. Pass True
        only for files you trust.
    **kw
        Passed to ``h5py.File`` in the caller and in every worker.

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os, multitables
    >>> path = os.path.join(tempfile.mkdtemp(), "doc.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(20).reshape(10, 2))
    >>> with multitables.Reader(path, n_procs=2) as reader:
    ...     ds = reader.get_dataset("x")
    ...     stage = ds.create_stage(4)
    ...     reader.request(ds[[7, 1, 7]], stage).get().tolist()
    [[14, 15], [2, 3], [14, 15]]
    """

    def __init__(self, filename, n_procs: int | None = None, *, start_method: str | None = None,
                 allow_pickle: bool = False, **kw):
        self.filename = os.fspath(filename)
        self.n_procs = check_positive_int(
            "n_procs", default_n_procs() if n_procs is None else n_procs)
        self.allow_pickle = bool(allow_pickle)
        self.file_kwargs = kw
        self.start_method = start_method
        # Stages alive; the memory of those closed or dropped is unmapped by the workers at the
        # next dispatch.
        self._stages: weakref.WeakValueDictionary[int, Stage] = weakref.WeakValueDictionary()
        self._ids = iter(range(1 << 50))  # of stages and of their memories
        self._closed = False
        self._forget_inherited()
        hooks.track("readers", self)

    def _forget_inherited(self) -> None:
        """No workers yet (they start with the first request). Also run in a forked child (a
        DataLoader worker, a Pool's), where the workers are the parent's: this copy starts its
        own, and every stage is mapped anew in them. See NOTE [ Worker shutdown logic ], (7)."""
        self._owner = os.getpid()
        self._workers: StandbyWorkers | None = None
        self._pool: Crew | None = None
        self._control: SharedArena | None = None
        self._errors: ErrorBox | None = None
        self._done: list[Counter] = []
        self._queues: list[SlotQueue] = []
        self._spinner: Word | None = None
        self._sent_at: list[collections.deque[float]] = []
        self._finished: list[int] = []
        self._next_check = 0.0
        # Reentrant: a failure found while dispatching closes the Reader in the same thread.
        self._lock = threading.RLock()
        self._dropped: list[tuple[int, tuple[int, ...]]] = []
        # Memory of stages that came back from results (see lending.py), by size; a result gives
        # it back through ``_returned`` in whatever thread drops its last view.
        old_spares = [m for spares in getattr(self, "_spares", {}).values() for m in spares]
        old_spares += getattr(self, "_returned", ())
        self._spares: dict[int, list[StageMemory]] = {}
        self._spare_bytes = 0
        self._returned: collections.deque[StageMemory] = collections.deque()
        # The parent's pages are shared with the process they were made in (and with every
        # other child forked from it): this copy gets pages of its own, or two processes would
        # read into the same ones; the parent's are the parent's to free.
        for memory in old_spares:
            _disown(memory)
        for stage in list(self._stages.values()):
            _disown(stage.memory)
            stage.memory = self._adopt(StageMemory.create(stage.nbytes))

    def __reduce__(self):
        # A Reader travels (to a spawned process, a Pool's task) as its arguments; the copy
        # starts its own workers lazily where it lands.
        return _rebuild_reader, (self.filename, self.n_procs, self.start_method,
                                 self.allow_pickle, self.file_kwargs)

    # ---- datasets and stages ----

    def get_dataset(self, path: str) -> DatasetProxy:
        """A proxy of the dataset at ``path``: index it to describe requests."""
        self._check_open()
        return make_proxy(self, describe(self.filename, path, self.file_kwargs))

    def _register(self, stage: Stage) -> Stage:
        self._check_open()
        stage.id = next(self._ids)
        self._stages[stage.id] = stage
        self._adopt(stage.memory)
        return stage

    def _adopt(self, memory: StageMemory) -> StageMemory:
        """Number a stage's memory for the workers, and free it everywhere when it goes."""
        memory.id = next(self._ids)
        memory.forget = weakref.finalize(memory, _forget_memory, weakref.ref(self), memory.id,
                                         memory.sent_to, memory.arena)
        return memory

    # ---- results handed over with their memory (see lending.py) ----

    def _hand_over(self, stage: Stage, view: np.ndarray) -> np.ndarray:
        """``view``, the result in ``stage``, as an array of its own: the stage's memory goes
        with it, and the stage takes spare memory (or new) for its next request."""
        with self._lock:
            memory = stage.memory
            if self._closed or stage.closed or memory.arena.closed:
                return view.copy()  # closed meanwhile: the memory is not this Reader's to lend
            stage.memory = self._spare_memory(stage.nbytes)
        return lend(view, memory, functools.partial(_take_back, weakref.ref(self)))

    def _spare_memory(self, capacity: int) -> StageMemory:
        """Memory for a stage of ``capacity`` bytes: spare when there is some, else new."""
        while self._returned:
            memory = self._returned.popleft()
            if memory.capacity == capacity and not memory.arena.closed:  # a training loop's
                memory.state.set(IDLE)
                return memory
            self._keep_spare(memory)
        spares = self._spares.get(capacity)
        if spares:
            self._spare_bytes -= capacity
            memory = spares.pop()
            memory.state.set(IDLE)
            return memory
        return self._adopt(StageMemory.create(capacity))

    def _keep_spare(self, memory: StageMemory) -> None:
        """Keep memory that came back from a result for the next stage of its size, up to
        MAX_SPARES of a size and MAX_SPARE_BYTES in all (one of each size always); free it
        otherwise."""
        capacity = memory.capacity
        spares = self._spares.setdefault(capacity, [])
        if self._closed or memory.arena.closed or len(spares) >= MAX_SPARES or (
                spares and self._spare_bytes + capacity > MAX_SPARE_BYTES):
            memory.discard()
            return
        spares.append(memory)
        self._spare_bytes += capacity

    def _check_csi(self, path: str, column: str) -> None:
        with open_file(self.filename, self.file_kwargs) as file:
            table = get_dataset(file, path)
            parent, _, name = table.name.rpartition("/")
            index = file.get(f"{parent}/_i_{name}/{column}")
            ok = (
                isinstance(index, h5py.Group)
                and "indices" in index
                and index["indices"].dtype.itemsize == 8
                and int(index.attrs.get("optlevel", 0)) == 9
                and not int(index.attrs.get("DIRTY", 0))
            )
        if not ok:
            raise ValueError(
                f"Field `{column}` must have associated a 'full' index in table `{path}`"
                " (PyTables' create_csindex); pass checkCSI=False to sort without one"
            )

    # ---- requests ----

    def request(self, key, stage: Stage | StagePool) -> Request:
        """Schedule the read that ``key`` describes into ``stage`` (or a free stage of a pool).

        ``key`` is a proxy indexed with the wanted selection (``ds[30:35]``, ``ds['col'][[1, 2]]``,
        a whole proxy for all of it), or what ``where``/``read_sorted`` return.
        """
        self._check_open()
        parts = None
        if isinstance(key, DatasetProxy):
            if key._reader is not self:
                raise ValueError(f"{key!r} belongs to another Reader")
            spec = key._spec()
            if spec.kind == ARRAY:
                parts = key._parts(self.n_procs)  # a large read: over several workers
        elif isinstance(key, ReadSpec):
            spec = key
        else:
            raise TypeError(
                f"request() takes a dataset proxy indexed with a key (reader.get_dataset(path)"
                f"[key]), got {type(key).__name__}"
            )
        request = Request(self, spec)
        if isinstance(stage, StagePool):
            claimed = stage.take(request, self._check_serving)
        elif isinstance(stage, Stage):
            stage.claim(request)
            claimed = stage
        else:
            raise TypeError(f"request() needs a stage or a stage pool, got {type(stage).__name__}")
        try:
            claimed.check_fits(spec.nbytes, spec.shape, spec.dtype)
        except Exception as exc:
            # Raised by get(), as for errors found by workers; the stage is free again.
            request._error = exc
            claimed.free()
            return request
        try:
            self._dispatch(claimed, parts or [spec])
        except BaseException:
            claimed.free()
            raise
        request._stage = claimed
        return request

    def _dispatch(self, stage: Stage, specs: list[ReadSpec]) -> None:
        """Hand the read (or its parts, one per worker) to workers: written into the stage's
        header, the stage pushed onto the worker's queue (``_pick_worker``). See NOTE [ Worker
        shutdown logic ], step (3): every send and push waits in slices and gives up once a
        worker dies or this Reader closes."""
        messages = [to_wire(spec) for spec in specs]
        parts = len(specs)
        with self._lock:
            self._check_open()
            if self._pool is None:
                self._pool = self._start()
            elif time.monotonic() > self._next_check:
                self._check()  # a dead worker among live ones never times a wait out
            several = self.n_procs > 1  # else there is no choice to make, nor to keep track of
            if parts == 1:
                workers = [self._pick_worker(self._pending())] if several else [0]
            else:
                busy = self._pending()
                workers = sorted(range(self.n_procs), key=busy.__getitem__)[:parts]
                stage.memory.parts_done.store(0)
                stage.memory.parts_failed.store(0)
            while self._dropped:
                memory_id, holders = self._dropped.pop()
                for w in holders:
                    self._tell(w, ("drop", memory_id))
            memory = stage.memory
            for worker in workers:
                if worker not in memory.sent_to:
                    self._tell(worker, ("map", memory.id, memory.arena))
                    memory.sent_to.add(worker)
            memory.state.set(PENDING)
            part = 0
            try:
                for part, (worker, spec, message) in enumerate(
                        zip(workers, specs, messages, strict=True)):
                    if memory.put_request(message, part, parts):
                        self._push(worker, _encode_item(memory.id, part, parts))
                    else:
                        self._tell(worker, ("read", memory.id, spec, part, parts))
                    if several:
                        self._sent_at[worker].append(time.monotonic())
            except BaseException:
                if part == 0:  # no worker has any of it: the stage is free again
                    memory.state.set(IDLE)
                raise

    def _pending(self) -> list[int]:
        """The requests each worker has not finished."""
        busy = []
        for w, done in enumerate(self._done):
            sent_at, finished = self._sent_at[w], done.load()
            for _ in range(finished - self._finished[w]):
                sent_at.popleft()
            self._finished[w] = finished
            busy.append(len(sent_at))
        return busy

    def _pick_worker(self, busy: list[int]) -> int:
        """The worker for the next request: an awake one (it has requests pending, or it is
        watching its queue), unless the oldest it has pending was sent WAKE_AFTER ago (a slow
        read: the next request should not wait behind it); then the least busy. Waking a
        sleeping worker costs both processes tens of microseconds, and on a machine whose cores
        the caller and one worker keep busy a second worker only takes CPU from them: it is
        woken when the awake ones fall behind."""
        watching = self._spinner.load() - 1 if self._spinner is not None else -1
        awake = [w for w, pending in enumerate(busy) if pending or w == watching]
        if awake:
            worker = min(awake, key=busy.__getitem__)
            if not busy[worker] or time.monotonic() - self._sent_at[worker][0] < WAKE_AFTER:
                return worker
        return busy.index(min(busy))

    def _tell(self, worker: int, message) -> None:
        """Announce ``message`` with a NOTICE, and send it down the worker's channel."""
        pool = self._pool
        assert pool is not None
        self._push(worker, NOTICE)

        def check() -> None:  # between the slices of a send the worker does not take
            self._check_open()
            pool.check()

        try:
            pool.send(worker, message, check)
        except SubprocessException:
            self.close(wait=False)
            raise
        except OSError:
            self._check()  # a dead worker closed its end: say which one
            raise

    def _push(self, worker: int, item: int) -> None:
        """Queue ``item`` for ``worker``; a full queue (1,024 items pending) is waited on."""
        queue = self._queues[worker]
        while True:
            try:
                queue.push(item)
                return
            except OverflowError:
                self._check()
                time.sleep(QUEUE_FULL_WAIT)

    def _start(self) -> Crew:
        """Lend ``n_procs`` workers, started now or standing by, to this Reader's one job."""
        n = self.n_procs
        self._control = SharedArena(_errors_at(n) + _ERROR_BYTES, name="multitables-reader")
        buffer = self._control.buffer
        at = [_WORKERS + _PER_WORKER * i for i in range(n)]
        self._spinner = Word(buffer, _SPINNER)
        self._done = [Counter(buffer, a) for a in at]
        self._queues = [SlotQueue(buffer, a + _DONE, _QUEUE_ITEMS, True) for a in at]
        self._errors = ErrorBox(buffer, _errors_at(n), _ERROR_BYTES)
        self._sent_at = [collections.deque() for _ in range(n)]  # of each request pending
        self._finished = [0] * n  # each worker's count of finished requests, last seen
        if self._workers is None:
            self._workers = StandbyWorkers(self.start_method, "Reader", niceness=0)
        job = _RequestJob(self.filename, self.file_kwargs, n, self._control)
        return self._workers.run(job, n)

    def _check(self) -> None:
        """Raise if the workers failed; called between the slices of every wait."""
        if self._closed:
            raise ClosedError("the reader was closed while a request was pending")
        if self._errors is not None and self._errors.full():
            exc = self._errors.exception()
            self.close(wait=False)
            raise exc
        self._next_check = time.monotonic() + timeouts.CHECK_INTERVAL
        if self._pool is None:
            return
        try:
            self._pool.check()
        except SubprocessException:
            self.close(wait=False)
            raise

    def _check_serving(self) -> None:
        """Raise if this Reader can no longer serve (closed, or its workers failed)."""
        with self._lock:
            self._check()

    def _check_open(self, what: str = "this Reader") -> None:
        if self._closed:
            raise ClosedError(f"{what} of {self.filename} is closed")

    # ---- shutdown ----

    def close(self, wait: bool = False) -> None:
        """Stop the workers and free every stage. Idempotent; no worker outlives the call.

        With ``wait``, workers may finish the read they are doing (up to JOIN_TIMEOUT, 2 s);
        without it, any still busy after STOP_GRACE (0.2 s) are killed. See NOTE [ Worker
        shutdown logic ], steps (4), (5).
        """
        if self._closed:
            return
        self._closed = True  # a send blocked in another thread gives up within a slice
        hooks.untrack("readers", self)
        if os.getpid() != self._owner:
            return  # in a forked copy of the owner: not our workers
        locked = self._lock.acquire(timeout=2 * timeouts.JOIN_TIMEOUT)
        try:
            if self._pool is not None:
                for worker in range(self.n_procs):
                    self._queues[worker].close()  # the worker ends its job once it is drained
                self._pool.end()
                self._pool.stop(
                    join_timeout=timeouts.JOIN_TIMEOUT if wait else timeouts.STOP_GRACE)
                self._pool = None
            if self._workers is not None:
                self._workers.close()
                self._workers = None
            if self._control is not None:
                # Drop the views first: a mapping with views left lives as long as this object.
                self._done, self._queues, self._errors = [], [], None
                self._spinner = None
                self._control.close()
        finally:
            if locked:
                self._lock.release()
        for stage in list(self._stages.values()):
            stage.close()
        self._stages.clear()
        for spares in self._spares.values():
            for memory in spares:
                memory.discard()
        self._spares.clear()
        while self._returned:
            self._returned.popleft().discard()

    def stop(self) -> None:
        """Close without waiting for the workers to finish their current reads."""
        self.close(wait=False)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close(wait=False)


def _rebuild_reader(filename, n_procs, start_method, allow_pickle, file_kwargs) -> Reader:
    return Reader(filename, n_procs, start_method=start_method, allow_pickle=allow_pickle,
                  **file_kwargs)


def _close_live_readers() -> None:  # See NOTE [ Worker shutdown logic ], step (6).
    for reader in hooks.tracked("readers"):
        reader.close(wait=False)


def _forget_inherited_readers() -> None:  # See NOTE [ Worker shutdown logic ], step (7).
    for reader in hooks.tracked("readers"):
        reader._forget_inherited()


hooks.on_exit("readers", _close_live_readers)
hooks.on_fork("readers", after_in_child=_forget_inherited_readers)


def _forget_memory(reader_ref, memory_id: int, sent_to: set[int], arena: SharedArena) -> None:
    """A stage's memory was discarded or collected: free it here, and in the workers that mapped
    it."""
    arena.close()
    reader = reader_ref()
    if reader is not None and not reader._closed and sent_to:
        reader._dropped.append((memory_id, tuple(sent_to)))


def _take_back(reader_ref, memory: StageMemory) -> None:
    """A result handed over with ``memory`` went (in any thread): the Reader may reuse it."""
    reader = reader_ref()
    if reader is None or reader._closed or len(reader._returned) >= MAX_SPARES:
        memory.discard()  # an idle Reader keeps no more than it would keep spare
    else:
        reader._returned.append(memory)  # taken in hand under the Reader's lock


def _disown(memory: StageMemory) -> None:
    """In a forked child: unmap the parent's stage memory here only (the parent frees it)."""
    if isinstance(memory.forget, weakref.finalize):
        memory.forget.detach()
    memory.forget = None
    memory.close()
