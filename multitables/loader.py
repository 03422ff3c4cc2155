"""Training batches of aligned columns straight from HDF5: shuffled, sharded over ranks, resumable.

``Loader`` plays one epoch per iteration. The order of its rows is a pure function of (seed, epoch,
rank, world size) (``order.py``); worker processes read whole units of rows (a whole number of HDF5
chunks of every column, ``loadjob.py``) into shared memory in the order the epoch needs them, and
the consumer gathers each batch from the units in memory with one ``np.take`` per column.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SubprocessException
from .loadjob import BATCHES, UNITS, LoadJob, LoadPlan, plan_units, regions, ring_for
from .order import EpochOrder, plan_rank, worker_batches
from .ring import CLOSED, Ring
from .source import DatasetInfo, check_positive_int, default_n_procs, describe, open_file
from .workers import CHECK_INTERVAL, WAIT_SLICE, StandbyWorkers

__all__ = ["Loader"]

# A default window holds at least this many units and about this many bytes of rows.
WINDOW_UNITS = 16
WINDOW_BYTES = 32 << 20
# What a batch used after the next one was asked for reads as, with copy=False (NaN for floats).
POISON = 0xFF
STATE_VERSION = 1

_LIVE_LOADERS: weakref.WeakSet[Loader] = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    for loader in list(_LIVE_LOADERS):
        loader.close()


@dataclass(frozen=True)
class _Column:
    """One column of the batches: a dataset (by its index in the Loader's list) or one field."""

    name: str | int
    path: str  # as the caller spelled it
    dataset: int
    field: str | None


class Loader:
    """Batches of aligned columns of one HDF5 file, one epoch per iteration.

    Parameters
    ----------
    filename : str or path
        The HDF5 file, opened read-only.
    columns : str, list of str or dict of str
        Dataset paths. One path: batches are arrays. A list: batches are tuples in that order. A
        dict ``name -> path``: batches are dicts. A field of a compound dataset (a PyTables table)
        is spelled as the table's path and the field's name: ``"/table/image"``. All columns must
        have the same number of rows; they stay aligned row for row.
    batch_size : int
        Rows per batch. The last batch of an epoch may be shorter, unless ``drop_last``.
    shuffle : bool
        Shuffle the rows each epoch, with a seeded chunk-aware shuffle: the units of rows (whole
        HDF5 chunks of every column) are visited in a new random order each epoch and the rows of
        ``window`` consecutive units are mixed uniformly. Each chunk is read and decoded once per
        epoch; memory is bounded by a few windows.
    seed : int
        Seed of the shuffle: the same (seed, epoch) gives the same order on every machine.
    window : int, optional
        Rows mixed together by the shuffle, rounded up to whole units. The default holds at least
        16 units and about 32 MiB of rows. A window of the whole dataset (``window >= n_rows``)
        is a uniform shuffle. Unfiltered data is not held in memory: each batch's rows are read
        straight from the file, whatever the window. Compressed data is decoded a window of
        units at a time, so memory holds about two windows (a uniform shuffle: all of it).
    drop_last : bool
        Drop the rows that do not fill a batch on every rank. Without it every row is delivered
        (the last batch may be short, and with several ranks fewer than ``world_size`` rows are
        repeated so that every rank yields the same number of batches).
    rank, world_size : int, optional
        Data-parallel sharding: this rank's share of each epoch. By default from
        ``torch.distributed`` when it is initialised, else the ``RANK`` and ``WORLD_SIZE``
        environment variables, else 0 and 1.
    n_procs : int, optional
        Worker processes reading; by default the CPUs this process may run on, at most 4.
    copy : bool
        True: batches are arrays the caller owns. False: **batches are views of the Loader's
        buffers, valid only until the next batch is asked for**; after that a batch reads as
        poison (all bits set: NaN for floats) until its buffer is reused. No allocation per batch.
    start_method : {'fork', 'spawn', 'forkserver'}, optional
        How workers start; fork by default.
    **kw
        Passed to ``h5py.File``.

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os, multitables
    >>> path = os.path.join(tempfile.mkdtemp(), "doc.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(10.0).reshape(5, 2))
    ...     _ = f.create_dataset("y", data=np.arange(5))
    >>> with multitables.Loader(path, {"x": "x", "y": "y"}, batch_size=2, n_procs=1) as loader:
    ...     [batch["y"].tolist() for batch in loader]
    [[0, 1], [2, 3], [4]]
    """

    def __init__(self, filename, columns, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, window: int | None = None, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None,
                 n_procs: int | None = None, copy: bool = True, start_method: str | None = None,
                 **kw):
        self._args = dict(filename=filename, columns=columns, batch_size=batch_size,
                          shuffle=shuffle, seed=seed, window=window, drop_last=drop_last,
                          rank=rank, world_size=world_size, n_procs=n_procs, copy=copy,
                          start_method=start_method, **kw)
        self.filename = os.fspath(filename)
        self.file_kwargs = kw
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.copy = bool(copy)
        self.start_method = start_method
        self.n_procs = default_n_procs() if n_procs is None else check_positive_int(
            "n_procs", n_procs)
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self._kind, self._columns, self._infos = _resolve_columns(self.filename, columns, kw)
        self.n_rows = self._infos[0].shape[0]
        self._unfiltered = _unfiltered(self.filename, self._infos, kw)
        self.unit_rows = plan_units(self._infos)
        n_units = -(-self.n_rows // self.unit_rows)
        if window is None:
            row_bytes = sum(max(info.row_bytes, 1) for info in self._infos)
            by_bytes = -(-WINDOW_BYTES // (self.unit_rows * row_bytes))
            self.window_units = min(n_units, max(WINDOW_UNITS, by_bytes))
        else:
            window = check_positive_int("window", window)
            self.window_units = min(n_units, -(-window // self.unit_rows))
        # What the next iteration plays: (epoch, segments of it already played). See state_dict.
        self.order(0)  # a bad seed raises here, not at the first epoch
        self._next_epoch: int = 0
        self._next_history: list[list[int]] = []
        self._playing: tuple[int, Any, int] | None = None  # (epoch, plan, batches yielded)
        self._workers: StandbyWorkers | None = None
        self._idle_ring: Ring | None = None  # the last epoch's, kept for the next
        self._owner = os.getpid()
        self._closed = False
        _LIVE_LOADERS.add(self)

    # ---- the epoch's shape ----

    @property
    def window(self) -> int:
        """Rows mixed together by the shuffle (whole units)."""
        return min(self.n_rows, self.window_units * self.unit_rows)

    def __len__(self) -> int:
        """Batches this rank yields in an epoch (the same on every rank)."""
        return plan_rank(self.n_rows, self.batch_size, self.world_size, self.rank,
                         drop_last=self.drop_last).n_batches

    def set_epoch(self, epoch: int) -> None:
        """Play ``epoch`` at the next iteration (from its start); later ones follow it."""
        self._next_epoch = operator_index("epoch", epoch)
        self._next_history = []
        self._playing = None

    def order(self, epoch: int) -> EpochOrder:
        """The order of ``epoch``'s rows (before sharding): ``order(e).rows(0, n_rows)``."""
        return EpochOrder(self.n_rows, self.unit_rows, self.window_units, shuffle=self.shuffle,
                          seed=self.seed, epoch=epoch)

    # ---- resuming ----

    def state_dict(self) -> dict[str, Any]:
        """Where the next iteration resumes: right after the last batch yielded so far, or at
        the start of the next epoch once one has ended. Plain JSON-serialisable data."""
        if self._playing is not None:
            epoch, plan, done = self._playing
            if done < plan.n_batches:
                position = {"epoch": epoch, "history": plan.history_after(done)}
            else:
                position = {"epoch": epoch + 1, "history": []}
        else:
            position = {"epoch": self._next_epoch,
                        "history": [list(s) for s in self._next_history]}
        return {"version": STATE_VERSION, **position, **self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state`` (``state_dict()`` of this or an equally made Loader, possibly
        with another world size: then rank 0's state, loaded on every rank, continues the epoch
        with no row delivered twice)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown Loader state version {state.get('version')!r}")
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(
                    f"the state was taken from a Loader with {key}={state.get(key)!r}, this one "
                    f"has {key}={value!r}; resume with the same settings")
        history = [[int(w), int(k)] for w, k in state["history"]]
        self._next_epoch, self._next_history = int(state["epoch"]), history
        self._playing = None

    def _config(self) -> dict[str, Any]:
        return {"n_rows": self.n_rows, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "seed": self.seed, "unit_rows": self.unit_rows,
                "window_units": self.window_units, "drop_last": self.drop_last}

    # ---- iteration ----

    def __iter__(self) -> Iterator[Any]:
        """One epoch: the one chosen by ``set_epoch``/``load_state_dict``, else the next."""
        return self._epoch_batches(worker=0, n_workers=1)

    def _epoch_batches(self, worker: int, n_workers: int) -> Iterator[Any]:
        """This rank's batches of the next epoch; with ``n_workers`` > 1 only ``worker``'s
        contiguous share of them (a DataLoader worker's)."""
        self._check_open()
        epoch, history = self._next_epoch, self._next_history
        self._next_epoch, self._next_history = epoch + 1, []
        plan = plan_rank(self.n_rows, self.batch_size, self.world_size, self.rank,
                         drop_last=self.drop_last, history=history)
        batches = worker_batches(plan.n_batches, n_workers, worker)
        playing = [epoch, plan, batches.start]
        if n_workers == 1:
            self._playing = playing  # type: ignore[assignment]
        return self._play(self.order(epoch), plan, batches, playing)

    def _play(self, order: EpochOrder, plan, batches: range, playing: list) -> Iterator[Any]:
        if not batches:
            return
        B = self.batch_size
        total = sum(stop - start for start, stop in plan.intervals())
        first, last = batches.start * B, min(batches.stop * B, total)
        intervals = _cut(plan.intervals(), first, last)
        if self._reads_batches():
            epoch: _Reads = _BatchReads(self, order.rows_at(_arange(intervals)))
        else:
            epoch = _UnitReads(self, order, _pieces(order, intervals), last - first)
        try:
            outputs = _Outputs(self, epoch.columns)
            for k in batches:
                self._check_open()
                arrays = epoch.batch(k * B - first, min((k + 1) * B, total) - first, outputs)
                playing[2] = k + 1
                yield self._pack(arrays)
        finally:
            epoch.close()

    def _reads_batches(self) -> bool:
        """Whether to read each batch's rows from the file (unfiltered data: the page cache
        holds the window) rather than units of a window into memory (compressed data: each
        chunk decoded once)."""
        return self._unfiltered

    def _pack(self, arrays: list[np.ndarray]) -> Any:
        if self._kind == "single":
            return arrays[0]
        if self._kind == "tuple":
            return tuple(arrays)
        return {column.name: a for column, a in zip(self._columns, arrays, strict=True)}

    def _pool(self) -> StandbyWorkers:
        """This process's workers: a forked copy of a Loader (a DataLoader worker) starts its own
        and leaves its parent's alone."""
        if os.getpid() != self._owner:
            self._owner, self._workers, self._idle_ring = os.getpid(), None, None
            _LIVE_LOADERS.add(self)
        if self._workers is None:
            self._workers = StandbyWorkers(self.start_method, "Loader")
        return self._workers

    # ---- shutdown ----

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"this Loader of {self.filename} is closed")

    def close(self) -> None:
        """End the worker processes and free the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _LIVE_LOADERS.discard(self)
        if os.getpid() == self._owner:
            if self._workers is not None:
                self._workers.close()
            if self._idle_ring is not None:
                self._idle_ring.close()
        self._workers = self._idle_ring = None

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def __reduce__(self):
        # A Loader travels as its arguments and where it stands; workers start where it lands.
        return _unpickle, (self._args, self.state_dict())

    def __repr__(self) -> str:
        columns = [c.path for c in self._columns]
        return (f"<Loader {self.filename} {columns} batch_size={self.batch_size} "
                f"shuffle={self.shuffle} rank={self.rank}/{self.world_size}>")


def _unpickle(args: dict[str, Any], state: dict[str, Any]) -> Loader:
    loader = Loader(**args)
    loader.load_state_dict(state)
    return loader


def operator_index(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------ one epoch's reads


@dataclass
class _Piece:
    """Consecutive positions of the epoch that lie in one window: its units are read together."""

    start: int  # offset in this iterator's sequence of positions
    stop: int
    window: int
    intervals: list[tuple[int, int]]  # epoch positions
    units: np.ndarray  # units read for it, in ticket order
    first_ticket: int = 0
    flat: np.ndarray | None = None  # per position: its row's index in the regions, once read


def _cut(intervals: list[tuple[int, int]], first: int, last: int) -> list[tuple[int, int]]:
    """The positions at sequence offsets ``first:last`` of ``intervals``."""
    out, at = [], 0
    for start, stop in intervals:
        lo, hi = max(first - at, 0), min(last - at, stop - start)
        if lo < hi:
            out.append((start + lo, start + hi))
        at += stop - start
    return out


def _pieces(order: EpochOrder, intervals: list[tuple[int, int]]) -> list[_Piece]:
    """Split positions at window bounds; each piece reads the units its rows lie in."""
    pieces: list[_Piece] = []
    at = 0
    for start, stop in intervals:
        while start < stop:
            w = order.window_of(start)
            end = min(stop, order.window_bounds(w)[1])
            if pieces and pieces[-1].window == w and pieces[-1].stop == at:
                pieces[-1].intervals.append((start, end))
                pieces[-1].stop += end - start
            else:
                pieces.append(_Piece(at, at + end - start, w, [(start, end)], np.empty(0)))
            at += end - start
            start = end
    ticket = 0
    for piece in pieces:
        units = order.window_units(piece.window)
        if piece.intervals != [order.window_bounds(piece.window)]:
            rows = order.rows_at(_positions(piece))
            units = units[np.isin(units, np.unique(rows // order.unit_rows))]
        piece.units, piece.first_ticket = units, ticket
        ticket += len(units)
    return pieces


def _positions(piece: _Piece) -> np.ndarray:
    return _arange(piece.intervals)


def _arange(intervals: list[tuple[int, int]]) -> np.ndarray:
    parts = [np.arange(a, b, dtype=np.int64) for a, b in intervals]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _slots_needed(pieces: list[_Piece], batch_size: int, n_positions: int) -> int:
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


class _Reads:
    """The reads of one iteration: a ring, the workers filling it, and the slots read so far.
    See NOTE [ Worker shutdown logic ] in workers.py."""

    def __init__(self, loader: Loader, kind: str, slot_rows: int, n_slots: int,
                 units: np.ndarray | None = None, sequence: np.ndarray | None = None):
        self.loader = loader
        n_sequence = 0 if sequence is None else len(sequence)
        idle, loader._idle_ring = loader._idle_ring, None
        self.ring, offsets = ring_for(loader._infos, slot_rows, n_slots, n_sequence, idle)
        if idle is not None and self.ring.arena is not idle.arena:
            idle.close()
        self.closed = False
        try:
            n_tickets = len(units) if units is not None else -(-n_sequence // slot_rows)
            plan = LoadPlan(loader._infos, loader.file_kwargs, kind, slot_rows, n_tickets, units,
                            n_sequence, self.ring.arena, self.ring.layout, offsets)
            if sequence is not None:
                plan.sequence()[:] = sequence
            self.regions = regions(plan)
            self.columns = [self.regions[c.dataset] if c.field is None
                            else self.regions[c.dataset][c.field] for c in loader._columns]
            self.crew = loader._pool().run(LoadJob(plan), loader.n_procs)
        except BaseException:
            self.ring.stop()
            self.ring.close()
            raise
        self.slot_of: dict[int, int] = {}  # ticket -> slot, for tickets read and not yet freed
        self.next_check = time.monotonic() + CHECK_INTERVAL

    def batch(self, start: int, stop: int, outputs: _Outputs) -> list[np.ndarray]:
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
        # See NOTE [ Worker shutdown logic ]: wait in slices, check the workers between them,
        # and now and then even while slots keep coming (one dead worker among live ones).
        ring = self.ring
        while True:
            slot = ring.full.pop(WAIT_SLICE)
            if slot >= 0 and time.monotonic() < self.next_check:
                return slot
            if ring.errors.full():
                raise ring.errors.exception()
            if slot == CLOSED:
                raise SubprocessException(f"the reads of {self.loader.filename} were stopped")
            self.next_check = time.monotonic() + CHECK_INTERVAL
            self.crew.check()
            if slot >= 0:
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
        if self.loader._closed or self.loader._idle_ring is not None:
            self.ring.close()
        else:
            self.loader._idle_ring = self.ring  # for the next epoch


class _UnitReads(_Reads):
    """Units of a window read into slots; each batch gathered from the units it draws on."""

    def __init__(self, loader: Loader, order: EpochOrder, pieces: list[_Piece],
                 n_positions: int):
        self.order, self.pieces, self.unit_rows = order, pieces, loader.unit_rows
        units = np.concatenate([p.units for p in pieces]).astype(np.int64)
        prefetch = max(2 * loader.n_procs, loader.window_units)
        n_slots = min(len(units), prefetch
                      + _slots_needed(pieces, loader.batch_size, n_positions))
        super().__init__(loader, UNITS, self.unit_rows, n_slots, units=units)
        self.ready = 0  # pieces before this one have their flat indices
        self.done = 0  # pieces before this one are delivered and their slots freed

    def batch(self, start: int, stop: int, outputs: _Outputs) -> list[np.ndarray]:
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

    def _make_ready(self, piece: _Piece) -> None:
        """Wait for the units of ``piece``, then map each of its rows to its place in a region."""
        tickets = range(piece.first_ticket, piece.first_ticket + len(piece.units))
        slots = np.array([self._wait_for(t) for t in tickets], np.int64)
        rows = self.order.rows_at(_positions(piece))
        unit = rows // self.unit_rows
        sorter = np.argsort(piece.units, kind="stable")
        which = sorter[np.searchsorted(piece.units, unit, sorter=sorter)]
        piece.flat = slots[which] * self.unit_rows + (rows - unit * self.unit_rows)


class _BatchReads(_Reads):
    """Each batch's rows read by a worker straight from the file into a slot, in batch order."""

    def __init__(self, loader: Loader, sequence: np.ndarray):
        self.batch_size = loader.batch_size
        n_batches = -(-len(sequence) // self.batch_size)
        n_slots = min(n_batches, 2 * loader.n_procs + 1)  # a lent slot leaves each worker two
        super().__init__(loader, BATCHES, self.batch_size, n_slots, sequence=sequence)
        self.lent: int | None = None  # copy=False: the ticket whose slot the caller holds

    def batch(self, start: int, stop: int, outputs: _Outputs) -> list[np.ndarray]:
        if self.lent is not None:
            lent = self._span(self.slot_of[self.lent], self.batch_size)
            outputs.poison([region[lent] for region in self.regions])
            self._free(self.lent)
            self.lent = None
        ticket = start // self.batch_size
        rows = self._span(self._wait_for(ticket), stop - start)
        views = [column[rows] for column in self.columns]
        if outputs.copy:
            arrays = [view.copy() for view in views]
            self._free(ticket)
            return arrays
        self.lent = ticket
        return views

    def _span(self, slot: int, n: int) -> slice:
        return slice(slot * self.batch_size, slot * self.batch_size + n)


class _Outputs:
    """Where batches are gathered: new arrays (copy=True), or two buffers used in turn, the one
    given out before poisoned when the next batch is asked for (copy=False)."""

    def __init__(self, loader: Loader, columns: list[np.ndarray]):
        self.copy = loader.copy
        self.buffers: list[list[np.ndarray]] = []
        self.turn = 0
        if not self.copy:
            shapes = [((loader.batch_size, *c.shape[1:]), c.dtype) for c in columns]
            self.buffers = [[np.empty(s, d) for s, d in shapes] for _ in range(2)]

    def gather(self, columns: list[np.ndarray], index: np.ndarray) -> list[np.ndarray]:
        if self.copy:
            return [_take(column, index) for column in columns]
        self.turn ^= 1
        self.poison(self.buffers[self.turn ^ 1])
        outs = [buffer[: len(index)] for buffer in self.buffers[self.turn]]
        for column, out in zip(columns, outs, strict=True):
            _take(column, index, out)
        return outs

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


# ------------------------------------------------------------------------------ columns and ranks


def _resolve_columns(filename: str, columns: Any, kw: dict[str, Any]):
    """(kind, columns, dataset infos) for the ``columns`` argument; raises for bad input."""
    if isinstance(columns, (str, os.PathLike)):
        kind, named = "single", [(0, os.fspath(columns))]
    elif isinstance(columns, dict):
        kind, named = "dict", list(columns.items())
    elif isinstance(columns, (list, tuple)):
        kind, named = "tuple", list(enumerate(columns))
    else:
        raise TypeError(f"columns must be a path, a list of paths or a dict name -> path, "
                        f"got {type(columns).__name__}")
    if not named:
        raise ValueError("columns is empty: name at least one dataset")
    infos: list[DatasetInfo] = []
    resolved = []
    for name, path in named:
        if not isinstance(path, str):
            raise TypeError(f"column {name!r}: a path must be a str, got {path!r}")
        info, field = _describe_column(filename, path, kw)
        index = next((i for i, known in enumerate(infos) if known.path == info.path), None)
        if index is None:
            index = len(infos)
            infos.append(info)
        resolved.append(_Column(name, path, index, field))
    lengths = {c.path: infos[c.dataset].shape[0] for c in resolved}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns must have the same number of rows, got {lengths}")
    if next(iter(lengths.values())) == 0:
        raise ValueError(f"the columns of {filename} are empty (0 rows): {list(lengths)}")
    return kind, resolved, infos


def _describe_column(filename: str, path: str, kw: dict[str, Any]):
    """The dataset of column ``path`` and its field: a dataset, or ``table_path/field``."""
    try:
        info, field = describe(filename, path, kw), None
    except KeyError:
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            info = describe(filename, parent or "/", kw)
        except (KeyError, TypeError):
            raise KeyError(f"no dataset {path!r} in {filename}") from None
        if not info.dtype.names or name not in info.dtype.names:
            raise KeyError(f"no dataset {path!r} in {filename}, and {parent!r} has no field "
                           f"{name!r}") from None
        field = name
    if info.vlen_base is not None:
        raise TypeError(f"{info.path} in {filename} holds variable-length rows, which do not "
                        "fit batches of fixed shape; read it with multitables.Reader")
    if not info.shape:
        raise ValueError(f"{info.path} in {filename} is a scalar; there are no rows")
    return info, field


def _unfiltered(filename: str, infos: list[DatasetInfo], kw: dict[str, Any]) -> bool:
    """Whether every dataset is stored without filters (its rows can be read from the file)."""
    with open_file(filename, kw) as file:
        return all(file[info.path].id.get_create_plist().get_nfilters() == 0 for info in infos)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The explicit values, else torch.distributed's, else RANK/WORLD_SIZE, else 0 and 1."""
    if rank is None or world_size is None:
        dist = sys.modules.get("torch.distributed")  # only if the caller uses torch
        if dist is not None and dist.is_available() and dist.is_initialized():
            found = dist.get_rank(), dist.get_world_size()
        else:
            found = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        rank = found[0] if rank is None else rank
        world_size = found[1] if world_size is None else world_size
    world_size = check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be an int, got {rank!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return int(rank), world_size



