"""The part of every front door's job that opens its HDF5 file in each worker, for the length of
the job (internal): the engine runs jobs and opens no file itself."""

from __future__ import annotations

from collections import OrderedDict
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
    bounded number of descriptors."""

    def __init__(self, limit: int, file_kwargs: dict[str, Any]):
        self.limit, self.file_kwargs = max(1, limit), file_kwargs
        self.files: OrderedDict[Any, OpenFile] = OrderedDict()

    def get(self, key: Any, filename: FileRef) -> OpenFile:
        """``filename`` open (known as ``key``), the most recently used now."""
        source = self.files.pop(key, None)
        if source is None:
            while len(self.files) >= self.limit:
                self.files.popitem(last=False)[1].close()
            source = OpenFile(filename, self.file_kwargs)
        self.files[key] = source
        return source

    def close(self) -> None:
        while self.files:
            self.files.popitem(last=False)[1].close()
