"""Training batches of aligned columns straight from HDF5: shuffled, sharded over ranks, resumable.

``Loader`` plays one epoch per iteration. The order of its rows is a pure function of (seed, epoch,
rank, world size) (``_loader/order.py``); worker processes read whole units of rows (a whole
number of HDF5 chunks of every column, ``_loader/job.py``) into shared memory in the order the
epoch needs them, and the consumer gathers each batch from the units in memory with one
``np.take`` per column (``_loader/epoch.py``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._engine import hooks
from ._hdf5.remote import file_of, name_of
from ._hdf5.source import check_positive_int, default_n_procs
from ._loader import files as _files
from ._loader.columns import Columns, resolve_columns, unfiltered
from ._loader.epoch import (
    BatchReads,
    EpochConfig,
    Outputs,
    Reads,
    UnitReads,
    cut,
    pieces,
    rows_of,
)
from ._loader.filestate import FileState
from ._loader.job import costliest_chunk_rows, plan_units
from ._loader.local import Local
from ._loader.order import EpochOrder, check_epoch, plan_rank, worker_batches
from ._loader.pad import Pad
from ._loader.samples import FIXED, SampleReads, first_slot_bytes, value_kind
from ._loader.transforms import Pipeline, sample_rng
from .errors import ClosedError

__all__ = ["Loader", "Pad"]

# A default window holds at least this many chunks (of the costliest dataset, which a unit may
# hold several of) and about this many bytes of rows.
WINDOW_CHUNKS = 16
WINDOW_BYTES = 32 << 20
STATE_VERSION = 1


class Loader:
    """Batches of aligned columns of one HDF5 file (or many, as one), one epoch per iteration.

    Parameters
    ----------
    filename : str, path, list of them, or glob pattern
        The HDF5 file, opened read-only: a path, or a URL (``s3://bucket/key.h5``,
        ``http(s)://...``). Many files read as one dataset, their rows concatenated: a list of
        paths or URLs, or a glob pattern (``"shards/*.h5"``, sorted by name; ``s3://`` keys too,
        by a listing of their prefix). Every column must be in every file; files may differ in
        row counts, chunks and filters. The shuffle permutes the units of all files together;
        their default window holds at most 256 units, and they are always read a window of
        units at a time.
    columns : str, list of str or dict of str
        Dataset paths. One path: batches are arrays. A list: batches are tuples in that order. A
        dict ``name -> path``: batches are dicts. A field of a compound dataset (a PyTables table)
        is spelled as the table's path and the field's name: ``"/table/image"``. All columns must
        have the same number of rows; they stay aligned row for row. A variable-length
        dataset (``h5py.vlen_dtype``, ``h5py.string_dtype()``, a PyTables ``VLArray``) comes as
        a list of its rows: arrays, ``bytes`` (opaque or ASCII) or ``str`` (UTF-8).
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
        Rows mixed together by the shuffle, rounded up to whole units. A window of the whole
        dataset (``window >= n_rows``) is a uniform shuffle. Unfiltered data is not held in
        memory: each batch's rows are read straight from the file, whatever the window, so the
        default there is uniform. Compressed data (a virtual dataset included) is decoded a
        window of units at a time, so memory holds about two windows (a uniform shuffle: all of
        it): the default there is chunk-aware, not uniform, and holds at least 16 chunks and
        about 32 MiB of rows.
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
        poison (all bits set: NaN for floats) until its memory serves a later batch, two or more
        batches on. No allocation per batch; on unfiltered data, no copy either.
    start_method : {'fork', 'spawn', 'forkserver'}, optional
        How workers start; fork by default.
    storage_options : dict, optional
        How to reach a URL: ``endpoint_url``, ``key``, ``secret``, ``token``, ``region``,
        ``anon``, ``headers``, ``timeout``, ``retries`` (S3 settings default from the AWS
        environment). Checked here; ignored for a path.
    cache_dir : str or path, optional
        Keep the byte ranges read from a URL (and its chunk maps) on this local disk, so the
        next epochs read them from there. Its own keyword (not in ``storage_options``); may be
        shared by several Loaders and processes; ignored for a path.
    cache_limit : int, optional
        Bytes the cache may hold (least recently used out first); 10 GiB by default.
    transform : callable, optional
        Applied to each sample **in the worker processes**, before batching: it gets the
        sample spelled as the batch is (a value, a tuple or a dict of the row's columns) and
        returns the sample to batch, of any shape. Given a parameter ``rng``, it gets a
        ``numpy.random.Generator`` seeded from (``seed``, epoch, row): the same numbers for the
        same row wherever and whenever it is made (another worker, a resumed epoch), as
        ``sample_rng(epoch, row)`` gives them; valid during the call only (the next sample
        reseeds it). A batch stacks the
        results' arrays and numbers of one shape and dtype into arrays (in shared memory, not
        pickled); other results (strings, arrays of several shapes) come as lists.
    batch_transform : callable, optional
        Applied to each whole batch in the workers, after ``transform``; it returns the batch
        to deliver. ``multitables.Pad`` pads variable-length columns (token sequences) to the
        batch's longest row: without a ``transform``, the reads do it, each row copied from
        the file to its place in the padded batch. With ``rng``,
        it gets a generator seeded from (``seed``, epoch, the batch's first row).
        Transforms must pickle where workers do not fork (``start_method``, or a Loader sent
        to a spawned DataLoader worker); a transform that raises stops the epoch with a
        ``TransformError`` naming the row and the columns, the worker's traceback included.
    allow_pickle : bool
        Read a PyTables ``VLArray`` of ``ObjectAtom`` (pickled Python objects) by unpickling its
        rows, which can run any code a file holds: only for files you trust.
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
                 storage_options=None, cache_dir=None, cache_limit: int | None = None,
                 transform=None, batch_transform=None, allow_pickle: bool = False, **kw):
        self._args = dict(filename=filename, columns=columns, batch_size=batch_size,
                          shuffle=shuffle, seed=seed, window=window, drop_last=drop_last,
                          rank=rank, world_size=world_size, n_procs=n_procs, copy=copy,
                          start_method=start_method, storage_options=storage_options,
                          cache_dir=cache_dir, cache_limit=cache_limit, transform=transform,
                          batch_transform=batch_transform, allow_pickle=allow_pickle, **kw)
        # Many files (a list, a glob pattern): their rows concatenated (_loader/files.py).
        shards = _files.expand(filename, storage_options, cache_dir, cache_limit)
        # A path as it always was, or a URL's RemoteFile, pinned to its version here (columns).
        self._file = file_of(filename, storage_options, cache_dir, cache_limit) if (
            shards is None) else shards[0]
        self.filename = name_of(self._file) if shards is None else [name_of(f) for f in shards]
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
        # A copy made by pickling (a spawned DataLoader worker) keeps this rank and these
        # workers, whatever its own process would find.
        self._args.update(rank=self.rank, world_size=self.world_size, n_procs=self.n_procs)
        self._columns = resolve_columns(self._file, columns, kw)
        infos = self._columns.infos
        # Variable-length columns and transforms: batches made sample by sample (samples.py).
        self._kinds = tuple(value_kind(info, bool(allow_pickle)) for info in infos)
        self._pipeline: Pipeline | None = None
        self._slot_bytes = 0
        if transform is not None or batch_transform is not None or any(
                kind != FIXED for kind in self._kinds):
            self._pipeline = Pipeline(transform, batch_transform, self.seed,
                                      inherit=(start_method or "fork") == "fork")
            if not self._pipeline.inherit:
                self._pipeline.check_picklable(f"start_method={start_method!r}")
            self._slot_bytes = first_slot_bytes(self._file, infos, self._kinds, self.batch_size,
                                                kw)
        self._shards: _files.Files | None = None
        if shards is None:
            self.n_rows = self._columns.n_rows
            # checked at each epoch
            self._file_state: FileState | _files.Files = FileState(infos[0].filename, infos, kw)
            self._unfiltered = unfiltered(self._file, infos, kw)
            self.unit_rows = plan_units(infos)
            n_units = -(-self.n_rows // self.unit_rows)
        else:
            # Units of every file, read into memory a window at a time, however stored.
            self._shards = _files.describe_files(shards, infos, kw, start_method)
            self.n_rows, self.unit_rows = self._shards.n_rows, self._shards.unit_rows
            self._file_state, self._unfiltered = self._shards, False
            n_units = len(self._shards.unit_starts) - 1
        if window is None and self._unfiltered:
            # Each batch's rows are read from the file, whatever the window: a uniform shuffle
            # costs no memory, and little time (bench/README.md, "The Loader").
            self.window_units = n_units
        elif window is None:
            row_bytes = sum(max(info.row_bytes, 1) for info in infos)
            by_bytes = -(-WINDOW_BYTES // (self.unit_rows * row_bytes))
            # A unit may span several chunks: count the mixing in chunks, not units.
            chunk_rows = min(costliest_chunk_rows(infos) or self.unit_rows, self.unit_rows)
            by_chunks = -(-WINDOW_CHUNKS * chunk_rows // self.unit_rows)
            self.window_units = min(n_units, max(by_chunks, by_bytes))
            if self._shards is not None:
                self.window_units = min(self.window_units, max(by_chunks, _files.WINDOW_UNITS))
        else:
            window = check_positive_int("window", window)
            if self._shards is None:
                self.window_units = min(n_units, -(-window // self.unit_rows))
            else:  # units of many files differ in size: count them at their mean size
                self.window_units = min(n_units, -(-window * n_units // self.n_rows))
        # What the next iteration plays: (epoch, segments of it already played). See state_dict.
        self.order(0)  # a bad seed raises here, not at the first epoch
        self._next_epoch: int = 0
        self._next_history: list[list[int]] = []
        self._playing: _Progress | None = None  # the epoch this process plays or played last
        self._local = Local(start_method)
        self._closed = False
        hooks.track("loaders", self)
        if self.drop_last and len(self) == 0:
            per_rank = self.n_rows // self.world_size
            warnings.warn(
                f"this Loader will never yield a batch: drop_last=True with batch_size="
                f"{self.batch_size} over {self.n_rows:,} rows on {self.world_size} rank(s) "
                f"({per_rank:,} rows per rank, fewer than a batch); use a smaller batch_size "
                "or drop_last=False", stacklevel=2)

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
        self._next_epoch = check_epoch(epoch)  # a bad epoch raises here
        self._next_history = []
        self._playing = None

    def order(self, epoch: int) -> EpochOrder:
        """The order of ``epoch``'s rows (before sharding): ``order(e).rows(0, n_rows)``."""
        return EpochOrder(self.n_rows, self.unit_rows, self.window_units, shuffle=self.shuffle,
                          seed=self.seed, epoch=epoch,
                          unit_starts=None if self._shards is None else self._shards.unit_starts)

    def sample_rng(self, epoch: int, row: int) -> np.random.Generator:
        """The random numbers ``transform`` gets for ``row`` (of the rows concatenated) in
        ``epoch``, as a generator of their own: to check or redo an augmentation."""
        return sample_rng(self.seed, check_epoch(epoch), row)

    # ---- resuming ----

    def state_dict(self) -> dict[str, Any]:
        """Where a Loader given this state resumes: right after the last batch yielded so far,
        or at the start of the next epoch once one has ended (a plain next iteration of this
        Loader starts the next epoch even after a ``break``). Plain JSON-serialisable data."""
        if self._playing is not None:
            epoch, plan, done = self._playing.epoch, self._playing.plan, self._playing.done
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
        if self._shards is not None:
            self._shards.check_state(state.get("files"))
        elif "files" in state:
            raise ValueError(f"the state was taken from a Loader of {len(state['files'])} "
                             f"files, this one reads {self.filename}; resume with the same files")
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(
                    f"the state was taken from a Loader with {key}={state.get(key)!r}, this one "
                    f"has {key}={value!r}; resume with the same settings")
        history = [[int(w), int(k)] for w, k in state["history"]]
        epoch = check_epoch(state["epoch"])  # a bad epoch raises here
        plan_rank(self.n_rows, self.batch_size, self.world_size, self.rank,
                  drop_last=self.drop_last, history=history)  # so does a bad history
        self._next_epoch, self._next_history = epoch, history
        self._playing = None

    def _config(self) -> dict[str, Any]:
        return {"n_rows": self.n_rows, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "seed": self.seed, "unit_rows": self.unit_rows,
                "window_units": self.window_units, "drop_last": self.drop_last,
                **({} if self._shards is None else {"files": self._shards.state()})}

    # ---- iteration ----

    def __iter__(self) -> Iterator[Any]:
        """One epoch: the one chosen by ``set_epoch``/``load_state_dict``, else the next."""
        return self._epoch_batches(worker=0, n_workers=1)

    @property
    def epochs(self) -> _Epochs:
        """Internal interface for integrations that play the epochs in workers of their own
        (``multitables.torch`` and a DataLoader's workers); it may change between releases."""
        return _Epochs(self)

    def _epoch_batches(self, worker: int, n_workers: int) -> Iterator[Any]:
        """This rank's batches of the next epoch; with ``n_workers`` > 1 only ``worker``'s
        contiguous share of them (a DataLoader worker's)."""
        self._check_open()
        self._file_state.check()  # rows removed raise, rows added warn once
        epoch, history = self._next_epoch, self._next_history
        self._next_epoch, self._next_history = epoch + 1, []
        plan = plan_rank(self.n_rows, self.batch_size, self.world_size, self.rank,
                         drop_last=self.drop_last, history=history)
        batches = worker_batches(plan.n_batches, n_workers, worker)
        progress = _Progress(epoch, plan, batches.start)
        if n_workers == 1:
            self._playing = progress
        return self._play(self.order(epoch), plan, batches, progress)

    def _play(self, order: EpochOrder, plan, batches: range,
              progress: _Progress) -> Iterator[Any]:
        if not batches:
            return
        B = self.batch_size
        total = sum(stop - start for start, stop in plan.intervals())
        first, last = batches.start * B, min(batches.stop * B, total)
        intervals = cut(plan.intervals(), first, last)
        local, config = self._here(), self._epoch_config()
        if self._pipeline is not None:
            epoch: Reads | SampleReads = SampleReads(config, local, rows_of(order, intervals),
                                                     order.epoch)
        elif self._reads_batches():
            epoch = BatchReads(config, local, rows_of(order, intervals))
        else:
            epoch = UnitReads(config, local, order, pieces(order, intervals), last - first)
        outputs = None
        try:
            outputs = Outputs(config, epoch.columns)
            for k in batches:
                self._check_open()
                batch = epoch.batch(k * B - first, min((k + 1) * B, total) - first, outputs)
                progress.done = k + 1
                # Batches made in the workers come whole; others as one array per column.
                yield batch if self._pipeline is not None else self._columns.pack(batch)
        finally:
            epoch.close()
            if outputs is not None:
                outputs.end()

    def _reads_batches(self) -> bool:
        """Whether to read each batch's rows from the file (unfiltered data: the page cache
        holds the window) rather than units of a window into memory (compressed data: each
        chunk decoded once)."""
        return self._unfiltered

    def _epoch_config(self) -> EpochConfig:
        samples: dict[str, Any] = dict(pipeline=self._pipeline, kinds=self._kinds,
                                       slot_bytes=self._slot_bytes)
        if self._shards is not None:
            return EpochConfig(self._shards.name, self.file_kwargs, self._columns,
                               self.batch_size, self.unit_rows, self.window_units, self.n_procs,
                               self.copy, self._shards, _files.open_files_limit(), **samples)
        return EpochConfig(str(self.filename), self.file_kwargs, self._columns, self.batch_size,
                           self.unit_rows, self.window_units, self.n_procs, self.copy, **samples)

    def _here(self) -> Local:
        """What this Loader holds in this process: a forked copy (a DataLoader worker) starts
        afresh and leaves its parent's workers and memory alone."""
        if self._local.pid != os.getpid():
            self._local = Local(self.start_method)
            hooks.track("loaders", self)
        return self._local

    # ---- shutdown ----

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"this Loader of {self._name} is closed")

    @property
    def _name(self) -> str:
        return str(self.filename) if self._shards is None else self._shards.name

    def close(self) -> None:
        """End the worker processes and free the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        hooks.untrack("loaders", self)
        self._local.close()  # in a forked copy, leaves the parent's workers and memory alone
        if self._pipeline is not None:
            self._pipeline.release()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    def __reduce__(self):
        # A Loader travels as its arguments and where it stands; workers start where it lands.
        if self._pipeline is not None:
            self._pipeline.check_picklable(
                "sending the Loader to another process (a DataLoader worker that does not "
                "fork, say)")
        return _unpickle, (self._args, self.state_dict())

    def __repr__(self) -> str:
        columns = self._columns.paths
        return (f"<Loader {self._name} {columns} batch_size={self.batch_size} "
                f"shuffle={self.shuffle} rank={self.rank}/{self.world_size}>")


def _unpickle(args: dict[str, Any], state: dict[str, Any]) -> Loader:
    with warnings.catch_warnings():  # the original warned where it was made
        warnings.simplefilter("ignore")
        loader = Loader(**args)
    loader.load_state_dict(state)
    return loader


class _Epochs:
    """What an integration that splits each epoch between workers of its own may ask of a
    Loader: its columns, the epoch it plays next, and one worker's share of that epoch. Made
    afresh by each ``Loader.epochs``, so the Loader holds no reference back to it."""

    def __init__(self, loader: Loader):
        self._loader = loader

    @property
    def columns(self) -> Columns:
        return self._loader._columns

    @property
    def next(self) -> int:
        """The epoch the next iteration plays."""
        return self._loader._next_epoch

    def check_picklable(self, why: str) -> None:
        """TypeError if the Loader's transforms cannot be pickled, which ``why`` needs."""
        if self._loader._pipeline is not None:
            self._loader._pipeline.check_picklable(why)

    def batches(self, worker: int, n_workers: int) -> Iterator[Any]:
        """This rank's batches of the next epoch; with ``n_workers`` > 1 only ``worker``'s
        contiguous share of them. Moves on to the epoch after it, as an iteration does."""
        return self._loader._epoch_batches(worker, n_workers)


@dataclass
class _Progress:
    """An epoch being played: its plan and the batches of it yielded so far."""

    epoch: int
    plan: Any
    done: int


# ------------------------------------------------------------------------------ ranks


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



