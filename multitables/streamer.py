"""Sequential streaming of a dataset in blocks of rows, read in parallel into a ring of slots."""

from __future__ import annotations

import collections
import itertools
import os
import threading
import weakref

import numpy as np

from ._engine import hooks, timeouts
from ._engine.pool import StandbyWorkers
from ._engine.ring import FilledSlots, Ring
from ._hdf5.remote import file_of, keywords_of, location_of, name_of
from ._hdf5.source import (
    check_positive_int,
    check_rows,
    default_n_procs,
    describe,
    get_dataset,
    open_file,
)
from ._streamer.job import StreamJob, StreamPlan, slot_arrays
from .errors import ClosedError, QueueClosed

__all__ = ["Guard", "Queue", "Streamer"]

# A consumer that outpaces its workers sleeps until this many slots are filled (see _wake_batch).
WAKE_BATCH = 2

class Guard:
    """Reserves one block of a queue; ``with guard as block`` gives a zero-copy view of it.

    The view is valid until the ``with`` block exits, which hands the block back (also when the
    block raises). Copy the data (``block.copy()``) to keep it longer.
    """

    __slots__ = ("_queue", "_slot", "_rows", "_owner")

    def __init__(self, queue: Queue, slot: int, rows: slice, owner: int):
        self._queue = queue
        self._slot = slot
        self._rows = rows
        self._owner = owner  # the thread that got it

    def __enter__(self) -> np.ndarray:
        if self._slot < 0:
            raise RuntimeError("this guard has already been released")
        return self._queue._view(self._slot, self._rows)

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        slot, self._slot = self._slot, -1
        if slot >= 0:
            self._queue._release(slot, self._owner)

    def __del__(self) -> None:
        self.release()


