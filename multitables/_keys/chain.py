"""A chain of numpy keys (``ds[k1][k2]...``) as one key on the dataset (internal).

``Chain.of(shape).index(k1).index(k2).key()`` is a key ``K`` with ``arr[K]`` equal to
``arr[k1][k2]`` for every array ``arr`` of ``shape``, so a chained request reads only the
elements it returns. Each ``index`` translates its key against the previous result's shape (so a
bad key raises what numpy raises, at that key) and maps the translated box back to dataset
coordinates: slices compose arithmetically, index arrays by ``take``.

A chain describes the result as one coordinate per dataset dimension, each one of

- ``_Fixed(v)``: the dimension is fixed at ``v`` (an integer key took it);
- ``_Range(axis, start, step)``: it runs ``start + step * i`` along result axis ``axis``;
- ``_Array(a)``: an int64 array of the result's rank, of extent 1 or the result's along each
  axis (broadcast over the rest): what index arrays leave.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ._indexing import Selection, translate


class _Fixed(NamedTuple):
    value: int


class _Range(NamedTuple):
    axis: int
    start: int
    step: int


class _Array(NamedTuple):
    values: np.ndarray


_Coord = _Fixed | _Range | _Array


class Chain:
    """The result of indexing an array of ``base`` shape by a chain of keys.

    Attributes
    ----------
    base : tuple of int
        Shape of the array the chain starts from (a dataset, with a field's dimensions).
    shape : tuple of int
        Shape of the result.
    """

    def __init__(self, base: tuple[int, ...], shape: tuple[int, ...], coords: list[_Coord]):
        self.base = base
        self.shape = shape
        self.coords = coords  # one per base dimension; unused when the result is empty

    @classmethod
    def of(cls, shape: tuple[int, ...]) -> Chain:
        """The whole array: no key yet."""
        shape = tuple(int(n) for n in shape)
        return cls(shape, shape, [_Range(d, 0, 1) for d in range(len(shape))])

    @property
    def empty(self) -> bool:
        return math.prod(self.shape) == 0

    def extend(self, dims: tuple[int, ...]) -> Chain:
        """This chain on an array with ``dims`` more trailing dimensions (a subarray field's),
        which the result gains whole, after its own axes."""
        n = len(self.shape)
        ones = (1,) * len(dims)
        coords: list[_Coord] = [
            _Array(c.values.reshape(c.values.shape + ones)) if isinstance(c, _Array) else c
            for c in self.coords
        ]
        coords += [_Range(n + j, 0, 1) for j in range(len(dims))]
        return Chain(self.base + tuple(dims), self.shape + tuple(dims), coords)

    def index(self, key) -> Chain:
        """This result indexed by ``key``; raises what numpy raises for it."""
        sel = translate(key, self.shape)
        shape = tuple(sel.result_shape)
        if self.empty or math.prod(shape) == 0:
            return Chain(self.base, shape, [])
        coords = [_on_box(c, sel) for c in self.coords]
        box = tuple(sel.read_shape)
        lk = sel.local_key
        if lk is None and [n for n in box if n > 1] == [n for n in shape if n > 1]:
            coords = [_reshaped(c, box, shape) for c in coords]
        elif lk is None:  # the box's axes split or merge (index arrays of several dimensions)
            coords = [_gathered(c, box, None, shape) for c in coords]
        elif _is_basic(lk):
            coords = _basic_local(coords, box, lk)
        elif _one_array(lk, len(box)):
            lk = lk + (slice(None),) * (len(box) - len(lk))  # the axes a key leaves out
            coords = [_one_array_local(c, box, lk) for c in coords]
        else:
            coords = [_gathered(c, box, lk) for c in coords]
        return Chain(self.base, shape, coords)

    def key(self) -> tuple:
        """One numpy key on the base array that gives this result."""
        if not self.base:
            return _scalar_key(self.shape)
        if self.empty:
            # Empty index arrays of the result's shape: nothing to read, and numpy's shape.
            return tuple(np.zeros(self.shape, np.intp) for _ in self.base)
        basic = _basic_key(self.coords, self.shape)
        if basic is not None:
            return basic
        return _fancy_key(self.coords, self.shape)


def _scalar_key(shape: tuple[int, ...]) -> tuple:
    """A key on a scalar giving ``shape``: newaxes, and ``False`` for an empty axis (a lone
    advanced index stays where it is). No one key repeats a scalar, or empties two axes."""
    if sum(1 for n in shape if n == 0) > 1 or any(n > 1 for n in shape):
        raise NotImplementedError(
            f"a chain of keys on a scalar dataset giving shape {shape}: index it once"
        )
    return tuple(False if n == 0 else None for n in shape)


# ---- applying a translated key ------------------------------------------------------------


def _values(entry) -> np.ndarray:
    """The sorted positions of one ``Selection.dims`` entry."""
    if isinstance(entry, tuple):
        start, step, count = entry
        return np.arange(start, start + step * count, step, dtype=np.int64)
    return entry


def _along(values: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """1-D ``values`` laid along ``axis`` of an array of rank ``ndim``."""
    return values.reshape([-1 if k == axis else 1 for k in range(ndim)])


def _on_box(c: _Coord, sel: Selection) -> _Coord:
    """Coordinate ``c`` of the current result, restricted to the box ``sel`` reads from it."""
    if isinstance(c, _Fixed):
        return c
    dims, nbox = sel.dims, len(sel.read_shape)
    if sel.points is None:  # product mode: box axis k holds positions dims[k] of axis k
        if isinstance(c, _Range):
            e = dims[c.axis]
            if isinstance(e, tuple):
                return _Range(c.axis, c.start + c.step * e[0], c.step * e[1])
            return _Array(_along(c.start + c.step * e, c.axis, nbox))
        a = c.values
        for k, e in enumerate(dims):
            if a.shape[k] > 1:
                if isinstance(e, tuple):
                    a = a[(slice(None),) * k + (slice(e[0], e[0] + e[1] * e[2], e[1]),)]
                else:
                    a = np.take(a, e, axis=k)
        return _Array(a)
    # Point mode: the points of the axes point_dims lie along box axis point_axis; the other
    # axes keep their order around it, each a progression.
    pdims, pa, pts = sel.point_dims, sel.point_axis, sel.points
    others = [k for k in range(len(dims)) if k not in pdims]

    def box_axis(k: int) -> int:
        j = others.index(k)
        return j if j < pa else j + 1

    if isinstance(c, _Range):
        if c.axis in pdims:
            col = pts[:, pdims.index(c.axis)]
            return _Array(_along(c.start + c.step * col, pa, nbox))
        e = dims[c.axis]
        return _Range(box_axis(c.axis), c.start + c.step * e[0], c.step * e[1])
    a = c.values
    for k in others:
        e = dims[k]
        if a.shape[k] > 1:
            a = a[(slice(None),) * k + (slice(e[0], e[0] + e[1] * e[2], e[1]),)]
    m = len(pts)
    a = np.moveaxis(a, list(pdims), list(range(-len(pdims), 0)))
    idx = tuple(
        pts[:, j] if a.shape[a.ndim - len(pdims) + j] > 1 else np.zeros(m, np.intp)
        for j in range(len(pdims))
    )
    a = a[(Ellipsis,) + idx]  # (others..., m): the advanced indices are adjacent, at the end
    return _Array(np.moveaxis(a, -1, pa))


def _reshaped(c: _Coord, box: tuple[int, ...], shape: tuple[int, ...]) -> _Coord:
    """``c`` on the box, when the result is the box reshaped: axes of extent one come and
    go, the others keep their order."""
    if isinstance(c, _Fixed):
        return c
    box_big = [k for k, n in enumerate(box) if n > 1]
    res_big = [k for k, n in enumerate(shape) if n > 1]
    if isinstance(c, _Range):
        if box[c.axis] == 1:
            return _Fixed(c.start)
        return _Range(res_big[box_big.index(c.axis)], c.start, c.step)
    a = c.values.reshape([c.values.shape[k] for k in box_big])
    compact = [1] * len(shape)
    for j, k in enumerate(res_big):
        compact[k] = a.shape[j]
    return _Array(a.reshape(compact))


def _is_basic(local_key: tuple) -> bool:
    """Whether a local key only reverses, drops (0), adds (None) or keeps (...) axes."""
    return all(
        item is None or item is Ellipsis or isinstance(item, slice)
        or (type(item) is int and item == 0)
        for item in local_key
    )


def _basic_local(coords: list[_Coord], box: tuple[int, ...], lk: tuple) -> list[_Coord]:
    """Coordinates after a basic local key (see ``_is_basic``) rearranges the box."""
    consumed = sum(1 for item in lk if isinstance(item, slice) or type(item) is int)
    # Per box axis: the result axis it becomes (None: dropped), and whether it is reversed.
    target: list[tuple[int | None, bool]] = []
    r = 0
    for item in lk:
        if isinstance(item, slice):
            target.append((r, item.step is not None and item.step < 0))
            r += 1
        elif type(item) is int:
            target.append((None, False))
        elif item is None:
            r += 1
        else:  # Ellipsis
            for _ in range(len(box) - consumed):
                target.append((r, False))
                r += 1
    while len(target) < len(box):
        target.append((r, False))
        r += 1
    out: list[_Coord] = []
    for c in coords:
        if isinstance(c, _Range):
            axis, rev = target[c.axis]
            if axis is None:
                out.append(_Fixed(c.start))
            elif rev:
                out.append(_Range(axis, c.start + c.step * (box[c.axis] - 1), -c.step))
            else:
                out.append(_Range(axis, c.start, c.step))
        elif isinstance(c, _Array):
            out.append(_Array(c.values[lk]))
        else:
            out.append(c)
    return out


def _one_array(lk: tuple, nbox: int) -> bool:
    """Whether a local key is one integer array on one box axis, every other axis kept whole
    (in either order): the common ``ds[...][rows]``, where the array takes the axis's place."""
    arrays = [item for item in lk if isinstance(item, np.ndarray)]
    return (len(lk) <= nbox and len(arrays) == 1 and arrays[0].dtype.kind in "iu"
            and all(isinstance(item, np.ndarray) or (isinstance(item, slice)
                    and item.start is None and item.stop is None and item.step in (None, -1))
                    for item in lk))


def _one_array_local(c: _Coord, box: tuple[int, ...], lk: tuple) -> _Coord:
    """``c`` after a local key of one index array (see ``_one_array``), without materialising
    the axes the array leaves alone."""
    if isinstance(c, _Fixed):
        return c
    a = next(k for k, item in enumerate(lk) if isinstance(item, np.ndarray))
    pos = lk[a]
    extra = pos.ndim - 1  # the array's dimensions replace axis a

    def moved(k: int) -> int:
        return k if k < a else k + extra

    if isinstance(c, _Range):
        if c.axis != a:
            if lk[c.axis].step == -1:
                return _Range(moved(c.axis), c.start + c.step * (box[c.axis] - 1), -c.step)
            return _Range(moved(c.axis), c.start, c.step)
        values = c.start + c.step * pos
        shape = [1] * (len(box) + extra)
        shape[a : a + pos.ndim] = pos.shape
        return _Array(values.reshape(shape))
    v = c.values
    rev = tuple(slice(None, None, -1) if isinstance(item, slice) and item.step == -1
                and v.shape[k] > 1 else slice(None) for k, item in enumerate(lk))
    v = np.take(v[rev], pos if v.shape[a] > 1 else np.zeros_like(pos), axis=a)
    return _Array(_compact(v))


def _gathered(c: _Coord, box: tuple[int, ...], lk: tuple | None,
              shape: tuple[int, ...] = ()) -> _Coord:
    """``c`` after a local key with index arrays (or, without one, the box reshaped to
    ``shape``): materialised at the result's size."""
    if isinstance(c, _Fixed):
        return c
    if isinstance(c, _Range):
        full = np.broadcast_to(_along(c.start + c.step * np.arange(box[c.axis]), c.axis,
                                      len(box)), box)
    else:
        full = np.broadcast_to(c.values, box)
    return _Array(_compact(full.reshape(shape) if lk is None else np.ascontiguousarray(full[lk])))


def _compact(a: np.ndarray) -> np.ndarray:
    """``a`` with extent 1 along the axes it is constant on (it broadcasts to the same)."""
    for k in range(a.ndim):
        if a.shape[k] > 1:
            first = a[(slice(None),) * k + (slice(0, 1),)]
            if (a == first).all():
                a = first
    return a


# ---- the key ------------------------------------------------------------------------------


def _basic_key(coords: list[_Coord], shape: tuple[int, ...]) -> tuple | None:
    """Ints, slices, newaxes and at most one 1-D index array giving the result, when the
    dimensions vary along the result's axes in their own order, each along its own axis; else
    None. An index array stands where numpy puts it: the ints (advanced indices too, beside an
    array) must sit next to it in the key."""
    on_axis: dict[int, int] = {}
    arrays = 0
    for d, c in enumerate(coords):
        if isinstance(c, _Range):
            axis = c.axis
        elif isinstance(c, _Array):
            varying = [k for k, n in enumerate(c.values.shape) if n > 1]
            if len(varying) != 1:
                return None
            axis = varying[0]
            arrays += 1
        else:
            continue
        if axis in on_axis or arrays > 1:
            return None
        on_axis[axis] = d
    order = [on_axis[a] for a in sorted(on_axis)]
    if order != sorted(order):
        return None
    key: list = []
    advanced: list[int] = []  # positions in the key of ints and the array
    d = 0

    def fixed_up_to(stop: int) -> None:
        nonlocal d
        while d < stop:
            advanced.append(len(key))
            key.append(coords[d].value)  # type: ignore[union-attr]
            d += 1

    for a, n in enumerate(shape):
        if a not in on_axis:
            if n != 1:
                return None
            key.append(None)
            continue
        fixed_up_to(on_axis[a])
        c = coords[d]
        if isinstance(c, _Array):
            advanced.append(len(key))
            key.append(c.values.reshape(-1))
        else:
            assert isinstance(c, _Range)
            last = c.start + c.step * (n - 1)
            if c.step > 0:
                key.append(slice(c.start, last + 1, c.step))
            else:
                key.append(slice(c.start, last - 1 if last > 0 else None, c.step))
        d += 1
    fixed_up_to(len(coords))
    if arrays and advanced[-1] - advanced[0] + 1 != len(advanced):
        return None  # numpy would move the array's axis to the front
    return tuple(key)


def _fancy_key(coords: list[_Coord], shape: tuple[int, ...]) -> tuple:
    """One index array per dimension, broadcasting to the result's shape (an open mesh where
    the dimensions vary independently)."""
    n = len(shape)
    key = []
    for c in coords:
        if isinstance(c, _Fixed):
            key.append(np.full((1,) * n, c.value, np.intp))
        elif isinstance(c, _Range):
            key.append(_along(c.start + c.step * np.arange(shape[c.axis]), c.axis, n))
        else:
            key.append(c.values)
    # An axis along which every coordinate is constant (repeats of one element) must still
    # reach the result's extent: stretch the first array along it.
    full = tuple(shape)
    missing = [k for k, n in enumerate(np.broadcast_shapes(*(a.shape for a in key)))
               if n != full[k]]
    if missing:
        stretched = list(key[0].shape)
        for k in missing:
            stretched[k] = full[k]
        key[0] = np.broadcast_to(key[0], tuple(stretched))
    return tuple(key)
