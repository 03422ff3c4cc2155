"""PyTorch's front door: a ``Loader`` as an ``IterableDataset`` of batches of tensors.

Use it with ``DataLoader(dataset, batch_size=None)``: the batches are made here, by the Loader's
own worker processes, so ``num_workers=0`` is the fast and resumable choice. With
``num_workers > 0`` the DataLoader's workers split each epoch between them (no row twice, none
missing; each reads only its share of the chunks), and the epochs follow one another as without
them: the workers play copies of this object, so the epoch to play lies in a few bytes of shared
memory that every copy reads (``_Epochs``).
"""

from __future__ import annotations

import multiprocessing.context
import sys
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import loader as _loader
from ._engine._ringbuf import Counter
from ._engine.shm import SharedArena
from ._hdf5.source import default_n_procs

__all__ = ["Loader"]


class Loader(IterableDataset):
    """``multitables.Loader(filename, columns, batch_size, ...)`` yielding tensors.

    Same arguments and methods (``set_epoch``, ``state_dict``, ``load_state_dict``, ``order``,
    ``close``, ``len``) as :class:`multitables.Loader`, whose docstring says what each argument
    does; ``loader`` is the :class:`multitables.Loader` underneath. Batches are tensors,
    tuples or dicts of tensors that share memory with the arrays the Loader made (owned by the
    caller unless ``copy=False``).
    Columns must have dtypes torch has: name fields of a table as columns (``"/table/field"``)
    rather than the table itself. In DataLoader worker processes batches are always copies
    (``copy=False`` would lend them only until the next, and the DataLoader sends them later),
    and ``state_dict`` cannot see how far they got mid-epoch: it returns the next epoch's start
    once they have made every batch of the epoch (after the DataLoader's loop over it), and
    refuses before; resume mid-epoch with ``num_workers=0``. The DataLoader must not batch
    again: ``DataLoader(dataset, batch_size=None)``; one that does raises ``ValueError``.

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os, torch
    >>> import multitables.torch
    >>> path = os.path.join(tempfile.mkdtemp(), "doc.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(10.0).reshape(5, 2))
    >>> dataset = multitables.torch.Loader(path, "x", batch_size=2, n_procs=1)
    >>> [batch.shape for batch in torch.utils.data.DataLoader(dataset, batch_size=None)]
    [torch.Size([2, 2]), torch.Size([2, 2]), torch.Size([1, 2])]
    >>> dataset.close()
    """

    def __init__(self, filename, columns, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, window: int | None = None, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None,
                 n_procs: int | None = None, copy: bool = True, start_method: str | None = None,
                 storage_options=None, cache_dir=None, cache_limit: int | None = None,
                 transform=None, batch_transform=None, allow_pickle: bool = False, **kw):
        super().__init__()
        self._n_procs_given = n_procs is not None
        self.loader = _loader.Loader(
            filename, columns, batch_size, shuffle=shuffle, seed=seed, window=window,
            drop_last=drop_last, rank=rank, world_size=world_size, n_procs=n_procs, copy=copy,
            start_method=start_method, storage_options=storage_options, cache_dir=cache_dir,
            cache_limit=cache_limit, transform=transform, batch_transform=batch_transform,
            allow_pickle=allow_pickle, **kw)
        if not _workers_fork():
            self.loader.epochs.check_picklable(
                "a DataLoader worker started by the default start method "
                f"{multiprocessing.get_start_method()!r}")
        columns = self.loader.epochs.columns
        for column in columns.columns if transform is None else ():  # else: what it makes
            path, info = column.path, columns.infos[column.dataset]
            dtype = info.field_dtype(column.field)
            if info.vlen_base is not None:
                continue  # lists: of tensors for numbers, of bytes or str for strings
            if dtype.names is not None:
                raise TypeError(
                    f"column {path!r} is a table ({dtype}); torch has no structured "
                    f"dtype: name its fields as columns, e.g. '{path}/{dtype.names[0]}'")
            if dtype.base.kind not in "biufc":
                raise TypeError(f"column {path!r} holds {dtype.base}, which torch has no "
                                "tensors of; read it with multitables.Loader")
        self._epochs = _Epochs(self.loader.epochs.next)

    def __iter__(self):
        worker, epochs = get_worker_info(), self.loader.epochs
        if worker is None:
            after_workers = self._epochs.after_workers()
            if after_workers is not None and after_workers != epochs.next:
                self.loader.set_epoch(after_workers)  # they played copies of this Loader
            self._epochs.played_here(epochs.next)
            batches = epochs.batches(0, 1)
        else:
            if not self._n_procs_given:  # the DataLoader's workers share the CPUs
                self.loader.n_procs = max(1, default_n_procs() // worker.num_workers)
            self.loader.copy = True  # the DataLoader sends batches on after asking for the next
            epoch = self._epochs.for_worker(worker.num_workers)
            if epoch != epochs.next:
                self.loader.set_epoch(epoch)
            batches = epochs.batches(worker.id, worker.num_workers)
        checked = False
        for batch in batches:
            if not checked:  # the DataLoader asks for the first batch now: see who asks
                _refuse_automatic_batching(self, sys._getframe(1))
                checked = True
            yield _tensors(batch)
        if worker is not None:
            self._epochs.finished()  # this worker's share of the epoch is all made

    def __len__(self) -> int:
        """Batches this rank yields in an epoch (the same on every rank)."""
        return len(self.loader)

    def __repr__(self) -> str:
        return repr(self.loader).replace("<Loader", "<multitables.torch.Loader", 1)

    def order(self, epoch: int):
        """The order of ``epoch``'s rows: see :meth:`multitables.Loader.order`."""
        return self.loader.order(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Play ``epoch`` at the next iteration (DataLoader workers included); later ones
        follow it."""
        self.loader.set_epoch(epoch)
        self._epochs.set(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where a Loader given this state resumes (see :meth:`multitables.Loader.state_dict`).
        Once DataLoader workers have played, the start of the next epoch when they have made
        every batch of theirs (take it after the DataLoader's loop over an epoch: inside it, the
        last batches made may still wait in the DataLoader's queue); mid-epoch it raises, as
        it cannot see how far they got."""
        if self._epochs.played_in_workers():
            next_epoch = self._epochs.boundary()
            if next_epoch is None:
                raise RuntimeError(
                    "state_dict() cannot see how far DataLoader workers got in the epoch they "
                    "are playing: take it at an epoch boundary (after the DataLoader's loop "
                    "over the epoch), or resume mid-epoch with num_workers=0 (the Loader's own "
                    "processes read in parallel)")
            return {**self.loader.state_dict(), "epoch": next_epoch, "history": []}
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from ``state``: see :meth:`multitables.Loader.load_state_dict`."""
        self.loader.load_state_dict(state)
        self._epochs.set(self.loader.epochs.next)

    def close(self) -> None:
        """End the worker processes and free the shared memory. Idempotent."""
        self.loader.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Epochs:
    """The epoch DataLoader workers play, shared by every copy of one ``Loader``.

    Each worker takes a ticket when it starts an epoch (``num_workers`` tickets an epoch, with
    or without persistent workers), so ticket ``t`` plays epoch ``base + t // num_workers``;
    ``set`` (``set_epoch``, ``load_state_dict``, an epoch played in the main process) moves
    ``base`` and starts the tickets again. The main process writes only between epochs.
    """

    def __init__(self, base: int):
        self._arena = SharedArena(256, name="multitables-epochs")
        self._map()
        self.set(base)

    def _map(self) -> None:
        # Each word on a cache line of its own, as the ring's counters.
        self._base = self._arena.ndarray((1,), np.int64, 0)
        self._tickets = self._arena.ndarray((1,), np.int64, 64)
        self._done = self._arena.ndarray((1,), np.int64, 128)  # worker shares played to the end
        self._workers = self._arena.ndarray((1,), np.int64, 192)  # num_workers of the tickets

    def set(self, base: int) -> None:
        self._base[0], self._tickets[0], self._done[0] = base, 0, 0

    def played_here(self, epoch: int) -> None:
        self.set(epoch + 1)

    def played_in_workers(self) -> bool:
        return bool(self._tickets[0])

    def after_workers(self) -> int | None:
        """The epoch after the last one DataLoader workers started, if they played since the
        last ``set``; an epoch they left unfinished counts as played."""
        tickets, workers = int(self._tickets[0]), int(self._workers[0])
        if not tickets or not workers:
            return None
        return int(self._base[0]) - (-tickets // workers)

    def for_worker(self, num_workers: int) -> int:
        self._workers[0] = num_workers
        ticket = Counter(self._arena.buffer, 64).fetch_add(1)
        return int(self._base[0]) + ticket // num_workers

    def finished(self) -> None:
        """A worker has played its share of its epoch to the end."""
        Counter(self._arena.buffer, 128).fetch_add(1)

    def boundary(self) -> int | None:
        """The epoch after the last one workers played, if every share of every epoch they
        started has been played to the end (no epoch under way); else None."""
        tickets, done, workers = int(self._tickets[0]), int(self._done[0]), int(self._workers[0])
        if not workers or tickets % workers or done != tickets:
            return None
        return int(self._base[0]) + tickets // workers

    def __getstate__(self):
        # The arena travels to a process being started (a spawned DataLoader worker); a plain
        # pickle (a copy saved or sent elsewhere) starts sharing anew.
        spawning = multiprocessing.context.get_spawning_popen() is not None
        return {"arena": self._arena if spawning else None, "base": int(self._base[0])}

    def __setstate__(self, state) -> None:
        if state["arena"] is None:
            self.__init__(state["base"])  # type: ignore[misc]
        else:
            self._arena = state["arena"]
            self._map()


def _refuse_automatic_batching(dataset: Loader, caller: Any) -> None:
    """Raise if the DataLoader batches our batches again (its ``batch_size`` is not None): its
    fetcher, which asks our iterator for the batch, says so. ``batch_size=1`` (the default)
    would add a dimension of 1 without a word; larger ones stack batches, and fail with a stack
    error at an epoch's short last batch."""
    fetcher = caller.f_locals.get("self") if caller is not None else None
    if getattr(fetcher, "dataset", None) is dataset and getattr(fetcher, "auto_collation", False):
        raise ValueError(
            "multitables.torch.Loader yields whole batches (its batch_size); the DataLoader "
            "would batch them again, stacking several into one: make it with "
            "DataLoader(dataset, batch_size=None)")


def _workers_fork() -> bool:
    """Whether a DataLoader's workers get this dataset without pickling it: they fork unless
    the default start method says otherwise (then the Loader's transforms must pickle)."""
    return multiprocessing.get_start_method(allow_none=True) in (None, "fork")


def _tensors(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {name: _tensor(a) for name, a in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_tensor(a) for a in batch)
    return _tensor(batch)


def _tensor(part: Any) -> Any:
    """Arrays of numbers as tensors, lists of them as lists of tensors; the rest as it is
    (strings, bytes, what a transform made)."""
    if isinstance(part, list):
        return [_tensor(value) if isinstance(value, np.ndarray) else value for value in part]
    if not isinstance(part, np.ndarray) or part.dtype.kind not in "biufc":
        return part
    if not part.dtype.isnative:  # torch has native byte order only
        part = part.astype(part.dtype.newbyteorder("="))
    return torch.from_numpy(part)
