"""The reads of one epoch of a ``Loader``, in the consumer: its ring, its workers, its batches.

Internal module. Two ways, chosen by the Loader:

- ``UnitReads`` (compressed data): workers read units of whole chunks in the order the epoch
  needs them; the positions of the epoch are cut into pieces, one per window, and each batch is
  gathered from the units its piece holds, which are freed when the piece is delivered.
- ``BatchReads`` (unfiltered data): workers read each batch's rows straight from the file into a
  slot, in batch order; the caller gets a copy of the slot, or the slot itself (``copy=False``).

See NOTE [ Worker shutdown logic ] in _engine/pool.py for the waits and the shutdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .._engine.ring import CLOSED, FilledSlots
from ..errors import SubprocessException
from .columns import Columns
from .job import BATCHES, UNITS, LoadJob, LoadPlan, ShardsJob, regions, ring_for
from .local import Local
from .order import EpochOrder

# What a batch used after the next one was asked for reads as, with copy=False (NaN for floats).
POISON = 0xFF


@dataclass(frozen=True)
class EpochConfig:
    """What the reads of an epoch need of their Loader, handed down at the epoch's start (the
    Loader's ``n_procs`` and ``copy`` may change between epochs)."""

    filename: str
    file_kwargs: dict[str, Any]
    columns: Columns
    batch_size: int
    unit_rows: int
    window_units: int
    n_procs: int
    copy: bool
    files: Any = None  # over many files: their Files (``files.py``)
    max_open: int = 0  # over many files: files each worker keeps open at once
    # Batches made sample by sample (``samples.py``): the transforms, how each dataset's rows
    # come to a batch, and the bytes a slot starts with.
    pipeline: Any = None
    kinds: tuple[str, ...] = ()
    slot_bytes: int = 0


@dataclass
class Piece:
    """Consecutive positions of the epoch that lie in one window: its units are read together."""

    start: int  # offset in this iterator's sequence of positions
    stop: int
    window: int
    intervals: list[tuple[int, int]]  # epoch positions
    units: np.ndarray  # units read for it, in ticket order
    first_ticket: int = 0
    flat: np.ndarray | None = None  # per position: its row's index in the regions, once read


