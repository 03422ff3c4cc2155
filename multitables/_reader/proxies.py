"""Dataset proxies: indexing them records a request (``ReadSpec``) instead of reading.

``reader.get_dataset(path)`` returns an ``ArrayProxy`` for plain datasets, a ``TableProxy`` for 1-D
compound datasets (PyTables tables) and a ``VLArrayProxy`` for variable-length ones. Keys follow
numpy exactly; they are translated (and checked: a bad key raises here, as numpy would) when the
proxy is indexed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .._hdf5.source import DatasetInfo, check_positive_int
from .._keys._indexing import translate
from .._keys.chain import Chain
from .csindex import check_csindex
from .owner import Owner
from .readspec import ARRAY, SORTED, VLEN, WHERE, ReadSpec
from .stages import MAX_PARTS, Stage, StagePool

# A request is split over several workers when each part gets at least this much.
SPLIT_BYTES = 2 << 20


class DatasetProxy:
    """A dataset of a ``Reader``'s file, or a selection of it (``proxy[key]``, ``proxy[field]``).

    Attributes
    ----------
    shape, dtype : of what indexing this proxy addresses: the dataset, or one field of it (a
        subarray field adds its dimensions), or the result of the recorded key.
    reader : the Reader whose requests it describes.
    """

    def __init__(self, reader: Owner, info: DatasetInfo, field: str | None = None,
                 keys: tuple = (), chain: Chain | None = None, field_at: int = 0):
        self.reader = reader
        self.info = info
        self.field = field
        self.keys = keys  # in the order they were given (before and after the field)
        self._chain = chain  # the keys as one, when there is more than one key to compose
        self._field_at = field_at  # how many of the keys came before the field
        dtype = info.field_dtype(field)  # a subarray field adds its dimensions
        self._dtype = dtype.base
        self._full_shape = info.shape + dtype.shape  # what keys index
        if chain is not None:
            key = chain.key()
        else:
            key = (Ellipsis,) if not keys else _as_tuple(keys[0])  # no key: all of it
        self._selection = translate(key, self._full_shape)

    def _keyed(self, item) -> DatasetProxy:
        """``self[item]`` for a first key (the commonest indexing by far: a batch's rows):
        ``__init__``'s work without its steps that a first key does not need."""
        selection = translate(item if type(item) is tuple else (item,), self._full_shape)
        proxy = object.__new__(type(self))
        proxy.__dict__ = self.__dict__.copy()  # reader, info, field, dtype, shape: as they are
        proxy.keys = (item,)
        proxy._chain = None
        proxy._selection = selection
        return proxy

    @property
    def key(self) -> Any:
        """The last key given (None for none); ``keys`` holds them all."""
        return self.keys[-1] if self.keys else None

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._selection.result_shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item) -> DatasetProxy:
        """This selection indexed further: by a field name, or by a numpy key, as
        ``numpy_array[k1][k2]...`` (each key applies to the previous result; a key numpy
        refuses raises numpy's exception here)."""
        if not self.keys and not isinstance(item, str):
            return self._keyed(item)
        if isinstance(item, str):
            if self.field is not None:
                raise KeyError(f"{self.path} already selects field {self.field!r}")
            field_shape = self.info.field_dtype(item).shape
            chain = self._chain
            if chain is None and self.keys and (field_shape or len(self.keys) > 1):
                chain = self._chained()
            if chain is not None:
                # Keys given before the field index the rows; the field's dimensions follow.
                chain = chain.extend(field_shape)
            return type(self)(self.reader, self.info, item, self.keys, chain, len(self.keys))
        chain = (self._chain or self._chained()).index(item)
        return type(self)(self.reader, self.info, self.field, (*self.keys, item), chain,
                          self._field_at)

    def _chained(self) -> Chain:
        """This proxy's one key as the start of a chain."""
        shape = self.info.shape + self.info.field_dtype(self.field).shape
        return Chain.of(shape).index(self.keys[0])

    def spec(self) -> ReadSpec:
        """The request this proxy describes: its whole data when no key was given."""
        sel = self._selection
        return ReadSpec(ARRAY, self.info.path, self.field, sel, sel.result_shape, self._dtype)

    def split(self, n: int) -> list[ReadSpec] | None:
        """The request as up to ``n`` requests for consecutive rows of the result, each at
        least SPLIT_BYTES, for as many workers; None when it is smaller or its key is not one
        slice of step 1 or one index array (the result's rows then are not the key's)."""
        shape = self._selection.result_shape
        nbytes = math.prod(shape) * self._dtype.itemsize
        if n < 2 or nbytes < 2 * SPLIT_BYTES or len(self.keys) != 1 or self._chain is not None:
            return None  # the commonest case: asked first, in as few steps as it takes
        rows = shape[0] if shape else 0
        k = min(n, rows, MAX_PARTS, nbytes // SPLIT_BYTES)
        if k < 2:
            return None
        key = self.keys[0]
        if isinstance(key, tuple):
            if len(key) != 1:
                return None
            key = key[0]
        if self.info.field_dtype(self.field).shape:
            return None  # a subarray field: its dimensions follow the rows' (see _read_array)
        if isinstance(key, slice):
            start, _, step = key.indices(self.info.shape[0])
            if step != 1:
                return None

            def part_key(a: int, b: int) -> Any:
                return slice(start + a, start + b)
        else:
            array = np.asarray(key) if isinstance(key, (list, np.ndarray)) else None
            if array is None or array.ndim != 1 or array.dtype.kind not in "iu":
                return None

            def part_key(a: int, b: int) -> Any:
                return array[a:b]

        row_bytes = nbytes // rows
        edges = [rows * i // k for i in range(k + 1)]
        return [ReadSpec(ARRAY, self.path, self.field, translate(part_key(a, b), self.info.shape),
                         (b - a, *self.shape[1:]), self.dtype, at=a * row_bytes)
                for a, b in zip(edges[:-1], edges[1:], strict=True)]

    # ---- stages ----

    def create_stage(self, shape) -> Stage:
        """Shared memory for results up to ``shape`` (an int or a partial tuple of the dataset's
        shape, completed from it) of this dataset's dtype; of a field's, when this proxy selects
        one (a subarray field's dimensions follow the rows', as in its results).
        """
        dtype = self.info.field_dtype(self.field)
        full = _complete_shape(shape, self.info.shape + dtype.shape, self.path)
        label = f"stage of {self.path}" + (f"[{self.field!r}]" if self.field else "")
        return self.reader.register(Stage(full, dtype.base, label))

    def create_stage_pool(self, shape, n: int) -> StagePool:
        """``n`` stages of ``shape``, used in turn by ``reader.request``."""
        n = check_positive_int("n (stages in the pool)", n)
        return StagePool([self.create_stage(shape) for _ in range(n)])

    def __repr__(self) -> str:
        parts = [self.path, *(f"[{key!r}]" for key in self.keys)]
        if self.field is not None:
            parts.insert(1 + self._field_at, f"[{self.field!r}]")
        return f"<{type(self).__name__} {''.join(parts)} {self.shape} {self.dtype}>"


class ArrayProxy(DatasetProxy):
    """A plain (numeric) dataset."""


class TableProxy(DatasetProxy):
    """A 1-D compound dataset, as PyTables writes tables; fields are its columns."""

    def col(self, name: str) -> DatasetProxy:
        """The column ``name``; index it like an array of shape ``(nrows, *column shape)``."""
        return self[name]

    def read(self, start=None, stop=None, step=None, field: str | None = None) -> DatasetProxy:
        """Rows ``start:stop:step`` (of one field when given), as PyTables' ``Table.read``."""
        proxy = self[field] if field is not None else self
        return proxy[slice(start, stop, step)]

    def read_coordinates(self, coords, field: str | None = None) -> DatasetProxy:
        """The rows at ``coords``, in that order (of one field when given)."""
        proxy = self[field] if field is not None else self
        return proxy[np.asarray(coords)]

    def where(self, condition: str, condvars: dict | None = None, start=None, stop=None,
              step=None) -> ReadSpec:
        """Rows for which the numexpr ``condition`` holds, evaluated by a worker.

        Column names are variables of the condition; ``condvars`` adds others. The stage must
        hold every matching row, else ``get`` raises ``SharedMemoryError``.
        """
        if not isinstance(condition, str):
            raise TypeError(f"condition must be a string, got {condition!r}")
        if step is not None and step < 1:
            raise ValueError(f"where() needs step >= 1, got {step}")
        shape, dtype = self._rows_of(self.field, start, stop, step)
        return ReadSpec(WHERE, self.path, self.field, None, shape, dtype,
                        (condition, dict(condvars or {}), start, stop, step))

    def read_sorted(self, sortby: str, checkCSI: bool = False, field: str | None = None,  # noqa: N803
                    start=None, stop=None, step=None) -> ReadSpec:
        """Rows in the order of column ``sortby`` (stable), then sliced ``start:stop:step``.

        With ``checkCSI=True``, as in PyTables, the column must carry a completely sorted
        index (PyTables' ``create_csindex``); otherwise ``ValueError``.
        """
        self.info.field_dtype(sortby)
        if checkCSI:
            check_csindex(self.info.filename, self.reader.file_kwargs, self.path, sortby)
        field = field if field is not None else self.field
        shape, dtype = self._rows_of(field, start, stop, step)
        return ReadSpec(SORTED, self.path, field, None, shape, dtype, (sortby, start, stop, step))

    def _rows_of(self, field: str | None, start, stop, step) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of rows ``start:stop:step`` (of ``field``): the most such a query
        returns. A subarray field adds its dimensions."""
        dtype = self.info.field_dtype(field)
        n = len(range(self.info.shape[0])[slice(start, stop, step)])
        return (n, *dtype.shape), dtype.base


class VLArrayProxy(DatasetProxy):
    """A variable-length dataset (PyTables ``VLArray``); results are object arrays of rows.

    A stage of ``create_stage(n)`` holds ``n`` elements of the rows' dtype in all, plus room for
    the row offsets. Rows of pickled objects (PyTables' ``ObjectAtom``) are unpickled only for a
    Reader made with ``allow_pickle=True``; otherwise ``request`` raises ``ValueError`` before
    anything is read, as ``numpy.load`` refuses pickles by default.
    """

    def spec(self) -> ReadSpec:
        return ReadSpec(VLEN, self.path, None, self._selection, self.shape,
                        self.info.vlen_base, pseudo_atom=self.info.pseudo_atom,
                        allow_pickle=self.reader.allow_pickle)

    def create_stage(self, shape) -> Stage:
        n = math.prod(_complete_shape(shape, self.info.shape, self.path))
        base = self.info.vlen_base
        assert base is not None  # a VLArrayProxy is made for variable-length datasets only
        itemsize = base.itemsize
        # Room for n elements and the offsets of up to n rows, counted in elements.
        return self.reader.register(
            Stage((n + -(-8 * (n + 1) // itemsize),), base, f"stage of {self.path}")
        )

    def __getitem__(self, item) -> DatasetProxy:
        if isinstance(item, str):
            raise KeyError(f"{self.path} holds variable-length rows; it has no field {item!r}")
        return super().__getitem__(item)


def make_proxy(reader: Owner, info: DatasetInfo) -> DatasetProxy:
    if info.vlen_base is not None:
        return VLArrayProxy(reader, info)
    if info.dtype.names and len(info.shape) == 1:
        return TableProxy(reader, info)
    return ArrayProxy(reader, info)


def _as_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _complete_shape(shape, data_shape: tuple[int, ...], path: str) -> tuple[int, ...]:
    """``shape`` as a tuple, its missing trailing dimensions taken from ``data_shape``."""
    head = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if len(head) > len(data_shape) and data_shape:
        raise ValueError(f"stage shape {head} has more dimensions than {path} {data_shape}")
    for n in head:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"stage shape must hold non-negative ints, got {shape!r}")
    full = tuple(int(n) for n in head) + tuple(data_shape[len(head):])
    if math.prod(full) == 0:
        raise ValueError(f"stage shape {full} holds nothing")
    return full
