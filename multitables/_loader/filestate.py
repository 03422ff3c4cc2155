"""The file a Loader was made for, as it was then: its size, modification time and row count,
checked at each epoch's start (internal).

A Loader plans every epoch over the rows it counted when it was made. A file changed since
(rows appended, a dataset shrunk, the file rewritten) would otherwise surface in a worker as an
error about shapes, or not at all: rows appended would never be read, without a word.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from .._hdf5.source import DatasetInfo, FileRef, open_file
from .files import version_of


class FileState:
    """The size, mtime and row count of a local file's columns when the Loader was made. A file
    in an object store is pinned to its version (ETag) by its source, which checks it instead."""

    def __init__(self, file: FileRef, infos: Sequence[DatasetInfo], file_kwargs: dict[str, Any]):
        self.file, self.file_kwargs = file, file_kwargs
        self.paths = [info.path for info in infos]
        self.n_rows = infos[0].shape[0]
        self.identity = version_of(file) if isinstance(file, str) else None
        self.warned = False

    def check(self) -> None:
        """Raise ``ValueError`` if a column now has fewer rows than the Loader counted; warn
        (once) if rows were added. Costs one ``stat`` while the file is unchanged."""
        if not isinstance(self.file, str):
            return
        now = version_of(self.file)
        if now == self.identity:
            return
        with open_file(self.file, self.file_kwargs) as f:
            counts = {path: f[path].shape[0] for path in self.paths}
        changed = (f"{self.file} changed since this Loader was made (size {self.identity[0]:,} "
                   f"-> {now[0]:,} bytes, modified again)") if self.identity else str(self.file)
        shrunk = {p: n for p, n in counts.items() if n < self.n_rows}
        if shrunk:
            raise ValueError(
                f"{changed}: it counted {self.n_rows:,} rows, now "
                + ", ".join(f"{p} has {n:,}" for p, n in shrunk.items())
                + "; its epochs cannot be played: make a new Loader for the file as it is")
        self.identity = now  # rows as many or more: the epochs stay as planned
        grown = {p: n for p, n in counts.items() if n > self.n_rows}
        if grown and not self.warned:
            self.warned = True
            warnings.warn(
                f"{changed}: rows were added ("
                + ", ".join(f"{p} has {n:,}" for p, n in grown.items())
                + f"); this Loader's epochs hold its first {self.n_rows:,} rows only: make "
                "a new Loader to read the new rows", stacklevel=4)