def cut(intervals: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The positions at sequence offsets ``first:last`` of ``intervals``."""
    out, at = [], 0
    for start, stop in intervals:
        lo, hi = max(first - at, 0), min(last - at, stop - start)
        if lo < hi:
            out.append((start + lo, start + hi))
        at += stop - start
    return out


def pieces(order: EpochOrder, intervals: list[tuple[int, int]]) -> list[Piece]:
    """Split positions at window bounds; each piece reads the units its rows lie in."""
    pieces: list[Piece] = []
    at = 0
    for start, stop in intervals:
        while start < stop:
            w = order.window_of(start)
            end = min(stop, order.window_bounds(w)[1])
            if pieces and pieces[-1].window == w and pieces[-1].stop == at:
                pieces[-1].intervals.append((start, end))
                pieces[-1].stop += end - start
            else:
                pieces.append(Piece(at, at + end - start, w, [(start, end)], np.empty(0)))
            at += end - start
            start = end
    ticket = 0
    for piece in pieces:
        units = order.window_units(piece.window)
        if piece.intervals != [order.window_bounds(piece.window)]:
            rows = rows_of(order, piece.intervals)
            units = units[np.isin(units, np.unique(order.unit_of(rows)))]
        piece.units, piece.first_ticket = units, ticket
        ticket += len(units)
    return pieces


def rows_of(order: EpochOrder, intervals: list[tuple[int, int]]) -> np.ndarray:
    """The file rows at the positions of ``intervals``, in order."""
    parts = [order.rows(a, b) for a, b in intervals]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _slots_needed(pieces: list[Piece], batch_size: int, n_positions: int) -> int:
    """The most units the pieces of one batch hold at once: fewer slots could deadlock."""
    most, i = 0, 0
    for start in range(0, n_positions, batch_size):
        stop = min(start + batch_size, n_positions)
        while pieces[i].stop <= start:
            i += 1
        j, held = i, 0
        while j < len(pieces) and pieces[j].start < stop:
            held += len(pieces[j].units)
            j += 1
        most = max(most, held)
    return most


class Reads:
    """The reads of one iteration: a ring, the workers filling it, and the slots read so far.
    See NOTE [ Worker shutdown logic ] in multitables/_engine/pool.py."""

    def __init__(self, config: EpochConfig, local: Local, kind: str, slot_rows: int,
                 n_slots: int, units: np.ndarray | None = None,
                 sequence: np.ndarray | None = None):
        self.config, self.local = config, local
        infos = config.columns.infos
        n_sequence = 0 if sequence is None else len(sequence)
        idle = local.take_ring()
        self.ring, offsets = ring_for(infos, slot_rows, n_slots, n_sequence, idle)
        if idle is not None and self.ring.arena is not idle.arena:
            idle.close()
        self.closed = False
        try:
            n_tickets = len(units) if units is not None else -(-n_sequence // slot_rows)
            plan = LoadPlan(list(infos), config.file_kwargs, kind, slot_rows, n_tickets, units,
                            n_sequence, self.ring.arena, self.ring.layout, offsets,
                            config.files, config.max_open)
            if sequence is not None:
                plan.sequence()[:] = sequence
            self.regions = regions(plan)
            self.columns = config.columns.cut(self.regions)
            job = LoadJob(plan) if config.files is None else ShardsJob(plan)
            self.crew = local.pool().run(job, config.n_procs)
        except BaseException:
            self.ring.stop()
            self.ring.close()
            raise
        self.slot_of: dict[int, int] = {}  # ticket -> slot, for tickets read and not yet freed
        self.filled = FilledSlots(self.ring, self.crew.check)
        local.reads.add(self)  # closed with the Loader

    def batch(self, start: int, stop: int, outputs: Outputs) -> list[np.ndarray]:
        """The columns of the positions at sequence offsets ``start:stop``."""
        raise NotImplementedError

    def _wait_for(self, ticket: int) -> int:
        """The slot that holds ``ticket``, once a worker has filled it."""
        while ticket not in self.slot_of:
            slot = self._pop()
            self.slot_of[int(self.ring.headers[slot, 0])] = slot
        return self.slot_of[ticket]

    def _free(self, ticket: int) -> None:
        self.ring.free.push(self.slot_of.pop(ticket))

    def _pop(self) -> int:
        slot = self.filled.pop()
        if slot == CLOSED:
            raise SubprocessException(f"the reads of {self.config.filename} were stopped")
        return slot

    def close(self) -> None:
        """Stop the reads and hand the workers back to the Loader; idempotent."""
        if self.closed:
            return
        self.closed = True
        self.ring.stop()
        self.crew.stop()
        self.columns = self.regions = []
        self.slot_of.clear()
        if not self.local.keep_ring(self.ring):  # refused once the Loader is closed
            self.ring.close()


class UnitReads(Reads):
    """Units of a window read into slots; each batch gathered from the units it draws on."""

    def __init__(self, config: EpochConfig, local: Local, order: EpochOrder,
                 pieces: list[Piece], n_positions: int):
        self.order, self.pieces, self.unit_rows = order, pieces, config.unit_rows
        units = np.concatenate([p.units for p in pieces]).astype(np.int64)
        prefetch = max(2 * config.n_procs, config.window_units)
        n_slots = min(len(units), prefetch
                      + _slots_needed(pieces, config.batch_size, n_positions))
        super().__init__(config, local, UNITS, self.unit_rows, n_slots, units=units)
        self.ready = 0  # pieces before this one have their flat indices
        self.done = 0  # pieces before this one are delivered and their slots freed

    def batch(self, start: int, stop: int, outputs: Outputs) -> list[np.ndarray]:
        while self.ready < len(self.pieces) and self.pieces[self.ready].start < stop:
            self._make_ready(self.pieces[self.ready])
            self.ready += 1
        parts = []
        for piece in self.pieces[self.done : self.ready]:
            if piece.start < stop and piece.stop > start:
                assert piece.flat is not None
                parts.append(piece.flat[max(start - piece.start, 0) : stop - piece.start])
        index = parts[0] if len(parts) == 1 else np.concatenate(parts)
        arrays = outputs.gather(self.columns, index)
        while self.done < self.ready and self.pieces[self.done].stop <= stop:
            piece = self.pieces[self.done]
            for ticket in range(piece.first_ticket, piece.first_ticket + len(piece.units)):
                self._free(ticket)
            piece.flat = None
            self.done += 1
        return arrays

    def _make_ready(self, piece: Piece) -> None:
        """Wait for the units of ``piece``, then map each of its rows to its place in a region."""
        tickets = range(piece.first_ticket, piece.first_ticket + len(piece.units))
        slots = np.array([self._wait_for(t) for t in tickets], np.int64)
        rows = rows_of(self.order, piece.intervals)
        unit = self.order.unit_of(rows)
        which = np.searchsorted(piece.units, unit)  # window_units are sorted
        piece.flat = slots[which] * self.unit_rows + (rows - self.order.unit_start(unit))


class BatchReads(Reads):
    """Each batch's rows read by a worker straight from the file into a slot, in batch order."""

    def __init__(self, config: EpochConfig, local: Local, sequence: np.ndarray):
        self.batch_size = config.batch_size
        n_batches = -(-len(sequence) // self.batch_size)
        # Lent and poisoned slots (copy=False) leave each worker two.
        n_slots = min(n_batches, 2 * config.n_procs + 2)
        super().__init__(config, local, BATCHES, self.batch_size, n_slots, sequence=sequence)
        self.lent: int | None = None  # copy=False: the ticket whose slot the caller holds
        self.poisoned: int | None = None  # the one lent before, poisoned, kept one batch more

    def batch(self, start: int, stop: int, outputs: Outputs) -> list[np.ndarray]:
        self._end_lease()
        ticket = start // self.batch_size
        rows = self._span(self._wait_for(ticket), stop - start)
        views = [column[rows] for column in self.columns]
        if outputs.copy:
            arrays = [view.copy() for view in views]
            self._free(ticket)
            return arrays
        self.lent = ticket
        return outputs.lend(views)

    def _end_lease(self) -> None:
        """The slot lent to the caller is poisoned and kept for one more batch (so a late use
        reads poison, not the rows a worker writes next); the one poisoned before goes back to
        the workers."""
        if self.poisoned is not None:
            self._free(self.poisoned)
            self.poisoned = None
        if self.lent is not None:
            lent = self._span(self.slot_of[self.lent], self.batch_size)
            Outputs.poison([region[lent] for region in self.regions])
            self.lent, self.poisoned = None, self.lent

    def close(self) -> None:
        if not self.closed:
            self._end_lease()
        super().close()

    def _span(self, slot: int, n: int) -> slice:
        return slice(slot * self.batch_size, slot * self.batch_size + n)


class Outputs:
    """Where batches are gathered: new arrays (copy=True), or two buffers used in turn, the one
    given out before poisoned when the next batch is asked for (copy=False)."""

    def __init__(self, config: EpochConfig, columns: list[np.ndarray]):
        self.copy = config.copy
        self.buffers: list[list[np.ndarray]] = []
        self.turn = 0
        if not self.copy:
            shapes = [((config.batch_size, *c.shape[1:]), c.dtype) for c in columns]
            self.buffers = [[np.empty(s, d) for s, d in shapes] for _ in range(2)]

    def gather(self, columns: list[np.ndarray], index: np.ndarray) -> list[np.ndarray]:
        if self.copy:
            return [_take(column, index) for column in columns]
        outs = self._next(len(index))
        for column, out in zip(columns, outs, strict=True):
            _take(column, index, out)
        return outs

    def lend(self, views: list[np.ndarray]) -> list[np.ndarray]:
        """``views`` of a lent slot as they are, but those that are strided (a field of a
        table), copied into a buffer: a tensor cannot be made of them."""
        if all(view.flags.c_contiguous for view in views):
            return views
        outs = self._next(len(views[0]))
        for i, view in enumerate(views):
            if view.flags.c_contiguous:
                outs[i] = view
            else:
                outs[i][...] = view
        return outs

    def _next(self, n: int) -> list[np.ndarray]:
        """This batch's buffers; the last batch's are poisoned."""
        self.turn ^= 1
        self.poison(self.buffers[self.turn ^ 1])
        return [buffer[:n] for buffer in self.buffers[self.turn]]

    def end(self) -> None:
        """The epoch is over: no buffer is lent any more."""
        for buffers in self.buffers:
            self.poison(buffers)

    @staticmethod
    def poison(arrays: list[np.ndarray]) -> None:
        """Make a lease that is over read as all bits set, rather than as other rows."""
        for array in arrays:
            array.view(np.uint8).fill(POISON)


def _take(column: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``column[index]`` (into ``out``). np.take copies a strided input (a field of a table)
    whole before it gathers: index that one instead."""
    if column.flags.c_contiguous:
        return np.take(column, index, axis=0, out=out)
    if out is None:
        return column[index]
    out[...] = column[index]
    return out
