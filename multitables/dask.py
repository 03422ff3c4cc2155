"""A dask array of an HDF5 dataset whose tasks read whole chunks through multitables' read paths.

``from_hdf5(filename, path)`` checks the dataset in the caller and returns a ``dask.array.Array``
with one block per run of whole HDF5 chunks along the first axis; over a list or glob of files,
the files' datasets concatenated, each file's blocks its own. Each task reads its rows with
:func:`multitables._hdf5.hyperslab.read_selection`, the code the Streamer's workers run (``pread``
past HDF5 for unfiltered data, ISA-L/Blosc decoders for compressed chunks), straight into the
block's array. The graph holds no h5py object: a task is the file name, the dataset path, the h5py
options and a row range, so it pickles small and computes on any process that sees the file,
such as the workers of a dask.distributed cluster on a shared file system. Each process keeps the
files its tasks opened in a small cache (reopened after a fork, closed at exit), and the memory of
dropped blocks for the next ones. Threads of one
process take turns on a compressed dataset, so for those one-thread worker processes are the
fast configuration.

Needs the ``dask`` extra: ``pip install multitables[dask]``.

Example
-------
>>> import os, tempfile
>>> import h5py, numpy as np
>>> import multitables.dask
>>> filename = os.path.join(tempfile.mkdtemp(), "example.h5")
>>> with h5py.File(filename, "w") as f:
...     _ = f.create_dataset("data", data=np.arange(20.0).reshape(10, 2), chunks=(4, 2))
>>> x = multitables.dask.from_hdf5(filename, "/data", chunks=8)
>>> x.chunks  # 8 rows are two whole chunks of 4
((8, 2), (2,))
>>> float((2 * x[::3]).sum().compute(scheduler="threads"))
152.0
>>> multitables.dask.close_files()
>>> os.remove(filename)
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
from dask.array.core import graph_from_arraylike
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph
from dask.utils import parse_bytes

from ._engine import hooks
from ._engine._lent import Lent
from ._hdf5.chunkcache import chunk_cache
from ._hdf5.hyperslab import read_selection, result_layout
from ._hdf5.rawread import RawRows
from ._hdf5.remote import RemoteFile, file_of, name_of
from ._hdf5.source import (
    DatasetInfo,
    FileRef,
    OpenFile,
    check_positive_int,
    check_rows,
    describe,
)
from ._keys._indexing import translate
from ._loader.files import each_file, expand, file_infos

__all__ = ["close_files", "from_hdf5"]

# Open files a process keeps: a worker usually reads one or two datasets; a few more cost a file
# descriptor and HDF5's metadata each.
_MAX_FILES = 8


def from_hdf5(filename: str | os.PathLike, path: str, chunks: int | None = None,
              field: str | None = None, *, storage_options: dict[str, Any] | None = None,
              cache_dir: str | os.PathLike | None = None, cache_limit: int | None = None,
              **file_kwargs: Any) -> da.Array:
    """The dataset ``path`` of the HDF5 file ``filename`` as a dask array.

    Parameters
    ----------
    filename, path
        The file (a path every process that computes the array can open, or a URL:
        ``s3://bucket/key.h5``, ``http(s)://...``) and the dataset in it. Many files read as
        one array, their rows concatenated along axis 0: a list of paths or URLs, or a glob
        pattern (``"shards/*.h5"``, matches sorted by name; ``s3://bucket/part-*.h5`` lists
        the bucket's prefix). Every file must hold ``path`` with the same dtype and row shape;
        files may differ in row counts, chunks and filters, and each file's blocks are its
        own whole chunks (a block never spans two files).
    chunks
        Rows per block, rounded to a whole number of HDF5 chunks (at least one). By default the
        whole chunks nearest to dask's ``array.chunk-size`` (128 MiB unless configured).
        Contiguous datasets are split in row ranges of this many rows.
    field
        One field of a compound dataset; its subarray shape, if any, adds trailing axes.
    storage_options : dict, optional
        How to reach a URL: ``endpoint_url``, ``key``, ``secret``, ``token``, ``region``,
        ``anon``, ``headers``, ``timeout``, ``retries`` (S3 settings default from the AWS
        environment of the caller; the tasks get them with the graph). Ignored for a path.
    cache_dir, cache_limit : optional
        A local disk cache of the byte ranges read from a URL, and its size in bytes (10 GiB
        by default), for every process that computes the array. Ignored for a path.
    **file_kwargs
        Options for ``h5py.File`` (``driver``, ``rdcc_nbytes``...) used by every task.

    Returns
    -------
    dask.array.Array
        Equal to ``h5py.File(filename)[path][()]`` (or to that field), blocked along axis 0 only.

    Raises
    ------
    FileNotFoundError, OSError
        The file is missing or not HDF5.
    KeyError
        No dataset ``path`` in the file (``TypeError`` if it is a group).
    ValueError, TypeError
        An unknown ``field``, ``chunks`` not an int >= 1, a scalar or variable-length dataset.
        Over many files, ValueError naming the file that lacks ``path`` or holds rows of
        another shape or dtype than the first file's, and for an empty list or a pattern that
        matches nothing.
    """
    files = expand(filename, storage_options, cache_dir, cache_limit)
    if files is not None:
        return _from_files(files, path, chunks, field, file_kwargs)
    file = file_of(filename, storage_options, cache_dir, cache_limit)
    if not isinstance(file, RemoteFile):
        file = os.path.abspath(file)
    info = describe(file, path, file_kwargs)
    check_rows(info.path, file, info.shape, info.vlen_base,
               scalar=" dataset; read it with h5py", vlen="; a dask array needs a fixed dtype")
    fdt = info.field_dtype(field)
    rows = _block_rows(info, fdt, chunks)
    n = info.shape[0]
    row_chunks = tuple(min(rows, n - a) for a in range(0, n, rows)) or (0,)
    # Every task reads whole chunks, and no two tasks read the same chunk: HDF5's chunk cache
    # would only keep chunks no task asks for again, and copy each one more time.
    source = _BlockSource(file, info.path, chunk_cache(file_kwargs, "once"), field)
    shape = info.shape + fdt.shape
    block_chunks = (row_chunks,) + tuple((d,) for d in shape[1:])
    # The file's version (size and modification time, or an object's pinned size and ETag) is
    # in the name: a rewritten file is a new array, never the results a cluster kept of the old.
    name = "from-hdf5-" + tokenize(source, block_chunks, *_version(file))
    graph = graph_from_arraylike(source, block_chunks, shape, name, getitem=_read_block,
                                 inline_array=True, dtype=fdt.base)
    return da.Array(graph, name, block_chunks, meta=np.empty((0,) * len(shape), fdt.base))


def _from_files(files: list[FileRef], path: str, chunks: int | None, field: str | None,
                file_kwargs: dict[str, Any]) -> da.Array:
    """The datasets ``path`` of ``files`` concatenated along axis 0, each file's blocks its
    own whole chunks (a block never spans two files)."""
    files = [f if isinstance(f, RemoteFile) else os.path.abspath(f) for f in files]
    try:
        first = describe(files[0], path, file_kwargs)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{name_of(files[0])}: {exc.args[0] if exc.args else exc}; every "
                         "file must hold the dataset") from None
    check_rows(first.path, files[0], first.shape, first.vlen_base,
               scalar=" dataset; read it with h5py", vlen="; a dask array needs a fixed dtype")
    fdt = first.field_dtype(field)
    infos = [found[0] for found in each_file(file_infos, files, [first], file_kwargs, None)]
    kwargs = chunk_cache(file_kwargs, "once")
    blocks: list[tuple[_BlockSource, int, int]] = []
    for file, info in zip(files, infos, strict=True):
        n, rows = info.shape[0], _block_rows(info, fdt, chunks)
        source = _BlockSource(file, info.path, kwargs, field)
        blocks += [(source, a, min(a + rows, n)) for a in range(0, n, rows)]
    if not blocks:  # every file empty: one empty block
        blocks = [(_BlockSource(files[0], first.path, kwargs, field), 0, 0)]
    shape = (sum(info.shape[0] for info in infos),) + first.shape[1:] + fdt.shape
    block_chunks = (tuple(b - a for _, a, b in blocks),) + tuple((d,) for d in shape[1:])
    # Every file's version in the name, as for one file: a rewritten shard is a new array.
    name = "from-hdf5-" + tokenize(blocks, [_version(f) for f in files])
    tail = (0,) * (len(shape) - 1)
    graph: dict[Any, Any] = {(name, k, *tail): (_read_rows, source, a, b)
                             for k, (source, a, b) in enumerate(blocks)}
    return da.Array(HighLevelGraph.from_collections(name, graph, dependencies=()), name,
                    block_chunks, meta=np.empty((0,) * len(shape), fdt.base))


def _version(file: FileRef) -> tuple:
    """What identifies the bytes of ``file``: the pinned size and ETag of an object, the size
    and modification time of a path."""
    if isinstance(file, RemoteFile):
        return file.source.identity
    stat = os.stat(file)
    return stat.st_size, stat.st_mtime_ns


def _read_rows(source: _BlockSource, start: int, stop: int) -> np.ndarray:
    """The task of one block of a dataset over many files: rows ``start:stop`` of one file."""
    return source.read(start, stop)


def _block_rows(info: DatasetInfo, dtype: np.dtype, rows: int | None) -> int:
    """Rows per block: ``rows`` (or about dask's ``array.chunk-size`` of ``dtype`` elements)
    rounded to the nearest whole number of chunks along axis 0, never less than one chunk."""
    row_bytes = max(1, dtype.itemsize * math.prod(info.shape[1:]))
    if rows is None:
        target = parse_bytes(dask.config.get("array.chunk-size"))
        rows = max(1, target // row_bytes)
    else:
        rows = check_positive_int("chunks", rows)
    if info.chunk_rows:  # a virtual dataset's: its sources'
        rows = max(1, round(rows / info.chunk_rows)) * info.chunk_rows
    return max(1, min(rows, info.shape[0]))


@dataclass(frozen=True)
class _BlockSource:
    """What a task needs to read rows of a dataset: plain data that pickles as it reads."""

    filename: FileRef
    path: str
    file_kwargs: dict[str, Any]
    field: str | None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (of ``field``), read into a new array."""
        entry = _acquire(self.filename, self.file_kwargs)
        try:
            dataset = entry.source.dataset(self.path)
            sel = translate((slice(start, stop),), dataset.shape)
            shape, dtype = result_layout(sel, dataset.dtype, self.field)
            out = _new_block(shape, dtype)
            # Whole rows of unfiltered data are preads into ``out`` (rawread) that threads may
            # do at once; the other paths keep per-dataset state, and threads take turns there.
            alone = self.field is None and out.size > 0 and RawRows.of(dataset) is not None
            with contextlib.nullcontext() if alone else entry.lock:
                read_selection(dataset, sel, out, self.field)
        finally:
            _release(entry)
        return out

    def __dask_tokenize__(self) -> Any:
        return (str(self.filename), self.path, sorted(self.file_kwargs.items()), self.field)


def _read_block(source: _BlockSource, index: tuple[slice, ...]) -> np.ndarray:
    """The task of one block: ``index`` is the block's slices, whole along every axis but 0."""
    return source.read(index[0].start, index[0].stop)


# ------------------------------------------------------------------------------ block memory
# A new block of 128 MiB costs the kernel 32,768 pages to map and zero before a byte is read into
# it, about what reading it costs; and dask drops each block once the tasks that use it are done.
# So a block's memory goes back to this process's pool when the last array viewing it goes, and
# the next block of that size takes it, its pages already mapped. Blocks under _MIN_POOLED come
# from malloc, which reuses memory of that size by itself.
_MIN_POOLED = 1 << 20
_POOL_BYTES = 256 << 20  # free memory the pool keeps at most: two default blocks
_free: dict[int, list[np.ndarray]] = {}
_free_bytes = 0
_pool_lock = threading.Lock()


def _new_block(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array for a block, on pooled memory when it is large."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MIN_POOLED:
        return np.empty(shape, dtype)
    global _free_bytes
    with _pool_lock:
        free = _free.get(nbytes)
        memory = free.pop() if free else None
        if memory is not None:
            _free_bytes -= nbytes
    if memory is None:
        memory = np.empty(nbytes, np.uint8)
    # The memory goes back to the pool with the last view of the block (see _lent.pyx).
    owner = Lent(memory, functools.partial(_give_back, memory))
    return np.frombuffer(owner, dtype).reshape(shape)  # type: ignore[call-overload]


def _give_back(memory: np.ndarray) -> None:
    global _free_bytes
    with _pool_lock:
        if _free_bytes + memory.nbytes <= _POOL_BYTES:
            _free.setdefault(memory.nbytes, []).append(memory)
            _free_bytes += memory.nbytes


# ------------------------------------------------------------------------------ per-process cache
# One process-wide cache of open files, each with a lock for the reads that need one. The decode
# and HDF5 paths keep per-dataset state (file spaces, a decoder's scratch chunks) that two
# threads must not share, and opening a file again in another thread does not give fresh state:
# h5py's ids of one dataset compare equal across opens, and those caches are keyed by them. So
# the threads of one process (dask's threaded scheduler, a distributed worker with several
# threads) take turns on a compressed dataset; processes, as in a cluster of one-thread workers,
# decode in parallel. A file leaves the cache at once but closes when its last read ends.


class _Cached:
    def __init__(self, filename: FileRef, file_kwargs: dict[str, Any]):
        self.source = OpenFile(filename, file_kwargs)
        self.lock = _file_lock(filename)
        self.readers = 0  # reads in progress; changed under _cache_lock
        self.evicted = False


_cache: OrderedDict[tuple[str, str], _Cached] = OrderedDict()
_locks: dict[str, threading.Lock] = {}  # one per file, by real path: kept for the process's life
_cache_lock = threading.Lock()
_inherited: list[_Cached] = []  # a forked child's copies of its parent's open files


def _file_lock(filename: FileRef) -> threading.Lock:
    key = str(filename) if isinstance(filename, RemoteFile) else os.path.realpath(filename)
    return _locks.setdefault(key, threading.Lock())


def _acquire(filename: FileRef, file_kwargs: dict[str, Any]) -> _Cached:
    """This process's open ``filename``, held open until :func:`_release`: from the cache, else
    opened (the least recently used one evicted when the cache is full)."""
    # A file in an object store by its pinned version: the tasks of one graph each unpickle
    # their own copy of it, and share one open file (and its connections) per process.
    name = repr(filename.source.identity) if isinstance(filename, RemoteFile) else filename
    key = (name, repr(sorted(file_kwargs.items())))
    with _cache_lock:
        entry = _cache.get(key)
        if entry is None:
            entry = _cache[key] = _Cached(filename, file_kwargs)
            if len(_cache) > _MAX_FILES:
                _evict(_cache.popitem(last=False)[1])
        else:
            _cache.move_to_end(key)
        entry.readers += 1
        return entry


def _release(entry: _Cached) -> None:
    with _cache_lock:
        entry.readers -= 1
        if entry.evicted and not entry.readers:
            entry.source.close()


def _evict(entry: _Cached) -> None:
    """Close ``entry`` now, or when its last read ends (called under _cache_lock)."""
    entry.evicted = True
    if not entry.readers:
        entry.source.close()


def close_files() -> None:
    """Close the files this process opened for dask tasks (those being read: when their reads
    end); later tasks open them again."""
    with _cache_lock:
        while _cache:
            _evict(_cache.popitem()[1])


def _after_fork_in_child() -> None:
    # The parent still reads through the files it had open. Closing the child's copies would
    # also drop the parent's lock on them (one open file description), so they are kept, unused.
    global _cache_lock, _pool_lock
    _inherited.extend(_cache.values())
    _cache.clear()
    _locks.clear()
    _cache_lock = threading.Lock()  # another thread may have held it at the fork
    _pool_lock = threading.Lock()


hooks.on_fork("dask files", after_in_child=_after_fork_in_child)
hooks.on_exit("dask files", close_files)
