"""Random access with numpy-style keys: requests served by workers into shared-memory stages."""

from __future__ import annotations

import functools
import os
import threading
import weakref

import numpy as np

from ._engine import hooks, timeouts
from ._hdf5.remote import file_of, keywords_of, location_of, name_of
from ._hdf5.source import check_positive_int, default_n_procs, describe
from ._reader.dispatch import Dispatcher
from ._reader.futures import Request
from ._reader.lending import lend
from ._reader.memory import MemoryKeeper
from ._reader.proxies import DatasetProxy, make_proxy
from ._reader.readspec import ARRAY, ReadSpec
from ._reader.stages import Stage, StagePool
from .errors import ClosedError

__all__ = ["Reader"]



class Reader:
    """Random access to the datasets of one HDF5 file, read by worker processes.

    Parameters
    ----------
    filename : str or path
        The HDF5 file: a path, or a URL (``s3://bucket/key.h5``, ``http(s)://...``); opened
        (read-only) by ``get_dataset``, so a missing file raises there.
    n_procs : int, optional
        Worker processes serving requests, at most. By default the CPUs this process may run
        on (``os.sched_getaffinity``), at most 4. The first starts with the first request,
        each other once requests wait on the started ones for longer than a worker takes to
        start (or for a large read split over them): a loop whose requests come back as fast
        as it makes them is served by one, and pays for no other's start-up.
    start_method : {'fork', 'spawn', 'forkserver'}, optional
        How workers start; fork by default.
    allow_pickle : bool
        Unpickle the object rows of PyTables ``VLArray``s of ``ObjectAtom`` (their bytes are
        pickles, and unpickling runs whatever code the file holds). Off by default, as for
        ``np.load``: reading such rows then raises an error that names this flag. Pass True
        only for files you trust.
    storage_options : dict, optional
        How to reach a URL: ``endpoint_url``, ``key``, ``secret``, ``token``, ``region``,
        ``anon``, ``headers``, ``timeout``, ``retries`` (S3 settings default from the AWS
        environment). Checked here; ignored for a path.
    cache_dir : str or path, optional
        Keep the byte ranges read from a URL (and its chunk maps) on this local disk, so that
        reading them again costs no request. Its own keyword (not in ``storage_options``);
        ignored for a path.
    cache_limit : int, optional
        Bytes the cache may hold (least recently used out first); 10 GiB by default.
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
                 allow_pickle: bool = False, storage_options=None, cache_dir=None,
                 cache_limit: int | None = None, **kw):
        # A path as it always was, or a URL's RemoteFile, pinned to its version at first use.
        self._file = file_of(filename, storage_options, cache_dir, cache_limit)
        self.filename = name_of(self._file)
        self.n_procs = check_positive_int(
            "n_procs", default_n_procs() if n_procs is None else n_procs)
        self.allow_pickle = bool(allow_pickle)
        self.file_kwargs = kw
        self.start_method = start_method
        # Stages alive; the memory of those closed or dropped is unmapped by the workers at the
        # next dispatch.
        self._stages: weakref.WeakValueDictionary[int, Stage] = weakref.WeakValueDictionary()
        self._ids = iter(range(1 << 50))  # of stages
        self._closed = False
        self._memory = MemoryKeeper()
        self._forget_inherited()
        hooks.track("readers", self)

    def _forget_inherited(self) -> None:
        """No workers yet (they start with the first request). Also run in a forked child (a
        DataLoader worker, a Pool's), where the workers are the parent's: this copy starts its
        own, and every stage is mapped anew in them. See NOTE [ Worker shutdown logic ], (7)."""
        self._owner = os.getpid()
        # Reentrant: a failure found while dispatching closes the Reader in the same thread.
        self._lock = threading.RLock()
        self._memory.forget_inherited(list(self._stages.values()))
        # Its checks reach this Reader weakly: the dispatcher is this Reader's, and a cycle
        # would keep a Reader nobody holds, and its workers, until the garbage collector runs.
        self._dispatcher = Dispatcher(self._file, self.file_kwargs, self.n_procs,
                                      self.start_method, self._memory,
                                      functools.partial(_check_serving, weakref.ref(self)))

    @property
    def _pool(self):
        """The workers' crew while they serve (None before the first request): for tests."""
        return self._dispatcher.pool

    def __reduce__(self):
        # A Reader travels (to a spawned process, a Pool's task) as its arguments; the copy
        # starts its own workers lazily where it lands.
        return _rebuild_reader, (location_of(self._file), self.n_procs, self.start_method,
                                 self.allow_pickle, self.file_kwargs, keywords_of(self._file))

    # ---- datasets and stages ----

    def get_dataset(self, path: str) -> DatasetProxy:
        """A proxy of the dataset at ``path``: index it to describe requests."""
        self.check_open()
        return make_proxy(self, describe(self._file, path, self.file_kwargs))

    # ---- for the Reader's proxies and requests (``_reader.owner.Owner``); not public API ----

    def register(self, stage: Stage) -> Stage:
        """Make ``stage`` this Reader's: numbered, mapped by workers as they serve it."""
        self.check_open()
        stage.id = next(self._ids)
        self._stages[stage.id] = stage
        self._memory.adopt(stage.memory)
        return stage

    def waited(self, seconds: float) -> None:
        """A request's ``get()`` waited ``seconds`` for its result (see ``Dispatcher.pick_worker``:
        a second worker is woken only where a request costs a worker more than the caller)."""
        self._dispatcher.waited += seconds

    def hand_over(self, stage: Stage, view: np.ndarray) -> np.ndarray:
        """``view``, the result in ``stage``, as an array of its own: the stage's memory goes
        with it, and the stage takes spare memory (or new) for its next request."""
        with self._lock:
            memory = stage.memory
            if self._closed or stage.closed or memory.arena.closed:
                return view.copy()  # closed meanwhile: the memory is not this Reader's to lend
            stage.memory = self._memory.spare(stage.nbytes)
        return lend(view, memory, self._memory.take_back)

    def check_serving(self) -> None:
        """Raise if the workers failed, closing this Reader; called between the slices of
        every wait."""
        if self._closed:
            raise ClosedError("the reader was closed while a request was pending")
        try:
            self._dispatcher.raise_failure()
        except Exception:
            self.close(wait=False)
            raise

    def check_open(self, what: str = "this Reader") -> None:
        if self._closed:
            raise ClosedError(f"{what} of {self.filename} is closed")

    # ---- requests ----

    def request(self, key, stage: Stage | StagePool) -> Request:
        """Schedule the read that ``key`` describes into ``stage`` (or a free stage of a pool).

        ``key`` is a proxy indexed with the wanted selection (``ds[30:35]``, ``ds['col'][[1, 2]]``,
        a whole proxy for all of it), or what ``where``/``read_sorted`` return.
        """
        if self._closed:
            self.check_open()
        parts = None
        if isinstance(key, DatasetProxy):
            if key.reader is not self:
                raise ValueError(f"{key!r} belongs to another Reader")
            spec = key.spec()
            if spec.kind == ARRAY and self.n_procs > 1:
                parts = key.split(self.n_procs)  # a large read: over several workers
        elif isinstance(key, ReadSpec):
            spec = key
        else:
            raise TypeError(
                f"request() takes a dataset proxy indexed with a key (reader.get_dataset(path)"
                f"[key]), got {type(key).__name__}"
            )
        request = Request(self, spec)
        if isinstance(stage, StagePool):
            claimed = stage.take(request, self._check_serving_locked)
        elif isinstance(stage, Stage):
            stage.claim(request)
            claimed = stage
        else:
            raise TypeError(f"request() needs a stage or a stage pool, got {type(stage).__name__}")
        if spec.nbytes > claimed.nbytes:
            try:
                claimed.check_fits(spec.nbytes, spec.shape, spec.dtype)  # says why, in numbers
            except Exception as exc:
                claimed.free()  # the stage is free again
                return request.fail(exc)
        try:
            with self._lock:
                if self._closed:
                    self.check_open()
                # See NOTE [ Worker shutdown logic ], step (3).
                self._dispatcher.dispatch(claimed, parts or (spec,))
        except BaseException:
            claimed.free()
            raise
        request.stage = claimed
        return request

    def _check_serving_locked(self) -> None:
        """``check_serving`` between the dispatches of other threads."""
        with self._lock:
            self.check_serving()

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
            self._dispatcher.stop(wait)
        finally:
            if locked:
                self._lock.release()
        self._memory.close()  # first: the stages' memory need not be unmapped in the workers
        for stage in list(self._stages.values()):
            stage.close()
        self._stages.clear()

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


def _rebuild_reader(filename, n_procs, start_method, allow_pickle, file_kwargs,
                    remote=None) -> Reader:
    return Reader(filename, n_procs, start_method=start_method, allow_pickle=allow_pickle,
                  **(remote or {}), **file_kwargs)


def _close_live_readers() -> None:  # See NOTE [ Worker shutdown logic ], step (6).
    for reader in hooks.tracked("readers"):
        reader.close(wait=False)


def _forget_inherited_readers() -> None:  # See NOTE [ Worker shutdown logic ], step (7).
    for reader in hooks.tracked("readers"):
        reader._forget_inherited()  # a Reader's own method: this hook is part of reader.py


hooks.on_exit("readers", _close_live_readers)
hooks.on_fork("readers", after_in_child=_forget_inherited_readers)


def _check_serving(reader_ref) -> None:
    reader = reader_ref()
    if reader is not None:  # else it is being collected, and closes its dispatcher
        reader.check_serving()
