"""Batches made sample by sample in a Loader's workers: variable-length columns and transforms
(internal).

A Loader with a variable-length column, a ``transform`` or a ``batch_transform`` reads this way.
Each ticket is one batch: a worker reads the batch's rows of every column in the epoch's order
(fixed-size rows straight into its slot when nothing transforms them), makes each sample and
transforms it, collates the batch, transforms it, and lays it out in its slot (``payload``).
The consumer takes the batches in order (``SampleReads``). Batches no transform makes (none, or
only a ``Pad`` with ``copy=True``) of fixed-size rows and arrays of numbers are laid out as
read instead, with nothing pickled, and the consumer makes the columns (``packed``).

Slots are sized from the columns when the Loader is made. A batch that does not fit (transforms
may make anything) is not written: its header says what it needs, and the consumer starts the
reads again at that batch with slots large enough, kept for the next epochs. Nothing is lost:
a batch's rows and its random numbers do not depend on who makes it, or when.

See NOTE [ Worker shutdown logic ] in _engine/pool.py for the waits and the shutdown.
"""

from __future__ import annotations

import ctypes
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .._engine import timeouts
from .._engine.ring import CLOSED, FilledSlots, Ring, RingJob, RingLayout
from .._engine.shm import PAGE, SharedArena, items, round_up
from .._hdf5 import rawread
from .._hdf5.chunkcache import chunk_cache
from .._hdf5.filejob import OpenFiles
from .._hdf5.hyperslab import read_selection
from .._hdf5.source import DatasetInfo, FileRef, open_file
from .._hdf5.vlenread import VlenRows, pack
from .._keys._indexing import translate
from ..errors import SubprocessException
from .columns import Columns
from .epoch import POISON, EpochConfig
from .job import mapped_before
from .local import Local
from .packed import PackedSlot, read_packed
from .pad import Pad
from .payload import SlotWriter, read_batch
from .transforms import Collator, Pipeline

# How each dataset's rows come to the batch: fixed-size rows as arrays, variable-length ones as
# a list of per-row values.
FIXED, ARRAY, BYTES, STR, OBJECT = "fixed", "array", "bytes", "str", "object"

# A slot holds at least this much; a batch that needs more grows the slots to GROWTH times it.
MIN_SLOT_BYTES = 1 << 20
GROWTH = 1.5
# Rows read to guess the bytes of a variable-length column's batch.
PROBE_ROWS = 64


def value_kind(info: DatasetInfo, allow_pickle: bool) -> str:
    """How the rows of ``info`` come to a batch; raises for rows a Loader cannot give."""
    if info.dtype.names and any(info.dtype[name].hasobject for name in info.dtype.names):
        raise TypeError(f"{info.path} in {info.filename} is a table with variable-length "
                        "fields, which a Loader cannot read; read it with h5py")
    if info.vlen_base is None:
        return FIXED
    if len(info.shape) != 1:
        raise TypeError(f"{info.path} in {info.filename} holds variable-length values in "
                        f"{len(info.shape)} dimensions {info.shape}; a Loader reads "
                        "variable-length columns of one dimension")
    string = h5py.check_string_dtype(info.dtype)
    if string is not None:
        return STR if string.encoding == "utf-8" else BYTES
    if info.pseudo_atom == "vlunicode":
        return STR
    if info.pseudo_atom == "object":
        if not allow_pickle:
            raise ValueError(
                f"{info.path} in {info.filename} holds pickled Python objects (a PyTables "
                "VLArray of ObjectAtom), and unpickling data from a file can run any code it "
                "holds; make the Loader with allow_pickle=True to read them, for files you "
                "trust")
        return OBJECT
    if info.pseudo_atom == "vlstring" or info.vlen_base.kind == "V":
        return BYTES  # PyTables' VLStringAtom, or opaque bytes
    return ARRAY


def _value(kind: str, stored: Any) -> Any:
    """One row as h5py gives it, as the batch gives it."""
    if kind == ARRAY or isinstance(stored, str):
        return stored
    if isinstance(stored, bytes):  # h5py's variable-length strings
        return stored.decode("utf-8") if kind == STR else stored
    if kind == STR:  # PyTables' VLUnicodeAtom: UCS-4 code points
        return stored.astype("<u4").tobytes().decode("utf-32-le")
    if kind == BYTES:
        return stored.tobytes()
    return pickle.loads(stored.tobytes())  # OBJECT: allowed by the caller (value_kind)


