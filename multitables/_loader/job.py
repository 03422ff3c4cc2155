"""The worker side of a Loader epoch: read units or batches of rows of every dataset into a ring.

Internal module. Tickets are drawn from the ring's counter, as stream workers draw blocks, and
each names what to read into a free slot:

- a **unit** (``UNITS``): a run of rows that is a whole number of HDF5 chunks of every dataset
  (``plan_units``), so reading the units of an epoch decodes each chunk once; the consumer gathers
  batches from the units in memory. The epoch's read list (unit numbers, in the order the consumer
  needs them) travels with the job.
- a **batch** (``BATCHES``): the rows of one batch, in batch order, for a window too wide to hold
  in memory on unfiltered data; rows are read straight from the file (rawread), and the row
  numbers of the whole sequence lie in a region of the arena, written once by the consumer.

Layout of the ring's slot area: one region per dataset, each holding ``n_slots * slot_rows``
whole rows, so slot ``s`` of dataset ``d`` is rows ``s * slot_rows`` onwards of region ``d``;
then, for batches, the row numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._engine import timeouts
from .._engine.ring import Ring, RingJob, RingLayout
from .._engine.shm import SharedArena, round_up
from .._engine.worker import worker_place
from .._hdf5 import rawread
from .._hdf5.badchunk import bad_chunk
from .._hdf5.chunkcache import chunk_cache
from .._hdf5.filejob import FileJob, OpenFiles
from .._hdf5.hyperslab import read_selection
from .._hdf5.mapped import MappedReads
from .._hdf5.remote import RemoteFile
from .._hdf5.remoteahead import FileReads, RowsAhead
from .._hdf5.source import DatasetInfo, OpenFile
from .._keys._indexing import translate

# Units of contiguous (unchunked) datasets: large enough for a fast pread, small enough that a
# window of them mixes well.
CONTIGUOUS_UNIT_BYTES = 256 << 10
# A unit that would be larger than this, or than a MIN_UNITS-th of the rows (the chunk rows of the
# datasets have a large least common multiple), is cut to the largest chunk instead, so that there
# are units to shuffle; chunks of other datasets may then be read twice.
MAX_UNIT_BYTES = 64 << 20
MIN_UNITS = 8


def plan_units(infos: Sequence[DatasetInfo]) -> int:
    """Rows per unit: the least common multiple of the datasets' chunk rows (see module doc)."""
    n_rows = infos[0].shape[0]
    row_bytes = sum(max(info.row_bytes, 1) for info in infos)
    chunk_rows = [info.chunk_rows for info in infos if info.chunk_rows]
    if not chunk_rows:
        return max(1, min(n_rows, CONTIGUOUS_UNIT_BYTES // row_bytes))
    rows = math.lcm(*chunk_rows)
    if rows * row_bytes > MAX_UNIT_BYTES or rows * MIN_UNITS > n_rows:
        # Whole chunks of the dataset that costs most to read: the chunks of the others may be
        # read twice, not those.
        costliest = costliest_chunk_rows(infos)
        assert costliest is not None  # some dataset is chunked
        rows = costliest
    return max(1, min(rows, n_rows))


def costliest_chunk_rows(infos: Sequence[DatasetInfo]) -> int | None:
    """Rows per chunk of the chunked dataset that costs most to read (compressed first, then
    the widest rows): the chunks that matter for reading once and for mixing well."""
    chunked = [(info.compressed, info.row_bytes, info.chunk_rows)
               for info in infos if info.chunk_rows]
    return max(chunked)[2] if chunked else None


UNITS, BATCHES = "units", "batches"


@dataclass
class LoadPlan:
    """What the workers of one epoch read: everything they need, picklable for spawn."""

    infos: list[DatasetInfo]  # the datasets, each read whole-row
    file_kwargs: dict[str, Any]
    kind: str  # UNITS or BATCHES
    slot_rows: int  # rows of every dataset per slot: the unit's, or the batch size
    n_tickets: int
    units: np.ndarray | None  # UNITS: the read list, ticket t reads unit units[t]
    n_sequence: int  # BATCHES: rows in the sequence (its row numbers lie in the arena)
    arena: SharedArena
    layout: RingLayout
    offsets: list[int]  # where each dataset's region starts in the arena, then the row numbers
    files: Any = None  # over many files: their Files (rows concatenated), read by ShardsJob
    max_open: int = 0  # over many files: files a worker keeps open at once

    @property
    def n_rows(self) -> int:
        return self.infos[0].shape[0] if self.files is None else self.files.n_rows

    def key(self, ticket: int) -> slice | np.ndarray:
        """The rows ticket ``ticket`` reads, as a key on axis 0 (of the rows concatenated,
        over many files)."""
        if self.kind == UNITS and self.files is not None:
            assert self.units is not None
            unit = int(self.units[ticket])
            return slice(int(self.files.unit_starts[unit]), int(self.files.unit_starts[unit + 1]))
        if self.kind == UNITS:
            assert self.units is not None
            start = int(self.units[ticket]) * self.slot_rows
            return slice(start, min(start + self.slot_rows, self.n_rows))
        start = ticket * self.slot_rows
        return self.sequence()[start : min(start + self.slot_rows, self.n_sequence)]

    def sequence(self) -> np.ndarray:
        """BATCHES: the row numbers of the whole sequence, in batch order."""
        return self.arena.ndarray((self.n_sequence,), np.int64, self.offsets[-1])


def ring_for(infos: Sequence[DatasetInfo], slot_rows: int, n_slots: int, n_sequence: int = 0,
             reuse: Ring | None = None) -> tuple[Ring, list[int]]:
    """A ring of at least ``n_slots`` slots of ``slot_rows`` rows of every dataset with room for
    ``n_sequence`` row numbers, and the offsets of its regions: ``reuse`` emptied when it is large
    enough (its pages are reserved and mapped already: the epoch touches no new memory), else a
    new one."""
    if reuse is not None and reuse.layout.n_slots >= n_slots:
        offsets = _offsets(infos, slot_rows, reuse.layout.n_slots, reuse.layout.slots)
        if offsets[-1] + 8 * n_sequence <= reuse.layout.nbytes:
            return reuse.renewed(), offsets
    # RingLayout cuts the slot area into n_slots equal slots; ours is cut per dataset instead,
    # so ask for slots that add up to at least the regions.
    regions_end = _offsets(infos, slot_rows, n_slots, 0)[-1]
    ring = Ring.create(n_slots, -(-(regions_end + 8 * n_sequence) // n_slots))
    return ring, _offsets(infos, slot_rows, n_slots, ring.layout.slots)


def _offsets(infos: Sequence[DatasetInfo], slot_rows: int, n_slots: int, at: int) -> list[int]:
    """Where each dataset's region starts, from ``at``, then where the row numbers start."""
    offsets = [at]
    for info in infos:
        offsets.append(offsets[-1] + round_up(n_slots * slot_rows * info.row_bytes, 64))
    return offsets


# In a worker: the arena of the last epoch, as mapped then. A Loader reuses its ring from one
# epoch to the next; mapping it anew would fault every page of it in again each epoch (see
# bench/README.md, "The Loader's workers"), so the worker keeps its mapping while the same memory
# comes back.
_LAST_ARENA: tuple[tuple[int, int], SharedArena] | None = None


def mapped_before(arena: SharedArena) -> SharedArena:
    """``arena``, or this process's earlier mapping of the same memory (then ``arena`` closes)."""
    global _LAST_ARENA
    st = os.fstat(arena.fd)
    identity = (st.st_dev, st.st_ino)
    if _LAST_ARENA is not None and _LAST_ARENA[0] == identity:
        arena.close()
        return _LAST_ARENA[1]
    _LAST_ARENA = identity, arena
    return arena


def regions(plan: LoadPlan) -> list[np.ndarray]:
    """Each dataset's region as an array of ``n_slots * slot_rows`` rows."""
    rows = plan.layout.n_slots * plan.slot_rows
    return [plan.arena.ndarray((rows, *info.shape[1:]), info.dtype, offset)
            for info, offset in zip(plan.infos, plan.offsets[:-1], strict=True)]


class LoadJob(RingJob, FileJob):
    """Fill free slots with the rows of the next tickets; the first failed read stops the epoch
    (``RingJob``). See NOTE [ Worker shutdown logic ]."""

    name = "Loader"
    plan: LoadPlan
    ahead: RowsAhead | None = None  # units of a file in an object store: fetched ahead

    def __init__(self, plan: LoadPlan):
        self.plan = plan
        self.filename = plan.infos[0].filename

    def file_kwargs(self) -> dict[str, Any]:
        # Units are whole chunks: an uncompressed one needs no cache, a compressed one is
        # decoded once, into the slot, when it fits the cache (fast decoders skip it anyway).
        compressed = [info for info in self.plan.infos if info.compressed]
        unit_bytes = max((self.plan.slot_rows * i.row_bytes for i in compressed), default=0)
        return chunk_cache(self.plan.file_kwargs, "batches", unit_bytes if compressed else None)

    def attach_file(self, source: OpenFile, worker: int) -> None:
        self._attach_ring()
        self.datasets = [source.dataset(info.path) for info in self.plan.infos]
        # Batches of unfiltered rows: row numbers straight to the file's bytes, with no key to
        # translate per batch (bench/README.md, "The Loader's workers").
        self.raw = [rawread.RawRows.of(d) if self.plan.kind == BATCHES else None
                    for d in self.datasets]
        if self.plan.kind == UNITS:
            self.ahead = RowsAhead.of(self.datasets)
            self.where = worker_place(self.name, worker)

    def detach(self) -> None:
        if self.ahead is not None:
            self.ahead.close()  # no fetch thread writes into a slot past the job
        super().detach()

    def _attach_ring(self) -> None:
        rawread.keep_maps()  # the rows of the next epochs lie in the same pages
        self.plan.arena = mapped_before(self.plan.arena)
        self.ring = Ring(self.plan.arena, self.plan.layout)
        self.regions = regions(self.plan)

    def next_task(self, parent_alive) -> tuple[int, int] | None:
        """A free slot and the ticket to read into it; None when done."""
        if self.ahead is not None and not self.ahead.wait_for_room(
                lambda: self.ring.stopped or not parent_alive()):
            return None
        return self.ring.take_ticket(self.plan.n_tickets, timeouts.WAIT_SLICE, parent_alive)

    def run(self, task: tuple[int, int]) -> None:
        if self.ahead is not None:
            self._run_ahead(task)
            return
        slot, ticket = task
        key = self.plan.key(ticket)
        at = slot * self.plan.slot_rows
        n = len(key) if isinstance(key, np.ndarray) else key.stop - key.start
        self.failed: int | None = None  # the dataset whose read failed, for describe
        for d, (dataset, region, raw) in enumerate(
                zip(self.datasets, self.regions, self.raw, strict=True)):
            self.failed = d
            if raw is not None and isinstance(key, np.ndarray):
                raw.take(key, region[at : at + n])
            else:
                read_selection(dataset, translate((key,), dataset.shape), region[at : at + n])
        self.failed = None
        self.ring.headers[slot] = (ticket, n)
        self.ring.full.push(slot)

    def _run_ahead(self, task: tuple[int, int]) -> None:
        """Units over a URL: this task's and those of the slots free now, fetched at once in
        the background, each slot full as soon as its unit lands (``RowsAhead``)."""
        def unit(slot: int, ticket: int) -> tuple[list, int, None]:
            key = self.plan.key(ticket)
            assert isinstance(key, slice)
            at, n = slot * self.plan.slot_rows, key.stop - key.start
            return [(key.start, key.stop, [r[at : at + n] for r in self.regions])], n, None

        def failed(exc: BaseException, ticket: int, dataset: int | None) -> None:
            self.failed = dataset  # the job is over: no other read uses it
            self.fail(exc, f"{self.where}, {self.describe((0, ticket))}")

        assert self.ahead is not None
        self.ahead.run(self.ring, task, self.plan.n_tickets, unit, failed)

    def describe(self, task: tuple[int, int]) -> str:
        """What the failed ``task`` read: the dataset that failed (every one, if it failed
        before any was read) and, for a unit, the chunk that cannot be read."""
        key = self.plan.key(task[1])
        rows = (f"rows {key.start}:{key.stop}" if isinstance(key, slice)
                else f"{len(key)} rows of batch {task[1]}")
        failed = getattr(self, "failed", None)
        if failed is None:
            paths = ", ".join(info.path for info in self.plan.infos)
            return f"reading {rows} of {paths} in {self.filename}"
        where = f"reading {rows} of {self.plan.infos[failed].path} in {self.filename}"
        # A batch's rows are unfiltered (nothing to decode): no chunk of theirs to look for.
        chunk = (bad_chunk(self.datasets[failed], key.start, key.stop)
                 if isinstance(key, slice) else None)
        return where if chunk is None else f"{where}: {chunk} cannot be read"


class ShardsJob(LoadJob):
    """A ``LoadJob`` over many files (``_loader/files.py``): each unit lies in one file, opened
    when a unit of it is read; a worker keeps at most ``plan.max_open`` open, the least recently
    used closed first, so it never runs out of descriptors. Columns of local files whose byte
    ranges the parent mapped are read by ``pread`` on a plain descriptor, with no HDF5 open
    (``_hdf5/mapped.py``): over small files an open costs more than the rows. See NOTE [ Worker
    shutdown logic ]."""

    def __init__(self, plan: LoadPlan):
        self.plan = plan
        self.filename = plan.files.name

    def attach(self, worker: int) -> None:
        # Columns of local files whose rows lie at known byte ranges: read with no HDF5 open
        # (_hdf5/mapped.py), each file by a plain descriptor. The two share the bound on open
        # files: HDF5 keeps one where it reads only what fails to decode.
        maps, limit = self.plan.files.maps, self.plan.max_open
        by_hdf5 = limit if maps is None else 1 if maps.how.all() else max(1, limit // 2)
        # Units of files in object stores are fetched ahead, as over one URL (RowsAhead), each
        # in its file: a file with units in flight stays open until they land.
        self.ahead = RowsAhead.many() if self.plan.kind == UNITS and any(
            isinstance(s.file, RemoteFile) for s in self.plan.files.shards) else None
        self.file_reads: dict[int, FileReads] = {}
        self.open = OpenFiles(by_hdf5, self.file_kwargs(), self._busy, self._closed)
        self.mapped = None if maps is None else MappedReads(
            maps, [info.dtype for info in self.plan.infos],
            [info.shape[1:] for info in self.plan.infos], max(1, limit - by_hdf5))
        self.file: int | None = None  # the file of the unit being read, for describe
        self.datasets = []
        self._attach_ring()
        self.where = worker_place(self.name, worker)

    def detach(self) -> None:
        if self.ahead is not None:
            self.ahead.close()  # no fetch thread writes into a slot past the job
        if self.mapped is not None:
            self.mapped.close()
        self.open.close()

    def _closed(self, file: int) -> None:
        self.file_reads.pop(file, None)

    def _busy(self, file: int) -> bool:
        reads = self.file_reads.get(file)
        return reads is not None and self.ahead is not None and not self.ahead.idle(reads)

    def _run_ahead(self, task: tuple[int, int]) -> None:
        """Units over URLs: this task's and those of the slots free now, fetched at once in the
        background, one fetch a file (``RowsAhead.many``)."""
        files = self.plan.files
        self.open.sweep()

        def unit(slot: int, ticket: int) -> tuple[list, int, FileReads]:
            key = self.plan.key(ticket)
            assert isinstance(key, slice)
            f = files.file_of(key.start)
            base = int(files.starts[f])
            source = self.open.get(f, files.shards[f].file)  # also the most recently used now
            reads = self.file_reads.get(f)
            if reads is None:
                reads = self.file_reads[f] = FileReads.any(
                    [source.dataset(info.path) for info in self.plan.infos])
            at, n = slot * self.plan.slot_rows, key.stop - key.start
            return [(key.start - base, key.stop - base, [r[at : at + n] for r in self.regions])], \
                n, reads

        def failed(exc: BaseException, ticket: int, dataset: int | None) -> None:
            # On a fetch thread: describe must find the datasets, not open the file.
            key = self.plan.key(ticket)
            assert isinstance(key, slice)
            self.file = files.file_of(key.start)
            reads = self.file_reads.get(self.file)
            self.failed, self.datasets = (None, []) if reads is None or dataset is None else \
                (dataset, reads.datasets)
            self.fail(exc, f"{self.where}, {self.describe((0, ticket))}")

        assert self.ahead is not None
        self.ahead.run(self.ring, task, self.plan.n_tickets, unit, failed)

    def run(self, task: tuple[int, int]) -> None:
        if self.ahead is not None:
            self._run_ahead(task)
            return
        slot, ticket = task
        key = self.plan.key(ticket)
        assert isinstance(key, slice)
        files = self.plan.files
        self.failed, self.file = None, files.file_of(key.start)
        shard = files.shards[self.file]
        base = int(files.starts[self.file])
        local = slice(key.start - base, key.stop - base)
        at, n = slot * self.plan.slot_rows, key.stop - key.start
        self.datasets = []
        for d, region in enumerate(self.regions):
            self.failed = d
            out = region[at : at + n]
            if self.mapped is not None and self.mapped.read(
                    self.file, d, shard.file, (shard.size, shard.version), local.start,
                    local.stop, out):
                continue
            if not self.datasets:  # through HDF5
                source = self.open.get(self.file, shard.file)
                self.datasets = [source.dataset(info.path) for info in self.plan.infos]
            dataset = self.datasets[d]
            read_selection(dataset, translate((local,), dataset.shape), out)
        self.failed = None
        self.ring.headers[slot] = (ticket, n)
        self.ring.full.push(slot)

    def describe(self, task: tuple[int, int]) -> str:
        """What the failed ``task`` read: the file, its rows, the dataset and the chunk."""
        key = self.plan.key(task[1])
        assert isinstance(key, slice)
        files = self.plan.files
        f = files.file_of(key.start)
        base = int(files.starts[f])
        rows, name = f"rows {key.start - base}:{key.stop - base}", files.shards[f].name
        failed = getattr(self, "failed", None)
        if failed is None or getattr(self, "file", None) != f:
            paths = ", ".join(info.path for info in self.plan.infos)
            return f"reading {rows} of {paths} in {name}"
        where = f"reading {rows} of {self.plan.infos[failed].path} in {name}"
        if not getattr(self, "datasets", None):  # read by its chunk map: HDF5 looks
            try:
                source = self.open.get(f, files.shards[f].file)
                self.datasets = [source.dataset(info.path) for info in self.plan.infos]
            except Exception:  # the read's own error says the rest
                return where
        chunk = bad_chunk(self.datasets[failed], key.start - base, key.stop - base)
        return where if chunk is None else f"{where}: {chunk} cannot be read"
