"""``Pad``: the batch transform that pads variable-length rows (token sequences) to one length.

Public as ``multitables.Pad``. Called on a batch, it pads each column that is a list of arrays.
A Loader whose only transform is a ``Pad`` pads with no array made per row: the caller's process
as it copies each batch out of shared memory (``copy=True``: ``packed.py``), or the workers, each
row copied from the file's heap straight to its place in the padded batch in the slot
(``copy=False``: ``SampleJob``). 3-4x the rate of the same padding written in numpy
(bench/README.md, "Tokens handed over packed").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .._hdf5.vlenread import gather_rows

Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]
# Where a batch's rows lie: an image of bytes, each row's offset and size in it (bytes), and the
# row of the batch it goes to.
Piece = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


class Pad:
    """A ``batch_transform`` for a Loader: each column of the batch that is a list of arrays
    (a variable-length column, or a transform's results of different lengths) becomes
    ``(padded, lengths)``: one array of the rows, padded with ``fill`` along their first axis
    to the batch's longest row (or to ``length``), and the int64 length of each row in it.
    Other columns are left as they are.

    Parameters
    ----------
    fill : number
        What pads the rows; it must fit their dtype.
    length : int, optional
        Pad every batch to this length rather than to its longest row.
    truncate : bool
        With ``length``: cut longer rows to it (``lengths`` then says what was kept) rather than
        raise ``ValueError``.

    Examples
    --------
    >>> import numpy as np, multitables
    >>> padded, lengths = multitables.Pad(fill=-1)([np.array([1, 2, 3]), np.array([4])])
    >>> padded.tolist(), lengths.tolist()
    ([[1, 2, 3], [4, -1, -1]], [3, 1])

    In a Loader, ``batch_transform=multitables.Pad(fill=-1)`` over a variable-length column of
    token sequences gives ``(tokens, lengths)`` batches: int32 ``(256, longest)``, int64
    ``(256,)``.
    """

    def __init__(self, fill: Any = 0, *, length: int | None = None, truncate: bool = False):
        if not np.isscalar(fill) or isinstance(fill, (str, bytes)):
            raise TypeError(f"fill must be a number, got {fill!r}")
        if length is not None and (isinstance(length, bool) or not isinstance(
                length, (int, np.integer)) or length < 0):
            raise ValueError(f"length must be a whole number >= 0, got {length!r}")
        if truncate and length is None:
            raise ValueError("truncate=True needs a length to cut the rows to")
        self.fill, self.length, self.truncate = fill, length, bool(truncate)
        self._fills: dict[np.dtype, np.ndarray] = {}  # the fill's bytes, by dtype

    def __repr__(self) -> str:
        length = "" if self.length is None else f", length={self.length}"
        truncate = ", truncate=True" if self.truncate else ""
        return f"Pad(fill={self.fill!r}{length}{truncate})"

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, dict):
            return {key: self.column(value) for key, value in batch.items()}
        if type(batch) is tuple:
            return tuple(self.column(value) for value in batch)
        return self.column(batch)

    def column(self, values: Any) -> Any:
        """``(padded, lengths)`` of a list of arrays; anything else as it is."""
        if not (isinstance(values, list) and values
                and all(isinstance(v, np.ndarray) for v in values)):
            return values
        first = values[0]
        for i, value in enumerate(values):
            if value.ndim == 0 or value.dtype != first.dtype or value.shape[1:] != (
                    first.shape[1:]):
                raise ValueError(f"Pad pads arrays of one dtype and row shape along their first "
                                 f"axis: row 0 is {_spelled(first)}, row {i} {_spelled(value)}")
        if first.dtype.hasobject:
            raise ValueError(f"Pad cannot pad arrays of Python objects ({first.dtype})")
        sizes = np.array([v.nbytes for v in values], np.int64)
        image = np.concatenate([v.reshape(-1) for v in values]).view(np.uint8)
        piece = (image, np.cumsum(sizes) - sizes, sizes, np.arange(len(values)))
        return self.gather([piece], len(values), first.dtype, first.shape[1:], np.empty)

    def gather(self, pieces: Sequence[Piece], n: int, dtype: np.dtype,
               inner: tuple[int, ...], allocate: Allocate) -> tuple[np.ndarray, np.ndarray]:
        """``(padded, lengths)`` of the ``n`` rows that ``pieces`` place, each row an array of
        ``dtype`` and shape ``(length, *inner)``; ``padded`` from ``allocate``."""
        dtype = np.dtype(dtype)
        element = max(dtype.itemsize * math.prod(inner), 1)
        lengths = np.zeros(n, np.int64)
        for _, _, sizes, dest in pieces:
            lengths[dest] = sizes // element
        width, lengths = self.fit(lengths)
        fill = self.fill_bytes(dtype)
        out = allocate((n, width, *inner), dtype)
        rows = out.reshape(n, -1).view(np.uint8)
        for image, offsets, sizes, dest in pieces:
            gather_rows(image, offsets, sizes, dest, rows, fill)
        return out, lengths

    def packed(self, values: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
               dtype: np.dtype, longest: int) -> tuple[np.ndarray, np.ndarray]:
        """``(padded, lengths)`` into new arrays, of rows of ``dtype`` laid end to end in
        ``values`` (bytes), row i ``lengths[i]`` elements from element ``starts[i]``, the
        longest ``longest``: ``gather`` for rows laid out so, in fewer steps (each is a few
        percent of a batch's time)."""
        n = len(lengths)
        width = longest if self.length is None else self.length
        lengths = self.fit(lengths)[1] if longest > width else lengths.copy()
        out = np.empty((n, width), dtype)
        gather_rows(values, starts, lengths, None, out.view(np.uint8), self.fill_bytes(dtype),
                    dtype.itemsize)
        return out, lengths

    def fill_bytes(self, dtype: np.dtype) -> np.ndarray:
        """One element of ``dtype`` holding the fill, as bytes; ValueError if it does not fit."""
        fill = self._fills.get(dtype)
        if fill is None:
            fill = self._fills[dtype] = _fill_bytes(self.fill, dtype)
        return fill

    def check(self, lengths: np.ndarray, longest: int, dtype: np.dtype) -> None:
        """Raise what padding rows of ``lengths`` (the longest ``longest``) of ``dtype`` would
        raise: a fill that does not fit, a row past ``length`` not to be cut."""
        self.fill_bytes(dtype)
        if self.length is not None and longest > self.length and not self.truncate:
            self.fit(lengths)

    def fit(self, lengths: np.ndarray) -> tuple[int, np.ndarray]:
        """The length rows of ``lengths`` are padded to, and the lengths kept of them;
        ValueError for a row past ``length`` that is not to be cut."""
        longest = int(lengths.max()) if len(lengths) else 0
        width = longest if self.length is None else self.length
        if longest > width:
            if not self.truncate:
                row = int(np.argmax(lengths))
                raise ValueError(f"row {row} of the batch is {longest} long, past Pad's length "
                                 f"{width} (truncate=True cuts such rows)")
            lengths = np.minimum(lengths, width)
        return width, lengths


def _fill_bytes(fill: Any, dtype: np.dtype) -> np.ndarray:
    """One element of ``dtype`` holding ``fill``, as bytes; ValueError if it does not fit."""
    try:
        with np.errstate(all="raise"):
            value = np.array(fill).astype(dtype, casting="unsafe")
        fits = value == np.array(fill) or (value != value and fill != fill)
    except (ValueError, TypeError, OverflowError, FloatingPointError):
        fits = False
    if not fits:
        raise ValueError(f"Pad's fill {fill!r} does not fit the rows' dtype {dtype}")
    return np.frombuffer(value.tobytes(), np.uint8)


def _spelled(value: np.ndarray) -> str:
    return f"{value.dtype} of shape {value.shape}"