class Queue:
    """A stream of blocks of one dataset. Made by ``Streamer.get_queue``; see its docstring."""

    def __init__(
        self, plan: StreamPlan, ring: Ring, n_procs: int, ordered: bool, workers: StandbyWorkers
    ):
        self.block_size = plan.block_size
        self._plan = plan
        self._ordered = ordered
        self._ring = ring
        # Guards the delivery state below; reentrant: a failure found in get() closes the queue.
        self._lock = threading.RLock()
        self._next_ticket = 0  # slot tickets handed to this process so far
        self._stash: dict[int, int] = {}  # ordered mode: ticket -> slot that came early
        self._slot = -1  # the slot whose blocks are being handed out
        self._next_row = 0  # its next block's first row
        self._slot_rows = 0  # its number of rows
        # Blocks of each slot not yet released; the slot goes back to the workers at zero. One
        # lock for every change: get() and releases run in different threads.
        self._refs = [0] * ring.layout.n_slots
        self._guards: collections.Counter[int] = collections.Counter()  # live guards per thread
        self._refs_changed = threading.Condition()
        self._closed = False
        self._slots = slot_arrays(plan, ring)
        self._owner = os.getpid()
        self._n_procs = n_procs
        self._pool = workers.run(StreamJob(plan), n_procs)
        self._filled = FilledSlots(ring, self._pool.check)
        hooks.track("queues", self)  # only once it has workers to stop

    def get(self):
        """The next block's ``Guard``, or ``QueueClosed`` once the stream has ended.

        After the end every call returns ``QueueClosed`` again (the sentinel of multitables
        2.0.1, kept for its users); ``queue.iter()`` is the documented way to read a queue, and
        ``multitables.Loader`` the one to feed a training loop.

        Blocks until a block is ready. Safe to call from several threads: each block goes to
        exactly one caller. Raises the worker's exception if a read failed, and
        ``SubprocessException`` if a worker died.
        """
        with self._lock:
            if self._closed:
                return QueueClosed
            if self._next_row >= self._slot_rows:
                if not self._next_slot():
                    return QueueClosed
            start = self._next_row
            self._next_row = stop = min(start + self.block_size, self._slot_rows)
            slot, owner = self._slot, threading.get_ident()
            with self._refs_changed:
                self._refs[slot] += 1
                self._guards[owner] += 1
        return Guard(self, slot, slice(start, stop), owner)

    def _copied_slots(self):
        """The rows of each filled slot in turn, copied: the generator's path, with one hand-over
        per slot (about 1 MiB) and no guards."""
        while True:
            with self._lock:
                if self._closed or not self._next_slot():
                    return
                slot, self._slot = self._slot, -1
                rows = self._slots[slot][: self._slot_rows].copy()
                self._next_row = self._slot_rows = 0
                self._release(slot, None)
            yield rows

    def iter(self):
        """Iterate over the guards of the remaining blocks."""
        while (guard := self.get()) is not QueueClosed:
            yield guard

    def __iter__(self):
        return self.iter()

    def _next_slot(self) -> bool:
        """Move on to the next filled slot; False once the stream has ended."""
        if os.getpid() != self._owner:  # the ring is the owner's: its blocks are not ours to take
            raise RuntimeError(
                f"this queue streams to process {self._owner}, not to its forked copy "
                f"{os.getpid()}: make the queue in this process (a Streamer copied by fork or "
                "pickle starts workers of its own)"
            )
        if self._slot >= 0:
            self._release(self._slot, None)  # the reference kept while handing out its blocks
            self._slot = -1
        if self._closed:
            return False
        ticket = self._next_ticket
        end = self._plan.n_slot_tickets
        if end is not None and ticket >= end:
            return False
        if ticket not in self._stash:
            self._wait_for_a_free_slot()
        self._next_ticket += 1
        if self._ordered:
            while ticket not in self._stash:
                slot = self._pop()
                if slot < 0:
                    return False
                self._stash[int(self._ring.headers[slot, 0])] = slot
            slot = self._stash.pop(ticket)
        else:
            slot = self._pop()
            if slot < 0:
                return False
        self._slot, self._next_row = slot, 0
        self._slot_rows = int(self._ring.headers[slot, 1])
        with self._refs_changed:
            self._refs[slot] += 1
        return True

    def _wait_for_a_free_slot(self) -> None:
        """Wait while guards hold every slot; raise if they are all this thread's own, which
        would wait for ever."""
        with self._refs_changed:
            while self._refs.count(0) - len(self._stash) <= 0 and not self._closed:
                if self._guards[threading.get_ident()] == sum(self._guards.values()):
                    raise RuntimeError(
                        f"all {len(self._refs)} slots (read_ahead) are held by guards this "
                        "thread has not released; exit their `with` blocks or raise read_ahead"
                    )
                self._refs_changed.wait(timeouts.WAIT_SLICE)

    def _pop(self) -> int:
        """The next filled slot, or a negative number once the stream is stopped or closed."""
        # A failed read or a dead worker closes the queue before it is raised.
        return self._filled.pop(self._wake_batch(), self._is_closed, self.close)

    def _is_closed(self) -> bool:
        return self._closed

    def _wake_batch(self) -> int:
        """How many filled slots to sleep for when none is ready: a consumer that keeps up with
        its workers then wakes once per WAKE_BATCH slots. Never more than can come while it
        sleeps (the slots left in the stream, the slots not held by guards) less one slot per
        worker, so that no worker waits for a free slot meanwhile."""
        if self._ordered or WAKE_BATCH == 1:
            return 1
        batch = min(WAKE_BATCH, self._refs.count(0) - self._n_procs)
        end = self._plan.n_slot_tickets
        if end is not None:
            batch = min(batch, end - self._next_ticket + 1)
        return max(1, batch)

    def _view(self, slot: int, rows: slice) -> np.ndarray:
        with self._refs_changed:  # close() empties the slots under this lock
            if self._closed:
                raise ClosedError("the queue was closed; its blocks are gone")
            return self._slots[slot][rows]

    def _release(self, slot: int, owner: int | None) -> None:
        with self._refs_changed:
            self._refs[slot] -= 1
            if owner is not None:
                self._guards[owner] -= 1
            free = self._refs[slot] == 0
            if free and not self._closed:
                self._ring.free.push(slot)
            self._refs_changed.notify_all()

    def close(self) -> None:
        """Stop reading, free the shared memory and hand the workers back to the Streamer, where
        they stand by for its next queue. Idempotent, and safe from any thread, also while
        others wait in ``get()`` (they get ``QueueClosed``) or hold guards (their ``with``
        raises ``ClosedError``). See NOTE [ Worker shutdown logic ], step (4)."""
        with self._refs_changed:
            if self._closed:
                return
            self._closed = True
            self._refs_changed.notify_all()  # wakes a get() waiting for a free slot
        hooks.untrack("queues", self)
        if os.getpid() != self._owner:
            return  # in a forked copy of the owner (a DataLoader worker): not our stream
        self._ring.stop()  # wakes a get() waiting for a full slot; it sees the queue closed
        with self._lock:  # every get() has left: nobody indexes the slots any more
            self._pool.stop()
            with self._refs_changed:
                self._slots = []
            self._stash.clear()
            self._ring.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and hasattr(self, "_pool"):
            self.close()


