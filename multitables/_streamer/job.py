"""The worker side of a stream: what to read (``StreamPlan``) and the job that reads it.

Internal module. Blocks are numbered in file order; a worker takes the next free slot and the
next slot ticket, reads the rows of that ticket straight into the slot and hands it over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._engine import timeouts
from .._engine.ring import Ring, RingJob, RingLayout
from .._engine.shm import SharedArena
from .._engine.worker import worker_place
from .._hdf5.chunkcache import chunk_cache
from .._hdf5.filejob import FileJob
from .._hdf5.hyperslab import read_selection
from .._hdf5.remoteahead import RowsAhead
from .._hdf5.source import DatasetInfo, OpenFile, check_positive_int, default_block_size
from .._keys._indexing import translate

# Small blocks are read in batches filling a slot of about this size: one HDF5 read and one
# hand-over between processes per slot, so a block costs only its Python-side delivery.
SLOT_TARGET_BYTES = 1 << 20
# A file in an object store: a slot is one fetch of this much, cut into GETs that run at once,
# so that each worker keeps several GETs in flight and the first-byte latency is paid once a
# slot rather than once a block.
REMOTE_SLOT_TARGET_BYTES = 8 << 20


@dataclass
class StreamPlan:
    """What a stream reads: everything a worker needs, picklable for spawn/forkserver.

    Blocks are numbered in file order; slot ticket ``t`` holds blocks ``t * blocks_per_slot``
    onwards (fewer in the last slot of a finite stream).
    """

    info: DatasetInfo
    file_kwargs: dict[str, Any]
    field: str | None
    block_size: int
    blocks_per_slot: int
    n_blocks: int | None  # None: cyclic, endless
    arena: SharedArena | None = None  # the ring's, set once it is made
    layout: RingLayout | None = None

    @classmethod
    def build(cls, info: DatasetInfo, file_kwargs: dict[str, Any], field: str | None,
              block_size: int | None, n_slots: int, *, cyclic: bool,
              remainder: bool) -> StreamPlan:
        """The plan of a stream of ``info`` (arguments as ``Streamer.get_queue`` takes them)
        through a ring of ``n_slots`` slots: its block size and how many blocks a slot holds."""
        row_bytes = _row_bytes(info, field)  # an unknown field raises first
        if block_size is None:
            rows = info.chunk_rows  # a virtual dataset's: its sources'
            block_size = default_block_size(info.shape, info.dtype, (rows,) if rows else None)
        block_size = check_positive_int("block_size", block_size)
        n_rows = info.shape[0]
        n_blocks: int | None
        if cyclic:
            n_blocks = None
        elif remainder:
            n_blocks = math.ceil(n_rows / block_size)
        else:
            n_blocks = n_rows // block_size
        target = REMOTE_SLOT_TARGET_BYTES if info.remote else SLOT_TARGET_BYTES
        per_slot = max(1, target // max(block_size * row_bytes, 1))
        # Spread a short stream over all slots (so over all workers); a slot never laps the data.
        if n_blocks is not None:
            per_slot = min(per_slot, -(-n_blocks // n_slots))
        per_slot = max(1, min(per_slot, n_rows // block_size))
        return cls(info, file_kwargs, field, block_size, per_slot, n_blocks)

    @property
    def slot_bytes(self) -> int:
        """Bytes a slot holds: ``slot_rows`` rows of the streamed field (or whole rows)."""
        return self.slot_rows * _row_bytes(self.info, self.field)

    @property
    def slot_rows(self) -> int:
        """Rows a slot holds: its blocks, but never more rows than a finite stream delivers (a
        ``block_size`` beyond the dataset must not reserve memory for rows that do not exist)."""
        rows = self.block_size * self.blocks_per_slot
        return rows if self.n_blocks is None else min(rows, self.info.shape[0])

    @property
    def n_slot_tickets(self) -> int | None:
        if self.n_blocks is None:
            return None
        return -(-self.n_blocks // self.blocks_per_slot)

    def rows_of(self, ticket: int) -> list[tuple[int, int]]:
        """The (start, stop) row ranges of slot ``ticket``, several when it wraps around."""
        n, rows = self.info.shape[0], self.block_size * self.blocks_per_slot
        if self.n_blocks is not None:
            start = ticket * rows
            return [(start, min(start + rows, self.n_blocks * self.block_size, n))]
        start = (ticket * rows) % n
        ranges = []
        while rows > 0:
            stop = min(start + rows, n)
            ranges.append((start, stop))
            rows -= stop - start
            start = 0
        return ranges


class StreamJob(RingJob, FileJob):
    """The worker side of a stream: fill free slots with the blocks of the next ticket; the
    first failed read stops the stream (``RingJob``).

    See NOTE [ Worker shutdown logic ] in multitables/_engine/pool.py.
    """

    name = "Streamer"
    plan: StreamPlan
    ahead: RowsAhead | None = None  # slots of a file in an object store: fetched ahead

    def __init__(self, plan: StreamPlan):
        self.plan = plan
        self.filename = plan.info.filename

    def file_kwargs(self) -> dict[str, Any]:
        return _worker_file_kwargs(self.plan)

    def attach_file(self, source: OpenFile, worker: int) -> None:
        plan = self.plan
        assert plan.arena is not None and plan.layout is not None
        self.ring = Ring(plan.arena, plan.layout)
        self.dataset = source.dataset(plan.info.path)
        self.slots = slot_arrays(plan, self.ring)
        # Whole rows of a file in an object store: the next slots' chunks are fetched while
        # this one's decode (``RowsAhead``).
        self.ahead = RowsAhead.of([self.dataset]) if plan.field is None else None
        self.where = worker_place(self.name, worker)

    def detach(self) -> None:
        if self.ahead is not None:
            self.ahead.close()  # no fetch thread writes into a slot past the job
        super().detach()

    def next_task(self, parent_alive) -> tuple[int, int] | None:
        """A free slot and the ticket of the blocks to read into it; None when done. See NOTE
        [ Worker shutdown logic ], steps (2) and (4)."""
        if self.ahead is not None and not self.ahead.wait_for_room(
                lambda: self.ring.stopped or not parent_alive()):
            return None
        return self.ring.take_ticket(self.plan.n_slot_tickets, timeouts.WAIT_SLICE, parent_alive)

    def run(self, task: tuple[int, int]) -> None:
        if self.ahead is not None:
            self.ahead.run(self.ring, task, self.plan.n_slot_tickets, self._pieces,
                           lambda exc, ticket, _: self.fail(
                               exc, f"{self.where}, {self.describe((0, ticket))}"))
            return
        slot, ticket = task
        dest, shape, at = self.slots[slot], self.plan.info.shape, 0
        for start, stop in self.plan.rows_of(ticket):
            sel = translate((slice(start, stop),), shape)
            read_selection(self.dataset, sel, dest[at : at + stop - start], self.plan.field)
            at += stop - start
        self.ring.headers[slot] = (ticket, at)
        self.ring.full.push(slot)

    def _pieces(self, slot: int, ticket: int) -> tuple[list, int, None]:
        """The row ranges of slot ``ticket``, each with its place in ``slot``, and their rows."""
        pieces, at = [], 0
        for start, stop in self.plan.rows_of(ticket):
            pieces.append((start, stop, [self.slots[slot][at : at + stop - start]]))
            at += stop - start
        return pieces, at, None

    def describe(self, task: tuple[int, int]) -> str:
        rows = ", ".join(f"{a}:{b}" for a, b in self.plan.rows_of(task[1]))
        return f"reading rows {rows} of {self.plan.info.path} in {self.filename}"


def _worker_file_kwargs(plan: StreamPlan) -> dict[str, Any]:
    """The user's h5py.File options, with a chunk cache sized for whole-block reads."""
    compressed = plan.info.compressed
    return chunk_cache(plan.file_kwargs, "stream",
                       plan.slot_rows * plan.info.row_bytes if compressed else None)


def _row_bytes(info: DatasetInfo, field: str | None) -> int:
    """Bytes of one row of ``field`` (of the whole row without one)."""
    return math.prod(info.shape[1:]) * info.field_dtype(field).itemsize


def slot_arrays(plan: StreamPlan, ring: Ring) -> list[np.ndarray]:
    """Each slot as an array of its rows (of the field's elements when streaming one field)."""
    info = plan.info
    dtype = info.field_dtype(plan.field)
    shape = (plan.slot_rows, *info.shape[1:], *dtype.shape)
    return [ring.slot_array(s, shape, dtype.base) for s in range(ring.layout.n_slots)]
