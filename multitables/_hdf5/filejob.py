"""The part of every front door's job that opens its HDF5 file in each worker, for the length of
the job (internal): the engine runs jobs and opens no file itself."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from .source import FileRef, OpenFile


class FileJob:
    """A job over one HDF5 file: ``attach`` opens it in the worker (with ``file_kwargs()``, the
    user's ``h5py.File`` options and the job's chunk cache), ``detach`` closes it. The file is
    open only during a job: an idle worker holding it would keep its lock, and no process could
    open it for writing between two passes."""

    filename: FileRef  # a path, or a file in an object store (remote.RemoteFile)
    source: OpenFile

    def file_kwargs(self) -> dict[str, Any]:
        return {}

    def attach(self, worker: int) -> None:
        self.source = OpenFile(self.filename, self.file_kwargs())
        try:
            self.attach_file(self.source, worker)
        except BaseException:
            self.detach()
            raise

    def attach_file(self, source: OpenFile, worker: int) -> None:
        """Prepare the job's reads in this worker, ``source`` open."""
        raise NotImplementedError

    def detach(self) -> None:
        self.source.close()


class OpenFiles:
    """A worker's open files of a job over many files, at most ``limit`` at once: opening one
    more closes the least recently used first, so a job over any number of files holds a
    bounded number of descriptors.

    ``busy(key)``, when given, says whether reads of a file are still in flight (read ahead
    over URLs): such a file, pushed out, is kept aside until they end (``sweep``), so that no
    more files are open than the bound and the slots in flight; it is taken back if wanted
    again meanwhile. ``closing(key)`` is told of each file closed."""

    def __init__(self, limit: int, file_kwargs: dict[str, Any],
                 busy: Callable[[Any], bool] | None = None,
                 closing: Callable[[Any], None] | None = None):
        self.limit, self.file_kwargs = max(1, limit), file_kwargs
        self.files: OrderedDict[Any, OpenFile] = OrderedDict()
        self.aside: dict[Any, OpenFile] = {}
        self.busy, self.closing = busy, closing

    def get(self, key: Any, filename: FileRef) -> OpenFile:
        """``filename`` open (known as ``key``), the most recently used now."""
        source = self.files.pop(key, None)
        if source is None:
            source = self.aside.pop(key, None)
            while len(self.files) >= self.limit:
                self._retire(*self.files.popitem(last=False))
            if source is None:
                source = OpenFile(filename, self.file_kwargs)
        self.files[key] = source
        return source

    def _retire(self, key: Any, source: OpenFile) -> None:
        if self.busy is not None and self.busy(key):
            self.aside[key] = source
        else:
            self._close(key, source)

    def _close(self, key: Any, source: OpenFile) -> None:
        try:
            source.close()
        finally:
            if self.closing is not None:
                self.closing(key)

    def sweep(self) -> None:
        """Close the files kept aside whose reads have ended."""
        for key in [k for k in self.aside if self.busy is None or not self.busy(k)]:
            self._close(key, self.aside.pop(key))

    def close(self) -> None:
        while self.aside:
            self._close(*self.aside.popitem())
        while self.files:
            self._close(*self.files.popitem(last=False))
