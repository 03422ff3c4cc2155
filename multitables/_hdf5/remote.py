"""An HDF5 file in an object store (``s3://``, ``http://``, ``https://``), as the front doors and
the read paths see it (internal).

A front door turns its ``filename`` argument into a *file* with :func:`file_of`: a local path
stays the str it always was (no new cost anywhere on the local path), a URL becomes a
:class:`RemoteFile`. Every read path takes either where it took a filename. A ``RemoteFile`` is
pinned to the object's version at its first use, in the caller (one request: a missing object
raises ``FileNotFoundError`` there); the parent then reads HDF5 metadata through one block-cached
file object (``BlockFile``) that it keeps, and keeps the chunk map of every dataset it describes.
Jobs carry the ``RemoteFile`` to the workers by pickle: the pinned version (no request), the
chunk maps and the cache settings. Each process makes its own connections, its own ``BlockFile``
for h5py (for what the fast paths of ``remoteread`` leave to HDF5) and its own ``Fetcher``.
"""

from __future__ import annotations

import contextlib
import os
import re
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py

from .._engine import worker
from .._sources import Source, open_source, parse_location
from .._sources import storage_options as check_storage_options
from .._sources.blockfile import BlockFile
from .._sources.chunkmap import ChunkMap, ChunkMapStore, chunk_map
from .._sources.options import StorageOptions, redact_url

URL_PREFIXES = ("s3://", "http://", "https://")
_OTHER_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
# The cache of fetched ranges holds at most this many bytes when ``cache_dir`` is given alone.
DEFAULT_CACHE_LIMIT = 10 << 30
# Ranged GETs each worker keeps in flight: a Reader's batch of 64 scattered rows is at most 64
# GETs (fewer where rows share one), all at once: one round trip; a block of chunks streams with
# the link full. With 32, a batch of 64 rows over 8 MB (35-40 GETs) took two (bench/README.md).
WORKER_IN_FLIGHT = 64
# The most one GET fetches: neighbouring chunks merge up to this, larger ranges are cut to it, so
# a Streamer's slot (``_streamer.job.REMOTE_SLOT_TARGET_BYTES``) is several GETs at once.
WORKER_GET_BYTES = 1 << 20


def is_url(filename: Any) -> bool:
    """Whether ``filename`` is a URL this package reads (``s3://``, ``http(s)://``).

    >>> is_url("s3://bucket/a.h5"), is_url("HTTPS://host/a.h5"), is_url("data/a.h5")
    (True, True, False)
    """
    return isinstance(filename, str) and filename[:8].lower().startswith(URL_PREFIXES)


class _NamedBlockFile(BlockFile):
    # h5py names a file object by its repr (``h5py.File.filename``, its error messages).
    def __repr__(self) -> str:
        return self.name