def read_values(dataset: h5py.Dataset, kind: str, rows: np.ndarray,
                out: np.ndarray | None = None) -> np.ndarray | list[Any]:
    """The rows ``rows`` (any order, repeats allowed) of ``dataset``: fixed-size ones into
    ``out``, variable-length ones as a list."""
    if kind == FIXED:
        assert out is not None
        read_selection(dataset, translate((rows,), dataset.shape), out)
        return out
    heap = VlenRows.of(dataset)  # rows straight from the file's heap, where it can
    if heap is not None:
        stored = heap.take(rows)
        return stored if kind == ARRAY else [_value(kind, value) for value in stored]
    unique, inverse = np.unique(rows, return_inverse=True)
    values = [_value(kind, stored) for stored in dataset[unique]]  # h5py: increasing rows
    return [values[i] for i in inverse]


def first_slot_bytes(file: FileRef, infos: Sequence[DatasetInfo], kinds: Sequence[str],
                     batch_size: int, kw: dict[str, Any]) -> int:
    """Bytes a slot starts with: a batch of the columns' rows (variable-length ones guessed
    from a few rows spread over the first file) twice over."""
    total = 0
    probe = None
    for info, kind in zip(infos, kinds, strict=True):
        if kind == FIXED:
            total += batch_size * info.row_bytes
            continue
        if probe is None:
            probe = open_file(file, kw)
        n = info.shape[0]
        rows = np.unique(np.linspace(0, n - 1, min(n, PROBE_ROWS)).astype(np.int64))
        values = read_values(probe[info.path], kind, rows)
        mean = sum(len(v) * getattr(v, "itemsize", 4 if kind == STR else 1)
                   for v in values) / max(len(values), 1)
        total += int(batch_size * (mean + 64))  # and what pickling adds
    if probe is not None:
        probe.close()
    return round_up(max(MIN_SLOT_BYTES, 2 * total), PAGE)


def packed_kinds(infos: Sequence[DatasetInfo], kinds: Sequence[str]
                 ) -> list[tuple[np.dtype, tuple[int, ...] | None]] | None:
    """How ``read_packed`` reads each dataset, or None when one cannot be laid out as read:
    variable-length rows other than arrays of native numbers."""
    out: list[tuple[np.dtype, tuple[int, ...] | None]] = []
    for info, kind in zip(infos, kinds, strict=True):
        if kind == FIXED:
            shape, dtype = items(info.shape[1:], info.dtype)
            out.append((dtype, shape))
        elif kind == ARRAY and info.vlen_base is not None and info.vlen_base.isnative:
            out.append((np.dtype(info.vlen_base), None))
        else:
            return None
    return out


