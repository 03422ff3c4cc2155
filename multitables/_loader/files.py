"""The files of a Loader over many: their rows concatenated in order, each file's units, and
the checks that make them one dataset (internal).

A Loader given a list of files or a glob pattern reads the files' rows one after the other. Each
file keeps its own units (whole chunks of its own datasets, ``job.plan_units``), so a unit never
crosses a file's end and files may differ in row counts, chunk shapes and filters. The parent
describes the files in parallel processes when there are many (each describe opens its file), so
a Loader over a thousand shards starts in about a second, not after a thousand serial opens.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fnmatch
import glob
import multiprocessing
import os
import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from .._hdf5.mapped import Layout, MapTable, layout_of
from .._hdf5.remote import RemoteFile, file_of, is_url, name_of
from .._hdf5.source import (
    DatasetInfo,
    FileRef,
    describe,
    get_dataset,
    open_file,
    usable_cpus,
)
from .._sources.options import redact_url
from .job import plan_units

# Files a worker keeps open at once (least recently used closed first), at most; fewer if the
# descriptor limit is low (``open_files_limit``). More would not pay: HDF5 opens and closes a
# file more slowly the more files are open (a worker with 1,000 open took about 2 ms a close),
# and a shuffle that mixes many files reopens them whatever the bound.
MAX_OPEN_FILES = 32
# A default shuffle window over many files holds at most this many units: the first batch waits
# for its window, and over small files a unit costs an open more than its bytes.
WINDOW_UNITS = 256


def open_files_limit() -> int:
    """Files each worker keeps open at once: ``MAX_OPEN_FILES``, or a quarter of this process's
    descriptor limit if lower (workers inherit it)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        soft = 1024
    if soft == getattr(resource, "RLIM_INFINITY", -1) or soft <= 0:
        return MAX_OPEN_FILES
    return max(1, min(MAX_OPEN_FILES, soft // 4))
# From this many local files, the parent describes them in processes of its own, in parallel.
PARALLEL_FROM = 32


def expand(files: Any, storage_options: Any, cache_dir: Any,
           cache_limit: int | None) -> list[FileRef] | None:
    """The files that ``files`` names, in order: a list of paths or URLs as given, a glob
    pattern's matches sorted by name (local paths, or s3:// keys); None for one file (a path
    or URL as always)."""
    if isinstance(files, (list, tuple)):
        if not files:
            raise ValueError("the list of files is empty: name at least one file")
        return [file_of(f, storage_options, cache_dir, cache_limit) for f in files]
    if not isinstance(files, (str, os.PathLike)):
        return None
    pattern = os.fspath(files)
    if not isinstance(pattern, str) or not glob.has_magic(pattern) or os.path.exists(pattern):
        return None
    if is_url(pattern) and pattern.lower().startswith("s3://"):
        names = _s3_matches(pattern, storage_options)
    elif is_url(pattern):
        # HTTP lists nothing: one object, whose query (a presigned URL's) and host ([::1]) are
        # no wildcards.
        if glob.has_magic(urllib.parse.urlsplit(pattern).path):
            raise ValueError(f"{redact_url(pattern)!r}: glob patterns of URLs are supported "
                             "for s3:// only; pass the list of URLs")
        return None
    else:
        names = sorted(glob.glob(pattern))
    if not names:
        raise ValueError(f"no file matches the pattern {pattern!r}")
    return [file_of(name, storage_options, cache_dir, cache_limit) for name in names]


def _s3_matches(pattern: str, storage_options: Any) -> list[str]:
    """The objects whose keys match ``s3://bucket/pattern``, in key order: one listing of the
    prefix before the pattern's first wildcard."""
    from .._sources import require_remote, s3  # the remote extra: only for URLs

    require_remote(pattern)
    bucket, _, key_pattern = pattern[5:].partition("/")
    prefix = re.split(r"[*?\[]", key_pattern, maxsplit=1)[0]
    found = s3.list_prefix(bucket, prefix, storage_options)
    return [f"s3://{bucket}/{key}" for key, _, _ in found
            if fnmatch.fnmatchcase(key, key_pattern)]


@dataclass(frozen=True)
class Shard:
    """One file of the list: its rows, its units' rows and its version."""

    file: FileRef
    n_rows: int
    unit_rows: int
    size: int
    version: Any  # the mtime (ns) of a path, the ETag of a URL
    # Where each column's rows lie in a local file (mapped.layout_of), for reads with no HDF5
    # open; moved into the Files' MapTable once all files are described.
    layouts: tuple[Layout | None, ...] | None = None

    @property
    def name(self) -> str:
        return str(name_of(self.file))

    def state(self) -> list[Any]:
        """What a ``state_dict`` records of this file: its name, size and, for a URL, ETag."""
        etag = self.version if isinstance(self.file, RemoteFile) else None
        return [self.name, self.size] if etag is None else [self.name, self.size, etag]


def version_of(file: FileRef) -> tuple[int, Any]:
    """``(size, version)``: the mtime in ns of a path, the ETag of a URL."""
    if isinstance(file, RemoteFile):
        return file.source.size, file.source.etag
    st = os.stat(file)
    return st.st_size, st.st_mtime_ns


def file_infos(file: FileRef, first: Sequence[DatasetInfo],
               kw: dict[str, Any]) -> list[DatasetInfo]:
    """The datasets of ``file`` at the paths of ``first`` (the first file's), described:
    ValueError naming the file for a missing one or one of another dtype or row shape."""
    return _described(file, first, kw, False)[0]


def _described(file: FileRef, first: Sequence[DatasetInfo], kw: dict[str, Any],
               layouts: bool) -> tuple[list[DatasetInfo], tuple[Layout | None, ...] | None]:
    """``file_infos``, and with ``layouts`` the columns' layouts in a local file."""
    if isinstance(file, RemoteFile):
        return _infos(file, first, kw, None), None
    found: list[Layout | None] | None = [] if layouts else None
    with open_file(file, kw) as opened:  # once for all its columns
        infos = _infos(file, first, kw, opened, found)
    return infos, None if found is None else tuple(found)


def describe_shard(file: FileRef, first: Sequence[DatasetInfo],
                   kw: dict[str, Any]) -> Shard:
    """``file`` checked against the first file's datasets ``first`` (``file_infos``), and its
    columns of equal lengths (else ValueError naming the file)."""
    infos, layouts = _described(file, first, kw, True)
    lengths = {info.path: info.shape[0] for info in infos}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{name_of(file)}: the columns must have the same number of rows, got "
                         f"{lengths}")
    size, version = version_of(file)
    n_rows = infos[0].shape[0]
    return Shard(file, n_rows, plan_units(infos) if n_rows else 1, size, version, layouts)


def _infos(file: FileRef, first: Sequence[DatasetInfo], kw: dict[str, Any],
           opened: h5py.File | None, layouts: list[Layout | None] | None = None
           ) -> list[DatasetInfo]:
    """The datasets' infos (``_describe``), checked against ``first``; with ``layouts`` (a
    list) and ``opened``, their layouts appended to it."""
    infos = []
    driver = opened.driver if opened is not None and layouts is not None else None
    for want in first:
        try:
            info, ds = _describe(file, want.path, kw, opened)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{name_of(file)}: {exc.args[0] if exc.args else exc}; every "
                             "file must hold every column") from None
        if _rows_spelled(info) != _rows_spelled(want):
            raise ValueError(f"{name_of(file)}: {info.path} holds rows of {_rows_spelled(info)}, "
                             f"the first file's hold {_rows_spelled(want)}")
        infos.append(info)
        if layouts is not None and opened is not None:
            layouts.append(None if ds is None else layout_of(ds, driver))
    return infos