class RemoteFile:
    """An HDF5 file at ``url``, reached with ``storage_options``, pinned at its first use.

    ``str()`` is the URL without credentials or query string, for messages. Pickles as the
    pinned version (or the URL and options before the pin), the chunk maps and the cache
    settings, never a connection. A copy made by pickling keeps its connections and fetch
    threads when closed in a worker, for the next job over the same object (see ``_KEPT``).
    """

    def __init__(self, url: str, options: StorageOptions | Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, cache_limit: int | None = None,
                 source: Source | None = None, maps: dict[str, ChunkMap] | None = None,
                 meta_blocks: tuple[int, ...] = (), copy: bool = False):
        self.url = url
        self.options = check_storage_options(options)
        self.name = parse_location(url).display
        self.cache_dir, self.cache_limit = cache_dir, cache_limit
        self._source = source
        self.maps: dict[str, ChunkMap] = dict(maps or {})  # by dataset name
        # The blocks of the file that h5py read in the parent (HDF5's metadata), which a worker
        # fetches at once (and through the cache) before h5py opens the file there.
        self.meta_blocks = meta_blocks
        self._copy = copy
        self._pid = 0  # of the process that made the per-process objects below
        self._blockfile: BlockFile | None = None
        self._fetcher: Any = None
        self._blocks_kept: set[int] = set()  # metadata blocks put in the disk cache here

    @property
    def source(self) -> Source:
        """The byte source, pinned to the object's version by its first use."""
        if self._source is None:
            # A connection per GET a worker keeps in flight (more would each be a new one).
            self._source = open_source(self.url, self.options, maxsize=WORKER_IN_FLIGHT)
        return self._source

    @property
    def pinned(self) -> bool:
        return self._source is not None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"RemoteFile({self.name!r})"

    def __reduce__(self) -> tuple:
        blocks = self.meta_blocks
        if self._pid == os.getpid() and self._blockfile is not None:
            blocks = tuple(sorted(self._blockfile.touched.union(blocks)))
        return (RemoteFile, (self.url, self.options, self.cache_dir, self.cache_limit,
                             self._source, self.maps, blocks, True))

    def keywords(self) -> dict[str, Any]:
        """The front door's keywords that made this file (for a copy made by pickling)."""
        return {"storage_options": self.options, "cache_dir": self.cache_dir,
                "cache_limit": self.cache_limit}

    # -- per process ---------------------------------------------------------------------------
    def _mine(self) -> None:
        if self._pid != os.getpid():  # a forked child: nothing of the parent's is ours
            self._pid, self._blockfile, self._fetcher = os.getpid(), None, None
            kept = _take_kept(self._kept_key())
            if kept is not None:  # an earlier job's, over the same version of the object
                self._fetcher, self._source = kept, kept.source

    def _kept_key(self) -> tuple | None:
        """What a kept fetcher must match: the pinned object and the settings of its fetcher
        (None before the pin)."""
        if self._source is None:
            return None
        return (self._source.identity, self.options, self.cache_dir, self.cache_limit)

    def blockfile(self) -> BlockFile:
        """This process's block-cached file object (kept: the metadata stays cached)."""
        self._mine()
        if self._blockfile is None:
            if self.meta_blocks:
                # A forked worker finds the blocks in the memory it inherited from the parent,
                # if the parent read them before the fork: no request (a round trip at every
                # job start, otherwise) and no copy of their bytes in the job's pickle. With a
                # cache_dir they are fetched through it, so that a later epoch finds them there
                # whether or not its parent still holds them.
                inherited = _BLOCKFILES.get(self.source.identity)
                given = (inherited.held(self.meta_blocks, wait=False)
                         if inherited is not None and self.cache_dir is None else None)
                self._blockfile = _NamedBlockFile(self.source, first_read=0)
                self._blockfile.prime(self.meta_blocks, self.fetcher(), given)
            elif (kept_blocks := self._kept_blocks()):
                # Opened before with this cache_dir: HDF5's metadata is on the local disk, and
                # the open costs only the request that pinned the object's version.
                self._blockfile = _NamedBlockFile(self.source, first_read=0)
                self._blockfile.prime(kept_blocks, self.fetcher())
            else:
                self._blockfile = _NamedBlockFile(self.source)
            # A worker keeps finding its parent's: its own is closed with each job, and the
            # next job would fetch the blocks again (1 MiB a worker an epoch, over 10% of an
            # epoch of a 14 MB dataset).
            kept = _BLOCKFILES.get(self.source.identity)
            if kept is None or kept.closed:
                _BLOCKFILES[self.source.identity] = self._blockfile
        return self._blockfile

    def open(self, file_kwargs: Mapping[str, Any]) -> h5py.File:
        """``h5py.File`` over this process's ``BlockFile``."""
        return h5py.File(self.blockfile(), "r", **file_kwargs)

    def fetcher(self) -> Any:
        """This process's parallel range fetcher, over the disk cache when there is one."""
        self._mine()
        if self._fetcher is None:
            cache = None
            if self.cache_dir is not None:
                from .._sources.cache import ByteCache
                cache = ByteCache(self.cache_dir, self.cache_limit or DEFAULT_CACHE_LIMIT)
            self._fetcher = self.source.fetcher(max_in_flight=WORKER_IN_FLIGHT,
                                                split_size=WORKER_GET_BYTES, cache=cache)
        return self._fetcher

    def close(self) -> None:
        """Close this process's connections, fetch threads and block cache (idempotent); a
        later read opens them again."""
        if self._pid != os.getpid():
            return  # the parent's, not ours to close
        fetcher, blockfile, self._fetcher, self._blockfile = (self._fetcher, self._blockfile,
                                                              None, None)
        if blockfile is not None:
            blockfile.close()
        if self._copy and fetcher is not None and fetcher.source is self._source and \
                _in_worker():
            _keep(self._kept_key(), fetcher)  # its source's connections with it
            return
        if fetcher is not None:
            fetcher.close()
        if self._source is not None:
            self._source.close()

    # -- chunk maps ----------------------------------------------------------------------------
    def chunk_map(self, dataset: h5py.Dataset) -> ChunkMap:
        """The chunk map of ``dataset`` (opened from this file): the one the parent made, else
        the one kept under ``cache_dir``, else built (one pass over its chunk index) and kept."""
        found = self.maps.get(dataset.name)
        if found is not None:
            return found
        key = self.source.identity
        store = self._store()
        found = store.load(key, dataset.name) if store is not None else None
        if found is None:
            found = chunk_map(dataset, key=key)
            if store is not None:
                with contextlib.suppress(OSError):  # the store is only a cache
                    store.save(found)
                    self._keep_blocks(store)
        self.maps[dataset.name] = found
        return found

    def _store(self) -> ChunkMapStore | None:
        """Where chunk maps and metadata blocks are kept: under ``cache_dir``, if any."""
        if self.cache_dir is None:
            return None
        return ChunkMapStore(Path(self.cache_dir) / f"multitables-{os.getuid()}-chunkmaps")

    def _keep_blocks(self, store: ChunkMapStore) -> None:
        """The blocks h5py has read here (HDF5's metadata, through this process's BlockFile)
        into the disk cache, and their numbers into ``store``, for the next open."""
        blockfile = self._blockfile
        if blockfile is None or self._pid != os.getpid():
            return
        cache = self.fetcher().cache
        if cache is None:
            return
        held = blockfile.held(sorted(blockfile.touched))
        for b, data in held.items():
            if b not in self._blocks_kept:
                cache.put(self.source.identity, b * blockfile.block_size, data)
                self._blocks_kept.add(b)
        store.save_blocks(self.source.identity, held)

    def _kept_blocks(self) -> list[int]:
        """The metadata blocks an earlier open of this version kept under ``cache_dir``."""
        store = self._store()
        return [] if store is None else store.load_blocks(self.source.identity)