def _end_to_end(arrays: Sequence[np.ndarray] | np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``arrays`` (rows h5py read) as one image of bytes, and each one's offset and size in it."""
    sizes = np.array([a.nbytes for a in arrays], np.int64)
    image = np.concatenate([np.ascontiguousarray(a).view(np.uint8).reshape(-1) for a in arrays]
                           ) if len(arrays) else np.empty(0, np.uint8)
    return image, np.cumsum(sizes) - sizes, sizes


def slot_views(ring: Ring) -> list[np.ndarray]:
    """Each slot of ``ring`` as bytes (made once: a view costs microseconds a batch)."""
    return [ring.slot_array(slot, (ring.layout.slot_bytes,), np.uint8)
            for slot in range(ring.layout.n_slots)]


# ---- the workers ----------------------------------------------------------------------------

# glibc's mallopt parameters, and what a worker sets them to (keep_heap).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_THRESHOLD, _MMAP_THRESHOLD = 128 << 20, 32 << 20


def keep_heap() -> None:
    """Keep the memory a batch took for the next batch (this process: a worker).

    What a batch frees at its end (the samples a ``batch_transform`` gets, stacked outside the
    slot; a transform's large temporaries) would otherwise go back to the system as the top of
    glibc's heap, and the next batch fault every page in again: 9 us an image when a batch's
    256 decoded images (9.6 MB) were all freed at its end (bench/README.md, "Images and
    text"). Past 128 MiB free, it still goes back; blocks up to 32 MiB (glibc's own ceiling
    for its adaptive threshold) come from the heap, not from maps of their own."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its own allocator's ways
        pass


@dataclass
class SamplePlan:
    """What the workers of one epoch make: everything they need, picklable for spawn."""

    columns: Columns
    kinds: tuple[str, ...]  # per dataset of columns.infos
    file_kwargs: dict[str, Any]
    batch_size: int
    rows: SharedArena  # the row numbers of every batch, in order (int64)
    n_rows: int
    arena: SharedArena  # the ring's
    layout: RingLayout
    pipeline: Pipeline
    epoch: int
    files: Any = None  # over many files: their Files (rows concatenated)
    max_open: int = 1
    packed: bool = False  # batches laid out as read (packed.py), not pickled (payload.py)

    @property
    def n_tickets(self) -> int:
        return -(-self.n_rows // self.batch_size)


class SampleJob(RingJob):
    """Make the batches of the next tickets, each into a free slot; the first failure (a read,
    a transform) stops the epoch (``RingJob``). See NOTE [ Worker shutdown logic ]."""

    name = "Loader"
    plan: SamplePlan

    def __init__(self, plan: SamplePlan):
        self.plan = plan
        files = plan.files
        self.filename = plan.columns.infos[0].filename if files is None else files.name

    def attach(self, worker: int) -> None:
        plan = self.plan
        keep_heap()
        rawread.keep_maps()  # the rows of the next epochs lie in the same pages
        plan.arena = mapped_before(plan.arena)  # the ring's pages, touched last epoch
        self.ring = Ring(plan.arena, plan.layout)
        self.slots = slot_views(self.ring)
        self.rows = plan.rows.ndarray((plan.n_rows,), np.int64)
        # Rows of a batch are scattered: compressed chunks are often read again.
        self.open = OpenFiles(plan.max_open, chunk_cache(plan.file_kwargs, "random"))

    def detach(self) -> None:
        self.open.close()

    def next_task(self, parent_alive) -> tuple[int, int] | None:
        """A free slot and the ticket to make into it; None when done."""
        return self.ring.take_ticket(self.plan.n_tickets, timeouts.WAIT_SLICE, parent_alive)

    def run(self, task: tuple[int, int]) -> None:
        slot, ticket = task
        plan = self.plan
        B = plan.batch_size
        rows = self.rows[ticket * B : min((ticket + 1) * B, plan.n_rows)]
        view = self.slots[slot]
        if plan.packed:
            self.ring.headers[slot] = (ticket, self._packed(rows, view))
            self.ring.full.push(slot)
            return
        writer = SlotWriter(view)
        pad = plan.pipeline.fused_pad
        # Fixed-size rows nothing transforms are read straight into the slot.
        direct = not plan.pipeline.transforms or pad is not None
        values = self._read(rows, writer.array if direct else np.empty, pad)
        batch = self._batch(rows, plan.columns.cut(values), writer)
        self.ring.headers[slot] = (ticket, writer.finish(batch))
        self.ring.full.push(slot)

    def _read(self, rows: np.ndarray, allocate: Callable, pad: Pad | None) -> list[Any]:
        """Each dataset's ``rows``: an array of fixed-size rows, or a list; with ``pad``,
        variable-length arrays padded (``Pad``), into ``allocate``'s array."""
        infos, kinds = self.plan.columns.infos, self.plan.kinds
        n = len(rows)
        outs: list[Any] = [allocate((n, *info.shape[1:]), info.dtype) if kind == FIXED
                           else [None] * n for info, kind in zip(infos, kinds, strict=True)]
        parts = self._parts(rows)
        for d, (info, kind) in enumerate(zip(infos, kinds, strict=True)):
            if pad is not None and kind == ARRAY:
                pieces, dtype = self._pieces(info, parts, n)
                outs[d] = self._padded(pieces, n, dtype, pad, allocate, rows)
                continue
            if kind == FIXED:
                self._fixed(info, parts, outs[d])
                continue
            for source, local, at in parts:
                dataset = source.dataset(info.path)
                if at is None:
                    outs[d] = read_values(dataset, kind, local)
                else:
                    for i, value in zip(at, read_values(dataset, kind, local), strict=True):
                        outs[d][i] = value
        return outs

    @staticmethod
    def _fixed(info: DatasetInfo, parts: list, out: np.ndarray) -> None:
        """The fixed-size rows of ``info`` that ``parts`` name, into ``out``."""
        for source, local, at in parts:
            dataset = source.dataset(info.path)
            if at is None:
                read_values(dataset, FIXED, local, out)
            else:
                out[at] = read_values(dataset, FIXED, local,
                                      np.empty((len(at), *info.shape[1:]), info.dtype))

    def _parts(self, rows: np.ndarray) -> list[tuple[Any, np.ndarray, np.ndarray | None]]:
        """``rows`` by file: each file's open source, its rows in it, and their places in
        ``rows`` (None: all of them, in order, in one file)."""
        files = self.plan.files
        if files is None:
            return [(self.open.get(0, self.filename), rows, None)]
        which = np.searchsorted(files.starts, rows, side="right") - 1
        parts: list[tuple[Any, np.ndarray, np.ndarray | None]] = []
        for f in np.unique(which):
            mine = np.flatnonzero(which == f)
            parts.append((self.open.get(int(f), files.shards[f].file),
                          rows[mine] - files.starts[f], mine))
        return parts

    def _packed(self, rows: np.ndarray, slot: np.ndarray) -> int:
        """The batch of ``rows`` laid out in ``slot`` (``packed``): the bytes it holds, or
        minus the bytes it needs."""
        infos, kinds, pad = self.plan.columns.infos, self.plan.kinds, self.plan.pipeline.fused_pad
        n = len(rows)
        out = PackedSlot(slot, len(infos), n)
        parts = self._parts(rows)
        for d, (info, kind) in enumerate(zip(infos, kinds, strict=True)):
            if kind == FIXED:
                self._fixed(info, parts, out.rows(d, (n, *info.shape[1:]), info.dtype))
                continue
            dtype = np.dtype(info.vlen_base)
            values, starts, lengths = out.arrays(d)
            end = longest = 0
            for source, local, at in parts:
                end, most = self._pack(source.dataset(info.path), local, at, values, end,
                                       starts, lengths, dtype.itemsize)
                longest = max(longest, most)
            out.close_arrays(end, longest)
            if pad is not None:  # the consumer pads them: what Pad raises is raised here
                try:
                    pad.check(lengths, longest, dtype)
                except Exception as exc:
                    raise self._pad_error(exc, rows) from exc
        return out.finish()

    @staticmethod
    def _pack(dataset: h5py.Dataset, rows: np.ndarray, dest: np.ndarray | None,
              values: np.ndarray, at: int, starts: np.ndarray, lengths: np.ndarray,
              unit: int) -> tuple[int, int]:
        """``rows`` of a variable-length array ``dataset`` (elements of ``unit`` bytes), end to
        end into ``values`` from ``at``, noted at ``dest`` (``vlenread.pack``): from the file's
        heap, or from the arrays h5py reads where the heap cannot be read. Where they end, and
        the longest."""
        heap = VlenRows.of(dataset)
        if heap is not None:
            offsets, sizes = heap.spans(rows)
            return pack(heap.image, offsets, sizes, dest, values, at, starts, lengths, unit)
        image, offsets, sizes = _end_to_end(read_values(dataset, ARRAY, rows))
        return pack(image, offsets, sizes, dest, values, at, starts, lengths, unit)

    def _pieces(self, info: DatasetInfo, parts: list, n: int) -> tuple[list, np.dtype]:
        """Where a variable-length array column's rows lie: in the file's heap, or in arrays
        read through h5py where the heap cannot be read (``pad.Piece``); and their dtype."""
        pieces, dtype = [], np.dtype(info.vlen_base)
        for source, local, at in parts:
            dest = np.arange(n) if at is None else at
            dataset = source.dataset(info.path)
            heap = VlenRows.of(dataset)
            if heap is not None:
                offsets, sizes = heap.spans(local)  # maps what it reads: image after
                pieces.append((heap.image, offsets, sizes, dest))
                dtype = np.dtype(heap.dtype)
                continue
            values = read_values(dataset, ARRAY, local)
            pieces.append((*_end_to_end(values), dest))
            dtype = values[0].dtype
        return pieces, dtype

    def _padded(self, pieces: list, n: int, dtype: np.dtype, pad: Pad, allocate: Callable,
                rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``pad`` of a variable-length array column's rows: each copied from where it lies to
        its place in the padded batch."""
        try:
            return pad.gather(pieces, n, dtype, (), allocate)
        except Exception as exc:  # as Pad raises when it runs after the reads
            raise self._pad_error(exc, rows) from exc

    def _pad_error(self, exc: Exception, rows: np.ndarray) -> Exception:
        return self.plan.pipeline.batch_error(exc, f"the batch of {self._where_rows(rows)}")

    def _batch(self, rows: np.ndarray, values: list[Any], writer: SlotWriter) -> Any:
        """The batch of ``rows`` (each column's ``values``), transformed."""
        plan, pipeline = self.plan, self.plan.pipeline
        if pipeline.transform is None:
            batch = plan.columns.pack(values)
            if pipeline.fused_pad is not None:
                return batch  # padded by the reads (_padded)
        else:
            pack, apply, epoch, where = plan.columns.pack, pipeline.apply, plan.epoch, self._where
            # Stacked straight into the slot, unless a batch transform makes the batch anew.
            allocate = writer.array if pipeline.batch_transform is None else np.empty
            collator = None
            for row, sample in zip(rows.tolist(), zip(*values, strict=True), strict=True):
                result = apply(pack(list(sample)), epoch, row, where)
                try:
                    if collator is None:
                        collator = Collator(result, len(rows), allocate)
                    else:
                        collator.add(result)
                except TypeError as exc:
                    raise TypeError(f"{exc} (the transform's results, rows "
                                    f"{self._where_rows(rows)})") from None
            assert collator is not None
            batch = collator.batch()
        if pipeline.batch_transform is not None:
            batch = pipeline.apply_batch(batch, plan.epoch, int(rows[0]),
                                         lambda: f"the batch of {self._where_rows(rows)}")
        return batch

    def _where(self, row: int) -> str:
        """Row ``row`` (of the rows concatenated), and its columns, for messages."""
        paths = ", ".join(map(repr, self.plan.columns.paths))
        files = self.plan.files
        if files is None:
            return f"row {row} of {self.filename} (columns {paths})"
        f = files.file_of(row)
        return (f"row {row} (row {row - int(files.starts[f])} of {files.shards[f].name}; "
                f"columns {paths})")

    def _where_rows(self, rows: np.ndarray) -> str:
        shown = ", ".join(str(r) for r in rows[:8].tolist())
        more = f", ... ({len(rows)} rows)" if len(rows) > 8 else ""
        return f"rows {shown}{more} of {self.filename}"

    def describe(self, task: tuple[int, int]) -> str:
        """What the failed ``task`` made: its batch, rows and columns."""
        B = self.plan.batch_size
        rows = self.plan.rows.ndarray((self.plan.n_rows,), np.int64)[
            task[1] * B : (task[1] + 1) * B]
        paths = ", ".join(map(repr, self.plan.columns.paths))
        return f"making a batch of {self._where_rows(rows)} (columns {paths})"


# ---- the consumer ---------------------------------------------------------------------------


class SampleReads:
    """The batches of one iteration, made by workers in order, each into a slot of a ring.
    See NOTE [ Worker shutdown logic ] in multitables/_engine/pool.py."""

    def __init__(self, config: EpochConfig, local: Local, sequence: np.ndarray, epoch: int):
        self.config, self.local, self.sequence, self.epoch = config, local, sequence, epoch
        self.columns: list[np.ndarray] = []  # no buffers of the Loader's own (Outputs)
        self.closed = False
        self.lent: tuple[int, int] | None = None  # copy=False: (ticket, bytes) lent out
        self.poisoned: int | None = None  # the one lent before, poisoned, kept one batch more
        self.slot_of: dict[int, int] = {}
        # Batches no transform makes are laid out as read (packed.py): with no transform, or
        # with a Pad the consumer does when it copies the batch anyway.
        pipeline = config.pipeline
        self.packed = packed_kinds(config.columns.infos, config.kinds) if (
            pipeline.transform is None and (pipeline.batch_transform is None or (
                pipeline.fused_pad is not None and config.copy))) else None
        self._start(0, max(local.slot_bytes, config.slot_bytes))
        local.reads.add(self)  # closed with the Loader

    def _start(self, first: int, slot_bytes: int) -> None:
        """Workers making the batches from batch ``first`` on, in slots of ``slot_bytes``."""
        config, B = self.config, self.config.batch_size
        rows = self.sequence[first * B :]
        n_slots = max(1, min(-(-len(rows) // B), 2 * config.n_procs + 2))
        idle = self.local.take_ring()
        if idle is not None and idle.layout.n_slots >= n_slots and (
                idle.layout.slot_bytes >= slot_bytes):
            self.ring = idle.renewed()
        else:
            if idle is not None:
                idle.close()
            self.ring = Ring.create(n_slots, slot_bytes)
        self.first = first
        self.rows = SharedArena(max(8, 8 * len(rows)), name="multitables-rows")
        try:
            self.rows.ndarray((len(rows),), np.int64)[:] = rows
            plan = SamplePlan(config.columns, config.kinds, config.file_kwargs, B, self.rows,
                              len(rows), self.ring.arena, self.ring.layout, config.pipeline,
                              self.epoch, config.files, max(1, config.max_open),
                              self.packed is not None)
            self.crew = self.local.pool().run(SampleJob(plan), config.n_procs)
        except BaseException:
            self.ring.stop()
            self.ring.close()
            self.rows.close()
            raise
        self.filled = FilledSlots(self.ring, self.crew.check)
        self.slots = slot_views(self.ring)

    def batch(self, start: int, stop: int, outputs: Any) -> Any:
        """The batch at sequence offsets ``start:stop`` (a whole batch: ``start`` is a multiple
        of the batch size)."""
        self._end_lease()
        k = start // self.config.batch_size
        while True:
            ticket = k - self.first
            slot = self._wait_for(ticket)
            used = int(self.ring.headers[slot, 1])
            if used >= 0:
                break
            self._grow(k, -used)
        view = self.slots[slot]
        config = self.config
        if self.packed is None:
            batch = read_batch(view, used, config.copy)
        else:
            values = read_packed(view, self.packed, config.copy, config.pipeline.fused_pad)
            # Fixed-size columns come as views of the slot: copied (a column of a table's
            # field, alone), or lent where they are contiguous (a tensor needs them so).
            batch = config.columns.pack([
                (c.copy() if config.copy else np.ascontiguousarray(c))
                if isinstance(c, np.ndarray) else c for c in config.columns.cut(values)])
        if self.config.copy:
            self.ring.free.push(self.slot_of.pop(ticket))
        else:
            self.lent = ticket, used
        return batch

    def _grow(self, k: int, needed: int) -> None:
        """Batch ``k`` needs ``needed`` bytes: make it and the rest again in larger slots."""
        slot_bytes = round_up(int(needed * GROWTH), PAGE)
        self.local.slot_bytes = slot_bytes  # and for the next epochs
        self._stop(keep=False)
        self.poisoned = None  # its slot was in the ring just dropped
        self._start(k, slot_bytes)

    def _wait_for(self, ticket: int) -> int:
        while ticket not in self.slot_of:
            slot = self.filled.pop()
            if slot == CLOSED:
                raise SubprocessException(f"the reads of {self.config.filename} were stopped")
            self.slot_of[int(self.ring.headers[slot, 0])] = slot
        return self.slot_of[ticket]

    def _end_lease(self) -> None:
        """The slot lent to the caller is poisoned and kept for one more batch; the one
        poisoned before goes back to the workers (as ``epoch.BatchReads``)."""
        if self.poisoned is not None:
            self.ring.free.push(self.slot_of.pop(self.poisoned))
            self.poisoned = None
        if self.lent is not None:
            ticket, used = self.lent
            self.slots[self.slot_of[ticket]][:used].fill(POISON)
            self.lent, self.poisoned = None, ticket

    def _stop(self, keep: bool) -> None:
        self.ring.stop()
        self.crew.stop()
        self.rows.close()
        self.slot_of.clear()
        if not (keep and self.local.keep_ring(self.ring)):  # refused once the Loader is closed
            self.ring.close()

    def close(self) -> None:
        """Stop the reads and hand the workers back to the Loader; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._end_lease()
        self._stop(keep=True)
