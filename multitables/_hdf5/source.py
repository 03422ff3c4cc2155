"""Where a dataset lives and what it holds: validated in the caller, reopened by each worker.

Internal module. The caller opens the file only long enough to check the request and read the
layout (``DatasetInfo``), then closes it, so no HDF5 file is ever open across a fork.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .remote import RemoteFile, register
from .virtual import VirtualSources, sources

# What the read paths open: a local path, or a file in an object store (``remote``).
FileRef = str | RemoteFile

# A default block is a whole number of chunks totalling at least this much (about this much of rows
# when contiguous): large enough that hand-over costs vanish, small enough to stay in cache.
TARGET_BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class DatasetInfo:
    """The plain facts about one dataset that the front doors and workers need."""

    filename: FileRef  # str() of it names it in messages
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: tuple[int, ...] | None
    compression: str | None
    vlen_base: np.dtype | None  # element dtype of a variable-length dataset, else None
    pseudo_atom: str | None = None  # PyTables' encoding of VLArray rows: vlstring, object...
    # A virtual dataset's sources (its own filters and chunks are empty whatever they hold).
    virtual: VirtualSources | None = None

    @property
    def remote(self) -> bool:
        """Whether the file is in an object store (its reads are ranged GETs)."""
        return isinstance(self.filename, RemoteFile)

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape[1:])

    @property
    def compressed(self) -> bool:
        """Whether reading rows decodes them: the dataset's filters, or its sources'."""
        if self.virtual is not None:
            return self.virtual.compressed
        return self.compression is not None

    @property
    def chunk_rows(self) -> int | None:
        """Rows of a read that decodes each stored chunk once: the dataset's chunk rows, or its
        virtual sources' (``VirtualSources.read_rows``); None for contiguous rows."""
        if self.virtual is not None:
            return self.virtual.read_rows
        return self.chunks[0] if self.chunks else None

    def field_dtype(self, field: str | None) -> np.dtype:
        """The dtype of ``field`` (the whole row when None); ValueError for unknown names."""
        if field is None:
            return self.dtype
        names = self.dtype.names
        if not names or field not in names:
            raise ValueError(
                f"no field {field!r} in {self.path} of {self.filename}; "
                + (f"fields are {list(names)}" if names else f"it holds {self.dtype}, not a table")
            )
        return self.dtype[field]