def file_of(filename: Any, storage_options: Mapping[str, Any] | StorageOptions | None = None,
            cache_dir: str | os.PathLike | None = None,
            cache_limit: int | None = None) -> str | RemoteFile:
    """A front door's ``filename`` argument as the file its read paths take: the path (as
    ``os.fspath`` gives it) or a ``RemoteFile``, not yet pinned. Bad options raise here."""
    options = check_storage_options(storage_options)
    if cache_limit is not None and (isinstance(cache_limit, bool) or not isinstance(
            cache_limit, int) or cache_limit < 1):
        raise ValueError(f"cache_limit must be a number of bytes >= 1, got {cache_limit!r}")
    if cache_limit is not None and cache_dir is None:
        raise ValueError("cache_limit needs a cache_dir")
    if isinstance(filename, RemoteFile):
        return filename
    if is_url(filename):
        return RemoteFile(filename, options,
                          None if cache_dir is None else os.fspath(cache_dir), cache_limit)
    path = os.fspath(filename)
    other = _OTHER_URL.match(path) if isinstance(path, str) else None
    if other and not os.path.exists(path):  # gs://, ftp://: not a local path either
        raise ValueError(f"unsupported URL scheme {other[1]!r} in {redact_url(path)!r}: "
                         f"URLs read are {', '.join(URL_PREFIXES)}")
    return path


def name_of(file: Any) -> Any:
    """How a front door names ``file`` (its ``filename``): the path as given to ``os.fspath``,
    or the URL without credentials."""
    return file.name if isinstance(file, RemoteFile) else file


def location_of(file: str | RemoteFile) -> str:
    """What ``file_of`` was given: the path, or the URL (with any credentials it holds)."""
    return file.url if isinstance(file, RemoteFile) else file


def keywords_of(file: str | RemoteFile) -> dict[str, Any]:
    """The front door keywords that remake ``file`` with ``file_of`` (none for a path)."""
    return file.keywords() if isinstance(file, RemoteFile) else {}


# A worker's fetcher (its threads, its source's connections) outlives the job whose file made
# it: the next job over the same version of the object (the Loader's next epoch, the Streamer's
# next pass) takes it, where making them again cost a thread start and a new connection for each
# GET in flight at the start of every job, before its first byte (bench/README.md, "Remote
# files"). One per process: keeping another closes it. [(pid, key, fetcher)]
_KEPT: list[tuple[int, tuple, Any]] = []


def _keep(key: tuple | None, fetcher: Any) -> None:
    old = _KEPT[:]
    _KEPT[:] = [(os.getpid(), key, fetcher)] if key is not None else []
    for pid, _, other in old:
        if pid == os.getpid() and other is not fetcher:
            other.close()
            other.source.close()
    if key is None:
        fetcher.close()
        fetcher.source.close()


def _in_worker() -> bool:
    try:
        worker.parent_channel()
    except RuntimeError:
        return False
    return True


def _take_kept(key: tuple | None) -> Any:
    """The kept fetcher of ``key`` in this process, taken out; None if none."""
    if key is None or not _KEPT:
        return None
    pid, kept_key, fetcher = _KEPT[0]
    if pid != os.getpid() or kept_key != key:
        return None
    _KEPT.clear()
    return fetcher


# Each process's block files by the pinned object's identity (URL, size, version), which a forked
# child inherits: see ``RemoteFile.blockfile``.
_BLOCKFILES: weakref.WeakValueDictionary[Any, BlockFile] = weakref.WeakValueDictionary()

# The datasets that workers opened from a RemoteFile, for the fast paths (``remoteread``) to
# find their file: keyed weakly by the dataset's id, as ``source.per_dataset`` is.
_OPENED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(dataset: h5py.Dataset, file: RemoteFile) -> None:
    """Note that ``dataset`` was opened from ``file``."""
    _OPENED[dataset.id] = file


def file_of_dataset(dataset: h5py.Dataset) -> RemoteFile | None:
    """The ``RemoteFile`` that ``dataset`` was opened from (``register``), or None."""
    return _OPENED.get(dataset.id)
