"""The columns of a Loader's batches: which dataset (and which field of it) each one is, and how
a batch packs them (internal)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._hdf5.source import DatasetInfo, FileRef, check_rows, describe, open_file


@dataclass(frozen=True)
class Column:
    """One column of the batches: a dataset (by its index in the Loader's list) or one field."""

    name: str | int
    path: str  # as the caller spelled it
    dataset: int
    field: str | None


@dataclass(frozen=True)
class Columns:
    """The checked ``columns`` argument: the datasets to read (each once, whole rows) and the
    columns cut from them."""

    kind: str  # "single" (batches are arrays), "tuple" or "dict"
    columns: tuple[Column, ...]
    infos: tuple[DatasetInfo, ...]  # column.dataset indexes these

    @property
    def n_rows(self) -> int:
        return self.infos[0].shape[0]

    @property
    def paths(self) -> list[str]:
        """Each column's path, as the caller spelled it."""
        return [column.path for column in self.columns]

    def dtypes(self) -> list[tuple[str, np.dtype]]:
        """Each column's path and the dtype of its rows (the field's, for a field)."""
        return [(c.path, self.infos[c.dataset].field_dtype(c.field)) for c in self.columns]

    def cut(self, regions: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The columns, as views of ``regions`` (one array per dataset)."""
        return [regions[c.dataset] if c.field is None else regions[c.dataset][c.field]
                for c in self.columns]

    def pack(self, arrays: list[np.ndarray]) -> Any:
        """A batch of ``arrays`` (one per column) in the caller's shape."""
        if self.kind == "single":
            return arrays[0]
        if self.kind == "tuple":
            return tuple(arrays)
        return {column.name: a for column, a in zip(self.columns, arrays, strict=True)}


def resolve_columns(filename: FileRef, columns: Any, kw: dict[str, Any]) -> Columns:
    """The ``columns`` argument of a Loader, checked: raises for bad input."""
    if isinstance(columns, (str, os.PathLike)):
        kind, named = "single", [(0, os.fspath(columns))]
    elif isinstance(columns, dict):
        kind, named = "dict", list(columns.items())
    elif isinstance(columns, (list, tuple)):
        kind, named = "tuple", list(enumerate(columns))
    else:
        raise TypeError(f"columns must be a path, a list of paths or a dict name -> path, "
                        f"got {type(columns).__name__}")
    if not named:
        raise ValueError("columns is empty: name at least one dataset")
    infos: list[DatasetInfo] = []
    resolved = []
    for name, path in named:
        if not isinstance(path, str):
            raise TypeError(f"column {name!r}: a path must be a str, got {path!r}")
        info, field = _describe_column(filename, path, kw)
        index = next((i for i, known in enumerate(infos) if known.path == info.path), None)
        if index is None:
            index = len(infos)
            infos.append(info)
        resolved.append(Column(name, path, index, field))
    lengths = {c.path: infos[c.dataset].shape[0] for c in resolved}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns must have the same number of rows, got {lengths}")
    if next(iter(lengths.values())) == 0:
        raise ValueError(f"the columns of {filename} are empty (0 rows): {list(lengths)}")
    return Columns(kind, tuple(resolved), tuple(infos))


def _describe_column(filename: FileRef, path: str, kw: dict[str, Any]):
    """The dataset of column ``path`` and its field: a dataset, or ``table_path/field``."""
    try:
        info, field = describe(filename, path, kw), None
    except KeyError:
        parent, _, name = path.rstrip("/").rpartition("/")
        try:
            info = describe(filename, parent or "/", kw)
        except (KeyError, TypeError):
            raise KeyError(f"no dataset {path!r} in {filename}") from None
        if not info.dtype.names or name not in info.dtype.names:
            fields = f"its fields are {list(info.dtype.names)}" if info.dtype.names else (
                f"it holds {info.dtype}, not a table")
            raise KeyError(f"no dataset {path!r} in {filename}, and {parent!r} has no field "
                           f"{name!r}: {fields}") from None
        field = name
    check_rows(info.path, filename, info.shape)  # variable-length rows: samples.py
    return info, field


def unfiltered(filename: FileRef, infos: Sequence[DatasetInfo], kw: dict[str, Any]) -> bool:
    """Whether every dataset is stored without filters (its rows can be read from the file). A
    virtual dataset is not, whatever its sources hold: its own pipeline is empty, but its rows
    are read through HDF5, which maps them to the sources (by units, each source chunk read
    once, rather than row by row)."""
    if any(info.virtual is not None for info in infos):
        return False
    with open_file(filename, kw) as file:
        return all(file[info.path].id.get_create_plist().get_nfilters() == 0 for info in infos)
