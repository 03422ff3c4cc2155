"""Batches of fixed-size rows and variable-length arrays laid out in a slot as they are read, with
nothing pickled (internal).

A Loader whose batches no transform makes hands them over this way, when its columns are
fixed-size rows and variable-length arrays of native numbers: with no transform, or with only a
``Pad`` and ``copy=True`` (the consumer pads as it copies the batch out). A worker writes each
dataset's rows in its part of the slot: fixed-size rows straight from the file; a
variable-length array's rows end to end, with each row's place and length, one copy from the
file's heap whatever the number of rows. The consumer makes the columns from the parts
(``read_packed``): the rows padded by the ``Pad``, written once into arrays the caller owns; or
the list of per-row arrays, views of the values.

Why not the padded rows in the slot, or the batch pickled (``payload``): a padded batch of token
sequences is about twice its tokens, each byte of it written by the worker and copied again by
the consumer, and a list of rows is pickled row by row; at 256 rows a batch, each step of Python
and numpy per batch is a few percent of the rate. See bench/README.md, "Tokens handed over
packed".

Layout of a slot::

    int64 rows | per dataset: int64 offset, bytes, longest row | ... | parts (64-byte aligned)

A fixed-size dataset's part is its rows; a variable-length one's is each row's start, then each
row's length (int64, in elements; starts from the part's values), then the values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .._engine.shm import items, round_up
from .pad import Pad

ALIGN = 64


class PackedSlot:
    """Lays out the parts of one batch of ``n`` rows of ``n_datasets`` datasets in ``slot`` (a
    uint8 view of it); counts what the batch needs once it no longer fits."""

    def __init__(self, slot: np.ndarray, n_datasets: int, n: int):
        self.slot, self.n = slot, n
        self.head = slot[: 8 * (1 + 3 * n_datasets)].view(np.int64)
        self.end = round_up(self.head.nbytes, ALIGN)
        self.open = -1  # the dataset whose part ``arrays`` opened

    def rows(self, d: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Dataset ``d``'s part: an array of fixed-size rows to fill (in private memory when
        the batch does not fit: it will not be handed over, but its size is counted)."""
        shape, dtype = items(shape, dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        at = self._part(d, nbytes)
        if at + nbytes > len(self.slot):
            return np.empty(shape, dtype)
        return self.slot[at : at + nbytes].view(dtype).reshape(shape)

    def arrays(self, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dataset ``d``'s part, of variable-length rows: where their values go (bytes, to be
        copied only when they fit), and where each row's start (in the values) and length
        are noted. ``close_arrays`` ends the part."""
        n, at = self.n, self.end
        self.open = d
        if at + 16 * n > len(self.slot):
            return np.empty(0, np.uint8), np.empty(n, np.int64), np.empty(n, np.int64)
        places = self.slot[at : at + 16 * n].view(np.int64)
        return self.slot[at + 16 * n :], places[:n], places[n:]

    def close_arrays(self, nbytes: int, longest: int) -> None:
        """The values of the open part take ``nbytes``; its longest row is ``longest``."""
        self._part(self.open, 16 * self.n + nbytes, longest)

    def _part(self, d: int, nbytes: int, longest: int = 0) -> int:
        at = self.end
        self.head[1 + 3 * d : 4 + 3 * d] = at, nbytes, longest
        self.end = round_up(at + nbytes, ALIGN)
        return at

    def finish(self) -> int:
        """The bytes of the slot the batch holds, or minus the bytes it needs."""
        if self.end > len(self.slot):
            return -self.end
        self.head[0] = self.n
        return self.end


def read_packed(slot: np.ndarray, kinds: Sequence[tuple[np.dtype, tuple[int, ...] | None]],
                copy: bool, pad: Pad | None) -> list:
    """Each dataset's rows in ``slot``, as ``PackedSlot`` laid them out: fixed-size rows (kinds
    ``(dtype, row shape)``) as a view of the slot; variable-length arrays (``(element dtype,
    None)``) padded by ``pad`` into new arrays, or as a list of arrays that the caller owns
    (``copy``: one copy of the part) or views of the slot."""
    head = slot[: 8 * (1 + 3 * len(kinds))].view(np.int64).tolist()
    n = head[0]
    out: list = []
    for d, (dtype, shape) in enumerate(kinds):
        at, nbytes, longest = head[1 + 3 * d : 4 + 3 * d]
        part = slot[at : at + nbytes]
        if shape is not None:
            out.append(part.view(dtype).reshape(n, *shape))
            continue
        places = part[: 16 * n].view(np.int64)
        starts, lengths = places[:n], places[n:]
        values = part[16 * n :]
        if pad is not None:  # new arrays either way
            out.append(pad.packed(values, starts, lengths, dtype, longest))
            continue
        values = (values.copy() if copy else values).view(dtype)
        out.append([values[a : a + k] for a, k in zip(starts.tolist(), lengths.tolist(),
                                                        strict=True)])
    return out