@functools.cache
def register_filter_plugins() -> bool:
    """Make hdf5plugin's filters (Blosc, zstd, ...) readable, in every process, if installed."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        return False
    return True


def open_file(filename: FileRef, file_kwargs: dict[str, Any]) -> h5py.File:
    """``h5py.File(filename, 'r', **file_kwargs)`` with errors that name the file (for a
    ``RemoteFile``, over this process's block-cached file object)."""
    register_filter_plugins()
    kwargs = dict(file_kwargs)
    mode = kwargs.pop("mode", "r")
    if mode != "r":
        raise ValueError(f"multitables opens files read-only; got mode={mode!r}")
    if isinstance(filename, RemoteFile):
        source = filename.source  # pinned here: a missing object raises, naming its URL
        try:
            return filename.open(kwargs)
        except OSError as exc:
            new = type(exc)(f"cannot open {source.url!r} as an HDF5 file: {exc}")
            new.errno = exc.errno
            raise new from exc
    try:
        return h5py.File(filename, "r", **kwargs)
    except OSError as exc:
        if str(filename) in str(exc):
            raise
        new = type(exc)(f"cannot open {str(filename)!r} as an HDF5 file: {exc}")
        new.errno = exc.errno
        raise new from exc


def get_dataset(file: h5py.File, path: str) -> h5py.Dataset:
    try:
        node = file[path]
    except KeyError:
        raise KeyError(f"no dataset {path!r} in {file.filename}") from None
    if not isinstance(node, h5py.Dataset):
        raise TypeError(
            f"{path!r} in {file.filename} is a {type(node).__name__.lower()}, not a dataset"
        )
    return node


def per_dataset(build: Callable[[h5py.Dataset], Any]) -> Callable[[h5py.Dataset], Any]:
    """``build(dataset)``, worked out once per open dataset and kept as long as its id lives."""
    cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    missing = object()

    def of(dataset: h5py.Dataset) -> Any:
        found = cache.get(dataset.id, missing)
        if found is missing:
            found = cache[dataset.id] = build(dataset)
        return found

    of.cache = cache  # type: ignore[attr-defined]  # for tests: what is held
    return of


class OpenFile:
    """A worker's open HDF5 file and its datasets, each opened once for the job's reads."""

    def __init__(self, filename: FileRef, file_kwargs: dict[str, Any]):
        self.file = open_file(filename, file_kwargs)
        self.remote = filename if isinstance(filename, RemoteFile) else None
        self._datasets: dict[str, h5py.Dataset] = {}

    def dataset(self, path: str) -> h5py.Dataset:
        ds = self._datasets.get(path)
        if ds is None:
            ds = self._datasets[path] = get_dataset(self.file, path)
            if self.remote is not None:
                register(ds, self.remote)  # its reads go by byte range (remoteread)
        return ds

    def close(self) -> None:
        self._datasets.clear()
        self.file.close()
        if self.remote is not None:
            self.remote.close()  # a worker's connections and fetch threads end with its job


def describe(filename: FileRef, path: str, file_kwargs: dict[str, Any]) -> DatasetInfo:
    """Open, check and describe ``path``; raises in the caller for every bad input. For a
    ``RemoteFile``, also makes the dataset's chunk map, which the workers get with the file."""
    with open_file(filename, file_kwargs) as file:
        ds = get_dataset(file, path)
        if isinstance(filename, RemoteFile) and h5py.check_vlen_dtype(ds.dtype) is None:
            filename.chunk_map(ds)
        vlen = h5py.check_vlen_dtype(ds.dtype)
        pseudo_atom = ds.attrs.get("PSEUDOATOM") if vlen is not None else None
        if isinstance(pseudo_atom, bytes):
            pseudo_atom = pseudo_atom.decode()
        if vlen in (str, bytes):
            # h5py's variable-length strings: rows travel as their bytes, come back as bytes
            # objects, as h5py returns them.
            vlen, pseudo_atom = np.dtype(np.uint8), "vlstring"
        return DatasetInfo(
            filename=filename if isinstance(filename, RemoteFile) else str(filename),
            path=ds.name,
            shape=tuple(ds.shape),
            dtype=ds.dtype,
            chunks=ds.chunks,
            compression=ds.compression,
            vlen_base=vlen,
            pseudo_atom=pseudo_atom,
            virtual=_virtual(filename, ds),
        )


def _virtual(filename: FileRef, ds: h5py.Dataset) -> VirtualSources | None:
    """A virtual dataset's sources; those of one in an object store are not opened (counted as
    compressed, of unknown chunks)."""
    if not ds.is_virtual:
        return None
    if isinstance(filename, RemoteFile):
        n = ds.id.get_create_plist().get_virtual_count()
        return VirtualSources(n, ("unknown",), True, None, False)
    return sources(ds)


def check_rows(path: str, filename: FileRef, shape: tuple[int, ...], vlen_base: Any = None, *,
               scalar: str = "; there are no rows", vlen: str = "", empty: bool = True) -> None:
    """Refuse a dataset whose rows a front door cannot read: a scalar (ValueError, its message
    ending in ``scalar``), an empty one unless ``empty`` (ValueError), and one of
    variable-length rows, ``vlen_base`` not None (TypeError, its message ending in ``vlen``)."""
    if not shape:
        raise ValueError(f"{path} in {filename} is a scalar{scalar}")
    if not empty and shape[0] == 0:
        raise ValueError(f"{path} in {filename} is empty (shape {shape})")
    if vlen_base is not None:
        raise TypeError(f"{path} in {filename} holds variable-length rows{vlen}")


def default_block_size(shape: tuple[int, ...], dtype: np.dtype, chunks: tuple[int, ...] | None):
    """Rows per block: a whole number of chunks along axis 0 of at least ``TARGET_BLOCK_BYTES``.

    Contiguous datasets get about ``TARGET_BLOCK_BYTES`` of rows. Never more than the dataset's
    length, never less than one row.
    """
    row_bytes = max(1, np.dtype(dtype).itemsize * math.prod(shape[1:]))
    if chunks:
        chunk_rows = chunks[0]
        n_chunks = max(1, math.ceil(TARGET_BLOCK_BYTES / (chunk_rows * row_bytes)))
        rows = n_chunks * chunk_rows
    else:
        rows = max(1, TARGET_BLOCK_BYTES // row_bytes)
    return max(1, min(rows, shape[0] if shape else 1))


# Workers a front door starts when the caller does not say: past this, one file's reads rarely
# go faster (the page cache and the consumer's own core are the limits), and memory grows.
MAX_DEFAULT_PROCS = 4


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``, which a container's or a job
    scheduler's CPU set narrows; ``os.cpu_count`` where there is none), at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus)


def default_n_procs() -> int:
    """Worker processes a front door starts by default: the usable CPUs, at most
    ``MAX_DEFAULT_PROCS``."""
    return min(MAX_DEFAULT_PROCS, usable_cpus())


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1, or a TypeError/ValueError that names it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)