class Streamer:
    """Streams datasets of one HDF5 file in blocks, read in parallel by worker processes.

    The workers start with the first queue and stand by between queues (idle, with no file open,
    below the caller's CPU priority), so each later pass, an epoch, starts without starting
    processes. ``close()``, the end of a ``with`` block or garbage collection ends them.

    Parameters
    ----------
    filename : str or path
        The HDF5 file: a path, or a URL (``s3://bucket/key.h5``, ``http(s)://...``). It is
        opened (read-only) when a queue or generator is made, so a missing file raises there, in
        the caller.
    start_method : {'fork', 'spawn', 'forkserver'}, optional
        How workers start; fork by default.
    storage_options : dict, optional
        How to reach a URL: ``endpoint_url``, ``key``, ``secret``, ``token``, ``region``,
        ``anon``, ``headers``, ``timeout``, ``retries`` (S3 settings default from the AWS
        environment). Checked here; ignored for a path.
    cache_dir : str or path, optional
        Keep the byte ranges read from a URL (and its chunk maps) on this local disk, so later
        passes read them from there. Its own keyword (not in ``storage_options``); ignored for
        a path.
    cache_limit : int, optional
        Bytes the cache may hold (least recently used out first); 10 GiB by default.
    **kw
        Passed to ``h5py.File`` in every worker (e.g. ``driver``, ``rdcc_nbytes``).

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os, multitables
    >>> path = os.path.join(tempfile.mkdtemp(), "doc.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(10.0))
    >>> blocks = []
    >>> with multitables.Streamer(path) as stream:
    ...     with stream.get_queue("x", n_procs=2, block_size=4, ordered=True) as queue:
    ...         for guard in queue.iter():
    ...             with guard as block:
    ...                 blocks.append(block.copy())
    ...     tail = stream.get_remainder("x", queue.block_size)
    >>> [b.tolist() for b in blocks], tail.tolist()
    ([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]], [8.0, 9.0])
    """

    def __init__(self, filename, *, start_method: str | None = None, storage_options=None,
                 cache_dir=None, cache_limit: int | None = None, **kw):
        # A path as it always was, or a URL's RemoteFile, pinned to its version at first use.
        self._file = file_of(filename, storage_options, cache_dir, cache_limit)
        self.filename = name_of(self._file)
        self.file_kwargs = kw
        self.start_method = start_method
        self._queues: weakref.WeakSet[Queue] = weakref.WeakSet()
        # Started by the first queue, kept for the next ones until close(). A forked copy (a
        # DataLoader worker) starts its own: see hooks.FORK_CHILD_ORDER.
        self._workers = StandbyWorkers(start_method, "Streamer")

    def __reduce__(self):
        # A Streamer travels (to a spawned process, a Pool's task) as its arguments; the copy
        # starts its own workers with its first queue.
        return _rebuild_streamer, (location_of(self._file), self.start_method, self.file_kwargs,
                                   keywords_of(self._file))

    def get_queue(
        self,
        path: str,
        n_procs: int | None = None,
        read_ahead: int | None = None,
        cyclic: bool = False,
        block_size: int | None = None,
        ordered: bool = False,
        field: str | None = None,
        remainder: bool = False,
    ) -> Queue:
        """Start workers streaming ``path`` and return the queue of its blocks.

        Unless ``remainder=True``, the last rows that do not fill a whole block are not streamed:
        ``get_remainder(path, queue.block_size)`` returns them. Iterate with ``queue.iter()``
        (or ``for guard in queue``), which ends with the stream.

        Parameters
        ----------
        path : str
            The dataset inside the file.
        n_procs : int, optional
            Worker processes reading in parallel. By default the CPUs this process may run on
            (``os.sched_getaffinity``), at most 4.
        read_ahead : int, optional
            Slots in the ring, ``2 * n_procs + 1`` by default. A slot holds one block, or several
            consecutive small blocks read together (about 1 MiB in all), so that tiny blocks cost
            one HDF5 read and one hand-over per slot rather than per block.
        cyclic : bool
            Wrap around the end forever; the block that crosses the end joins the last rows and
            the first ones.
        block_size : int, optional
            Rows per block. By default a whole number of chunks of at least 1 MiB (about 1 MiB of
            rows for contiguous datasets), at most the dataset's length.
        ordered : bool
            Deliver blocks in file order (otherwise as they become ready).
        field : str, optional
            Stream one field of a compound dataset (a PyTables table column).
        remainder : bool
            Also stream the last, shorter block. Without it, ``get_remainder`` returns those rows.
        """
        n_procs = check_positive_int("n_procs", default_n_procs() if n_procs is None else n_procs)
        read_ahead = check_positive_int(
            "read_ahead", 2 * n_procs + 1 if read_ahead is None else read_ahead
        )
        info = describe(self._file, path, self.file_kwargs)
        check_rows(info.path, info.filename, info.shape, info.vlen_base, empty=False,
                   vlen=", which do not fit fixed blocks; read it with multitables.Reader")
        plan = StreamPlan.build(info, self.file_kwargs, field, block_size, read_ahead,
                                cyclic=cyclic, remainder=remainder)
        ring = Ring.create(read_ahead, plan.slot_bytes)
        plan.arena, plan.layout = ring.arena, ring.layout
        try:
            queue = Queue(plan, ring, n_procs, ordered, self._workers)
        except BaseException:
            ring.stop()
            ring.close()
            raise
        self._queues.add(queue)
        return queue

    def get_generator(
        self,
        path: str,
        n_procs: int | None = None,
        read_ahead: int | None = None,
        cyclic: bool = False,
        block_size: int | None = None,
        ordered: bool = False,
        field: str | None = None,
        remainder: bool = True,
    ):
        """Yield the rows of ``path`` one at a time, as copies that stay valid.

        Same parameters as ``get_queue``; the last, shorter block is included by default. Closing
        the generator (or breaking out of a loop over it and dropping it) stops its reads and
        hands its workers back to the Streamer.
        """
        queue = self.get_queue(path, n_procs, read_ahead, cyclic, block_size, ordered, field,
                               remainder)
        return _Rows(queue)

    def get_remainder(self, path: str, block_size: int, field: str | None = None) -> np.ndarray:
        """The rows a non-cyclic stream of ``block_size`` leaves out at the end (a copy)."""
        block_size = check_positive_int("block_size", block_size)
        with open_file(self._file, self.file_kwargs) as file:
            ds = get_dataset(file, path)
            check_rows(ds.name, self.filename, ds.shape)
            n = ds.shape[0]
            start = n - n % block_size
            return ds.fields(field)[start:n] if field is not None else ds[start:n]

    def close(self) -> None:
        """Close every queue and generator made by this streamer and end its workers (a later
        queue starts new ones). Idempotent."""
        for queue in list(self._queues):
            queue.close()
        self._workers.close()
        self._workers = StandbyWorkers(self.start_method, "Streamer")

    def __enter__(self) -> Streamer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _rebuild_streamer(filename, start_method, file_kwargs, remote=None) -> Streamer:
    return Streamer(filename, start_method=start_method, **(remote or {}), **file_kwargs)


class _Rows:
    """The generator of ``get_generator``: rows as copies; ``close()`` closes the queue even
    before the first row (a plain generator's close would not reach its body then)."""

    def __init__(self, queue: Queue):
        self._queue = queue
        self._block_rows = iter(())  # the rows of the block being handed out
        # Rows come straight from each block's iterator: no Python frame runs per row.
        self._rows = itertools.chain.from_iterable(self._blocks())

    def _blocks(self):
        for rows in self._queue._copied_slots():
            self._block_rows = iter(rows)
            yield self._block_rows
        self._queue.close()

    def __iter__(self):
        return self._rows

    def __next__(self):
        return next(self._rows)

    def close(self) -> None:
        self._queue.close()
        collections.deque(self._block_rows, maxlen=0)  # so no row follows close() either

    def __del__(self) -> None:
        self.close()
