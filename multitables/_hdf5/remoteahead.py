"""Reads of whole rows of a file in an object store into a ring's slots, fetched ahead in the
background: the Loader's units and the Streamer's slots over a URL (internal).

A worker that reads one slot at a time waits a round trip for each, and decodes nothing
meanwhile (a unit of 64 gzip images decodes in 0.6 ms behind 20 ms of latency). Here a worker
that takes a free slot also takes the tickets of every slot free now, hands them to
``RowsAhead.run`` and goes back for more: the stored bytes of those slots, of every dataset,
are one ``Fetcher.start`` (neighbours merged, several GETs in flight), each chunk decoded into
its place by the fetch thread whose GET brought it, and each slot handed over full as soon as
its rows are in. A worker keeps at most ``AHEAD_BYTES`` of rows in flight, so that every
worker of a job takes its share of the slots (and of their decoding).

Over many files (a Loader over shards), each slot's rows lie in one file and name it
(``FileReads``): the slots taken at once may lie in several, one ``Fetcher.start`` each, within
the one budget of the worker.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import h5py
import numpy as np

from .._engine import timeouts
from .._engine.ring import TIMEOUT, Ring
from .._keys._indexing import translate
from .fallback import Undecodable
from .hyperslab import read_selection
from .libraries import DECODE_ERRORS
from .rawread import RawRows
from .remote import file_of_dataset
from .remotechunks import RemoteChunkRows
from .remoteread import RemoteRows

# Bytes of rows a worker keeps in flight: 128 Loader units of 64 gzip images of 4 KiB (about
# 14 MB stored), or four Streamer slots; enough to cover a round trip of 20 ms and a 1 MiB
# body at 50 MB/s a connection at the rate two cores decode. Half of it left the gzip Streamer
# waiting for its GETs (7% slower over a URL at 20 ms); twice it gains nothing (bench/README.md,
# "Remote files").
AHEAD_BYTES = 32 << 20
# A worker at the limit waits until no more than this is in flight, then takes the slots free
# by then at once: their requests share GETs (a GET costs the client and the server about
# 0.5 ms of CPU together, as much as decoding a unit).
AHEAD_LOW_BYTES = AHEAD_BYTES // 2
_MADV_POPULATE_WRITE = 23  # Linux 5.14; older kernels say EINVAL
_madvise: Any = None  # libc's madvise once looked up; False where there is none to use

# Fetch threads a worker starts before its first slots: about the GETs of AHEAD_BYTES of gzip
# images in 1 MiB GETs, and a few more for the other columns' ranges.
AHEAD_THREADS = 16

# One slot's rows: pieces (start, stop, one destination per dataset), with the slot's header,
# and the file they lie in (None: the one file of the RowsAhead).
Piece = tuple[int, int, Sequence[np.ndarray]]
Read = tuple[list[Piece], int, "FileReads | None"]
Pieces = Callable[[int, int], Read]
# What a job is told of a read that failed: the error, the ticket, and the dataset whose read
# through HDF5 raised it (None when a GET failed).
Failed = Callable[[BaseException, int, "int | None"], None]


class FileReads:
    """The datasets of one file in an object store that a worker reads ahead, their fast paths
    (``parts``; None where HDF5 reads every slot, on the worker's thread for such reads) and
    the file's fetcher; ``busy`` counts its slots in flight (guarded by the ``RowsAhead``)."""

    def __init__(self, datasets: Sequence[h5py.Dataset],
                 parts: Sequence[RemoteRows | RemoteChunkRows] | None, fetcher: Any):
        self.datasets, self.fetcher = list(datasets), fetcher
        self.parts = None if parts is None else list(parts)
        self.busy = 0

    @classmethod
    def of(cls, datasets: Sequence[h5py.Dataset]) -> FileReads | None:
        """The reads ahead of ``datasets``; None unless they all come from one object store
        and all have a fast path (unfiltered rows, or chunks any fetch thread can decode)."""
        files = [file_of_dataset(d) for d in datasets]
        if not files or files[0] is None or any(f is not files[0] for f in files):
            return None
        parts: list[RemoteRows | RemoteChunkRows] = []
        for d in datasets:
            part = RawRows.of(d)
            if not isinstance(part, (RemoteRows, RemoteChunkRows)):
                return None
            parts.append(part)
        return cls(datasets, parts, files[0].fetcher())

    @classmethod
    def any(cls, datasets: Sequence[h5py.Dataset]) -> FileReads:
        """``of(datasets)``, else HDF5's reads of them (a local file, a filter no fetch thread
        decodes): over many files, every slot names a file either way."""
        return cls.of(datasets) or cls(datasets, None, None)


class RowsAhead:
    """Whole rows of datasets in an object store read into a ring's slots in the background:
    those of one file (``of``), or of the file each slot names (``many``). See the module doc,
    and NOTE [ Worker shutdown logic ] in multitables/_engine/pool.py: a job that uses it waits
    in ``wait_for_room`` with the checks of its ``next_task``, and ``close`` waits for every
    read it started (each bounded by the source's timeout and retries) before the job ends."""

    def __init__(self, file: FileReads | None):
        self.file = file
        self.in_flight = 0  # bytes of rows started and not yet in their slots
        self._room = threading.Condition()
        self._slow: concurrent.futures.ThreadPoolExecutor | None = None
        self._pid = 0

    @classmethod
    def of(cls, datasets: Sequence[h5py.Dataset]) -> RowsAhead | None:
        """The reads ahead of ``datasets`` of one file (``FileReads.of``), or None."""
        file = FileReads.of(datasets)
        if file is None:
            return None
        # The GETs of the first slots a job takes start at once: their threads are started
        # here, while the worker is idle (``Fetcher.prestart``); a worker's next job finds them.
        file.fetcher.prestart(AHEAD_THREADS)
        return cls(file)

    @classmethod
    def many(cls) -> RowsAhead:
        """Reads ahead whose slots each name their file (``Read``)."""
        return cls(None)

    def idle(self, file: FileReads) -> bool:
        """Whether no slot of ``file`` is in flight (then it may close)."""
        with self._room:
            return not file.busy

    def wait_for_room(self, give_up: Callable[[], bool]) -> bool:
        """Wait until reads may start (True): at once below ``AHEAD_BYTES`` in flight, else
        once no more than ``AHEAD_LOW_BYTES`` are, checking ``give_up()`` every
        ``timeouts.WAIT_SLICE`` s (False once it says so)."""
        with self._room:
            if self.in_flight < AHEAD_BYTES:
                return True
            while self.in_flight > AHEAD_LOW_BYTES:
                if give_up():
                    return False
                self._room.wait(timeouts.WAIT_SLICE)
        return True

    def run(self, ring: Ring, task: tuple[int, int], end: int | None, pieces: Pieces,
            failed: Failed) -> None:
        """Start reading the rows of ``task`` (a free slot and its ticket) and of the slots
        free now (their tickets taken from ``ring`` below ``end``; None: endless), up to
        ``AHEAD_BYTES`` in flight, and return. ``pieces(slot, ticket)`` says what a slot
        holds; each slot is handed over full once its rows are in, or ``failed(error, ticket,
        dataset)`` is called for the first that cannot be read."""
        slots: list[tuple[int, int]] = []
        reads: list[tuple[list[Piece], int, FileReads]] = []
        nbytes: list[int] = []
        try:
            self._take(task, pieces(*task), slots, reads, nbytes)
            while not ring.stopped and (end is None or ring.tickets.load() < end):
                if self.in_flight >= AHEAD_BYTES:
                    break
                slot = ring.free.try_pop()
                if slot == TIMEOUT:
                    break
                ticket = ring.tickets.fetch_add(1)
                if end is not None and ticket >= end:
                    ring.free.push(slot)
                    break
                try:
                    self._take((slot, ticket), pieces(slot, ticket), slots, reads, nbytes)
                except Exception as exc:
                    # A later ticket's (over many files, its file's open): the job fails
                    # naming it, not ``task``. Nothing started; its ring stops.
                    self._release(sum(nbytes), [file for _, _, file in reads])
                    failed(exc, ticket, None)
                    return
        except BaseException:
            # Nothing started: the job fails (its ring stops).
            self._release(sum(nbytes), [file for _, _, file in reads])
            raise
        _Reads(self, ring, slots, reads, nbytes, failed).start()
        # While the GETs wait for their first bytes, the slots' pages are mapped here: the
        # fetch threads would fault them in one at a time as they decode, on the cores the
        # decoding needs (a new ring's every page, 8,000 for a 32 MB pass).
        prefault(d for pieces, _, _ in reads for _, _, dests in pieces for d in dests)

    def _take(self, task: tuple[int, int], read: Read, slots: list, reads: list,
              nbytes: list[int]) -> None:
        pieces, n, file = read
        file = file or self.file
        assert file is not None, "a RowsAhead.many() slot names its file"
        slots.append(task)
        reads.append((pieces, n, file))
        nbytes.append(_bytes(pieces))
        with self._room:
            self.in_flight += nbytes[-1]
            file.busy += 1

    def _release(self, nbytes: int, files: Iterable[FileReads] = ()) -> None:
        with self._room:
            self.in_flight -= nbytes
            for file in files:
                file.busy -= 1
            self._room.notify_all()

    def read_again(self, job: Callable[[], None]) -> None:
        """Run ``job`` (a read through HDF5) on this worker's one thread for such reads: never
        on a fetch thread, whose pool such a read needs."""
        if self._slow is None or self._pid != os.getpid():
            self._slow = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="multitables-again")
            self._pid = os.getpid()
        self._slow.submit(job)

    def close(self) -> None:
        """Wait for every started read, then stop this worker's threads (idempotent)."""
        with self._room:
            while self.in_flight > 0:
                self._room.wait(timeouts.WAIT_SLICE)
        slow, self._slow = self._slow, None
        if slow is not None and self._pid == os.getpid():
            slow.shutdown(wait=True)