def _rows_spelled(info: DatasetInfo) -> str:
    """What a dataset's rows are, as a message says it; files whose rows are spelled alike
    can be read as one (numpy's dtypes of variable-length rows all compare equal)."""
    if info.vlen_base is None:
        return f"{info.shape[1:]} {info.dtype}"
    string = h5py.check_string_dtype(info.dtype)
    if string is not None:
        return f"variable-length {string.encoding} strings"
    return f"variable-length {info.pseudo_atom or 'arrays'} of {info.vlen_base}"


def _describe(file: FileRef, path: str, kw: dict[str, Any],
              opened: h5py.File | None) -> tuple[DatasetInfo, h5py.Dataset | None]:
    """``source.describe(file, path, kw)``; a plain dataset of a local file from ``opened``,
    returned with it."""
    if opened is None:
        return describe(file, path, kw), None
    ds = get_dataset(opened, path)
    if ds.is_virtual or h5py.check_vlen_dtype(ds.dtype) is not None:
        return describe(file, path, kw), ds
    return DatasetInfo(filename=file, path=ds.name, shape=tuple(ds.shape), dtype=ds.dtype,
                       chunks=ds.chunks, compression=ds.compression, vlen_base=None), ds


def each_file(describe_one: Callable[..., Any], files: Sequence[FileRef],
              first: Sequence[DatasetInfo], kw: dict[str, Any],
              start_method: str | None) -> list[Any]:
    """``describe_one(file, first, kw)`` for every file of ``files``, in order; in parallel
    processes when there are many local files and workers fork (each call opens its file)."""
    jobs = [(describe_one, file, tuple(first), kw) for file in files]
    # A daemonic process (a DataLoader worker) may not have children of its own.
    parallel = (len(files) >= PARALLEL_FROM and (start_method or "fork") == "fork"
                and not any(isinstance(f, RemoteFile) for f in files) and usable_cpus() > 1
                and not multiprocessing.current_process().daemon)
    if not parallel:
        return [_call(job) for job in jobs]
    n = min(usable_cpus(), 8)
    # An executor, not a Pool: a helper that dies (killed, out of memory) raises
    # BrokenProcessPool here, where a Pool would wait for its lost task for ever.
    with concurrent.futures.ProcessPoolExecutor(n, multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_call, jobs, chunksize=-(-len(jobs) // (4 * n))))


def _call(job: tuple) -> Any:
    return job[0](*job[1:])


def describe_files(files: Sequence[FileRef], first: Sequence[DatasetInfo], kw: dict[str, Any],
                   start_method: str | None) -> Files:
    """Every file of ``files`` described and checked (``describe_shard``, ``each_file``)."""
    return Files(each_file(describe_shard, files, first, kw, start_method))


class Files:
    """The files of a Loader, their rows concatenated: where each file's rows and units start."""

    def __init__(self, shards: Sequence[Shard]):
        # The local files' layouts, packed (mapped.MapTable); None when no column of any file
        # can be read that way.
        n_columns = max((len(s.layouts) for s in shards if s.layouts), default=0)
        layouts = [s.layouts or (None,) * n_columns for s in shards]
        self.maps: MapTable | None = MapTable(layouts) if any(
            any(row) for row in layouts) else None
        self.shards = tuple(dataclasses.replace(s, layouts=None) for s in shards)
        counts = [s.n_rows for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_rows = int(self.starts[-1])
        if self.n_rows == 0:
            raise ValueError(f"the columns of {self.name} are empty (0 rows)")
        units = [np.arange(start, start + s.n_rows, s.unit_rows, dtype=np.int64)
                 for start, s in zip(self.starts[:-1], self.shards, strict=True)]
        self.unit_starts = np.concatenate([*units, [self.n_rows]]).astype(np.int64)
        self.unit_rows = max(s.unit_rows for s in self.shards if s.n_rows)

    @property
    def name(self) -> str:
        """The files, for messages."""
        if len(self.shards) == 1:
            return self.shards[0].name
        return f"{len(self.shards)} files ({self.shards[0].name} ... {self.shards[-1].name})"

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.shards]

    def file_of(self, row: int) -> int:
        """The index of the file that holds (concatenated) ``row``."""
        return int(np.searchsorted(self.starts, row, side="right")) - 1

    def state(self) -> list[list[Any]]:
        return [s.state() for s in self.shards]

    def check_state(self, recorded: Any) -> None:
        """ValueError saying which files differ from those a state was ``recorded`` over."""
        if recorded is None:
            raise ValueError(f"the state was taken from a Loader of one file, this one reads "
                             f"{self.name}; resume with the same files")
        mine = self.state()
        recorded = [list(r) for r in recorded]
        if recorded == mine:
            return
        if len(recorded) != len(mine):
            raise ValueError(f"the state was taken from a Loader of {len(recorded)} files, this "
                             f"one reads {len(mine)}; resume with the same files")
        differ = [f"file {i}: {r} in the state, {m} here"
                  for i, (r, m) in enumerate(zip(recorded, mine, strict=True)) if r != m]
        raise ValueError("the state was taken from a Loader of other or changed files ("
                         + "; ".join(differ[:5]) + (" ..." if len(differ) > 5 else "")
                         + "); resume with the same files")

    def check(self) -> None:
        """ValueError naming the local files changed since the Loader was made (one ``stat``
        each; a URL is pinned to its version by its source, which checks it)."""
        changed = []
        for s in self.shards:
            if not isinstance(s.file, RemoteFile) and version_of(s.file) != (s.size, s.version):
                changed.append(s.name)
        if changed:
            raise ValueError(f"{len(changed)} file(s) changed since this Loader was made: "
                             + ", ".join(changed[:5]) + (" ..." if len(changed) > 5 else "")
                             + "; its epochs cannot be played: make a new Loader")