def prefault(arrays: Iterable[np.ndarray]) -> None:
    """Map the pages of ``arrays`` (C-contiguous) for writing now, a system call each, without
    changing a byte (other threads may be writing them already); nothing where the kernel lacks
    ``MADV_POPULATE_WRITE`` (before Linux 5.14) or the platform lacks ``madvise``."""
    global _madvise
    if _madvise is None:
        _madvise = _load_madvise()
    if not _madvise:
        return
    page = mmap.PAGESIZE
    for a in arrays:
        if not a.nbytes:
            continue
        start = a.ctypes.data
        first = start - start % page
        end = -(-(start + a.nbytes) // page) * page  # the pages of a mapping are whole
        if _madvise(first, end - first, _MADV_POPULATE_WRITE) != 0:
            _madvise = False  # EINVAL: an older kernel
            return


def _load_madvise() -> Any:
    if not sys.platform.startswith("linux"):
        return False
    try:
        f = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return False
    f.argtypes, f.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return f


def _bytes(pieces: list[Piece]) -> int:
    return max(1, sum(d.nbytes for _, _, dests in pieces for d in dests))


class _Reads:
    """The slots of one ``RowsAhead.run``: their requests in one ``Fetcher.start`` a file, each
    chunk decoded as it lands, each slot handed over once its last request is in."""

    def __init__(self, ahead: RowsAhead, ring: Ring, slots: list[tuple[int, int]],
                 reads: list[tuple[list[Piece], int, FileReads]], nbytes: list[int],
                 failed: Failed):
        self.ahead, self.ring, self.slots, self.reads = ahead, ring, slots, reads
        self.nbytes, self.failed = nbytes, failed
        self.pending = [0] * len(slots)  # requests of each slot not yet in
        self.again: set[int] = set()  # slots HDF5 reads: a chunk only it reads, or undecodable
        self.owner: list[int] = []  # the slot of each request
        self.actions: list[Callable[[], None] | None] = []
        self.lock = threading.Lock()
        self.over = [False] * len(slots)  # handed over, failed, or abandoned
        self.fetches = 0  # fetches started and not yet ended
        self.error: BaseException | None = None  # the first a fetch ended with
        self.failing: FileReads | None = None  # the file of that fetch

    def start(self) -> None:
        # Per file: its fetcher, its requests, and the index of each among all requests.
        by_file: dict[int, tuple[FileReads, list[tuple[int, int, Any]], list[int]]] = {}
        try:
            for i, (pieces, _, file) in enumerate(self.reads):
                if file.parts is None:
                    self.again.add(i)
                    continue
                _, requests, indices = by_file.setdefault(id(file), (file, [], []))
                for start, stop, dests in pieces:
                    for part, dest in zip(file.parts, dests, strict=True):
                        found = part.requests(start, stop, dest)
                        if found is None:
                            self.again.add(i)
                            continue
                        indices += range(len(self.owner), len(self.owner) + len(found[0]))
                        requests += found[0]
                        self.actions += found[1]
                        self.owner += [i] * len(found[0])
                        self.pending[i] += len(found[0])
            for i in range(len(self.slots)):
                if not self.pending[i] and i not in self.again:
                    self._deliver(i)  # nothing to fetch
        except BaseException as exc:  # noqa: BLE001 - the job's error, as a read's
            self._end(exc)
            return
        fetches: list[tuple[FileReads | None, list, list[int]]] = \
            list(by_file.values()) or [(None, [], [])]
        self.fetches = len(fetches)
        for k, (of, requests, indices) in enumerate(fetches):
            try:
                if of is None:
                    self._fetched(None, None)  # nothing to fetch: HDF5 reads every slot
                else:
                    of.fetcher.start(requests, functools.partial(self._landed_of, indices),
                                     functools.partial(self._fetched, of))
            except BaseException as exc:  # noqa: BLE001 - the job's error, as a read's
                for other, _, _ in fetches[k:]:  # this fetch and those not started end
                    self._fetched(other, exc)
                return

    def _landed_of(self, indices: list[int], j: int) -> None:
        self._landed(indices[j])

    def _fetched(self, file: FileReads | None, error: BaseException | None) -> None:
        """One fetch (of ``file``) is over; once all are, the reads end with the first error,
        which names a slot of the file whose fetch failed."""
        with self.lock:
            if self.error is None:
                self.error, self.failing = error, file
            self.fetches -= 1
            last = not self.fetches
        if last:
            self._end(self.error)

    def _landed(self, j: int) -> None:
        i, action = self.owner[j], self.actions[j]
        if action is not None and i not in self.again:
            try:
                action()
            except (Undecodable, *DECODE_ERRORS):
                self.again.add(i)  # HDF5 reads it, and says what is wrong
        with self.lock:
            self.pending[i] -= 1
            last = not self.pending[i]
        if last and i not in self.again:
            self._deliver(i)

    def _deliver(self, i: int) -> None:
        with self.lock:
            if self.over[i]:
                return
            self.over[i] = True
        slot, ticket = self.slots[i]
        try:
            if not self.ring.stopped:
                self.ring.headers[slot] = (ticket, self.reads[i][1])
                self.ring.full.push(slot)
        finally:
            self.ahead._release(self.nbytes[i], [self.reads[i][2]])

    def _end(self, error: BaseException | None) -> None:
        """Every GET is over: the slots HDF5 reads go to it; after an error, the first slot
        not handed over fails the job and the others are given up."""
        if error is None and self.again:
            try:
                self.ahead.read_again(self._read_again)
                return
            except BaseException as exc:  # noqa: BLE001 - no thread for it: the job's error
                error = exc
        self._close(error)

    def _read_again(self) -> None:
        """The slots a fetch thread could not decode, or that hold chunks only HDF5 reads,
        read as a worker reads without ``RowsAhead``: a chunk that cannot be read fails there
        too, and the job names it."""
        error: BaseException | None = None
        failing: int | None = None  # the dataset being read
        try:
            for i in sorted(self.again):
                for start, stop, dests in self.reads[i][0]:
                    for k, (dataset, dest) in enumerate(zip(self.reads[i][2].datasets, dests,
                                                            strict=True)):
                        failing = k
                        read_selection(dataset, translate((slice(start, stop),),
                                                          dataset.shape), dest)
                failing = None
                self._deliver(i)
        except BaseException as exc:  # noqa: BLE001 - the job's error, as a read's
            error = exc
        self._close(error, failing)

    def _close(self, error: BaseException | None, dataset: int | None = None) -> None:
        with self.lock:
            left = [i for i in range(len(self.slots)) if not self.over[i]]
            for i in left:
                self.over[i] = True
        # The slot named: one of the file whose fetch failed (over many files, the first
        # left may be another's, whose read never began).
        named = next((i for i in left if self.reads[i][2] is self.failing),
                     left[0] if left else 0)
        try:
            if left or error is not None:
                self.failed(error or RuntimeError("a read ahead ended unfinished"),
                            self.slots[named][1], dataset)
        finally:
            self.ahead._release(sum(self.nbytes[i] for i in left),
                                [self.reads[i][2] for i in left])
