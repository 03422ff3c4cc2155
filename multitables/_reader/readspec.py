"""What one Reader request reads, how a worker performs it, and how its result lies in a stage.

Internal module. A ``ReadSpec`` is plain data made in the caller (the key already translated by
the Cython core); ``execute`` runs in a worker and writes the result into the stage's data area;
``result_view`` rebuilds the result in the caller from the stage, without copying when it can.
"""

from __future__ import annotations

import marshal
import math
import pickle
from typing import Any

import h5py
import numpy as np

from .._engine._lent import view_array
from .._hdf5.hyperslab import read_selection
from .._keys._indexing import PLAIN_TAG, Selection, read_plain, take_plain, translate
from .stages import StageMemory, check_fits

# Kinds of request.
ARRAY = "array"  # dataset[key] or a field of a table: shape known up front
VLEN = "vlen"  # rows of a variable-length dataset: offsets then the concatenated rows
WHERE = "where"  # table rows matching a numexpr condition: row count known after the read
SORTED = "sorted"  # table rows in the order of one column


class ReadSpec:
    """A request as plain data.

    ``shape`` is the result's (for WHERE: the most rows it can have), ``dtype`` its elements'
    (VLEN: the rows' elements). The dtype is left out when a spec is sent to a worker (pickling a
    dtype costs more than the rest of the message); the worker derives it from the dataset.
    """

    __slots__ = ("kind", "path", "field", "selection", "shape", "dtype", "params", "pseudo_atom",
                 "allow_pickle", "at")
    dtype: np.dtype  # None only on the wire, until ``execute`` fills it in

    def __init__(self, kind: str, path: str, field: str | None, selection: Selection | None,
                 shape: tuple[int, ...], dtype: np.dtype | None, params: tuple = (),
                 pseudo_atom: str | None = None, allow_pickle: bool = False, at: int = 0):
        self.kind = kind
        self.path = path
        self.field = field
        self.selection = selection
        self.shape = shape
        self.dtype = dtype  # type: ignore[assignment]
        self.params = params
        self.pseudo_atom = pseudo_atom  # VLEN: how PyTables encoded the rows
        self.allow_pickle = allow_pickle  # VLEN of objects: whether the caller trusts the file
        self.at = at  # ARRAY: where the result starts in the stage's data (a part of a request)
        if pseudo_atom == "object" and not allow_pickle:
            raise pickle_refused(path)

    def __reduce__(self):
        return ReadSpec, (self.kind, self.path, self.field, self.selection, self.shape, None,
                          self.params, self.pseudo_atom, self.allow_pickle, self.at)

    @property
    def nbytes(self) -> int:
        """Bytes the result needs, as far as the caller knows: 0 for WHERE and VLEN, whose size
        is known once read (the worker checks that it fits the stage as it writes)."""
        if self.kind in (VLEN, WHERE):
            return 0
        return math.prod(self.shape) * self.dtype.itemsize


# ---- on the wire ----------------------------------------------------------------------------

# A request travels to its worker in the stage's header as bytes. The commonest, rows of an
# array by a slice or an index array, goes as int64 words that the Cython core writes into the
# header and reads from it (``Selection.put_plain``, ``read_plain``): pickling the objects
# (ReadSpec, Selection, numpy arrays) costs both sides several times more, and so did marshal's
# tuples (2 us a side for a 64-row batch). The dataset's path and field go before the plan as
# ``marshal`` bytes, made once per dataset (and read once per dataset in a worker).
_HEADS: dict[tuple[str, str | None], bytes] = {}
_PATHS: dict[bytes, tuple[str, str | None]] = {}


def _head(spec: ReadSpec) -> bytes:
    key = (spec.path, spec.field)
    head = _HEADS.get(key)
    if head is None:
        head = _HEADS[key] = marshal.dumps(key)
    return head


def put_wire(spec: ReadSpec, memory: StageMemory, part: int = 0, parts: int = 1) -> bool:
    """Write ``spec`` (or part ``part`` of ``parts``) into ``memory``'s header for a worker to
    take (``take_wire``); False when it does not fit (it travels down the channel then)."""
    sel = spec.selection
    if spec.kind == ARRAY and sel is not None:
        start, room = memory.request_area(part, parts)
        if sel.put_plain(memory.header, start, room, _head(spec), spec.shape, spec.at):
            return True
    return memory.put_request(to_wire(spec), part, parts)


def take_wire(memory: StageMemory, part: int = 0, parts: int = 1) -> ReadSpec:
    """The request that ``put_wire`` wrote (in the worker)."""
    start, room = memory.request_area(part, parts)
    plain = take_plain(memory.header, start, room)
    if plain is None:
        return from_wire(memory.request(part, parts))
    return _array_spec(*plain)


def to_wire(spec: ReadSpec) -> bytes:
    """``spec`` as bytes for ``from_wire`` (in a worker of the same build)."""
    sel = spec.selection
    if spec.kind == ARRAY and sel is not None:
        data = sel.plain_request(_head(spec), spec.shape, spec.at)
        if data is not None:
            return data
    return pickle.dumps(spec, pickle.HIGHEST_PROTOCOL)


def from_wire(data) -> ReadSpec:
    if data[:1] != PLAIN_TAG:
        return pickle.loads(data)
    return _array_spec(*read_plain(data))


def _array_spec(head: bytes, at: int, shape: tuple[int, ...], sel: Selection) -> ReadSpec:
    names = _PATHS.get(head)
    if names is None:
        names = _PATHS[head] = marshal.loads(head)
    return ReadSpec(ARRAY, names[0], names[1], sel, shape, None, at=at)


def pickle_refused(path: str) -> ValueError:
    """The error for pickled rows that the caller did not allow to be unpickled."""
    return ValueError(
        f"{path} holds pickled Python objects (a PyTables VLArray of ObjectAtom), and unpickling "
        "data from a file can run any code it holds; make the Reader with allow_pickle=True to "
        "read them, for files you trust"
    )


def element_dtype(spec: ReadSpec, dataset: h5py.Dataset) -> np.dtype:
    """What ``spec.dtype`` is in the caller, from the dataset (see ``ReadSpec``)."""
    if spec.kind == VLEN:
        base = h5py.check_vlen_dtype(dataset.dtype)
        return np.dtype(np.uint8) if base in (str, bytes) else base
    if spec.field is None:
        return dataset.dtype
    return dataset.dtype.fields[spec.field][0].base


# ---- worker side --------------------------------------------------------------------------


def execute(spec: ReadSpec, dataset: h5py.Dataset, memory: StageMemory) -> None:
    """Read ``spec`` from ``dataset`` into the stage; metadata goes to ``memory.meta``."""
    if spec.dtype is None:
        spec.dtype = element_dtype(spec, dataset)
    if spec.kind == ARRAY:
        _read_array(spec, dataset, memory)
    elif spec.kind == VLEN:
        _read_vlen(spec, dataset, memory)
    elif spec.kind == WHERE:
        _read_where(spec, dataset, memory)
    elif spec.kind == SORTED:
        _read_sorted(spec, dataset, memory)
    else:
        raise ValueError(f"unknown request kind {spec.kind!r}")


def _selection(spec: ReadSpec) -> Selection:
    """The translated key of an ARRAY or VLEN request (WHERE and SORTED have none)."""
    if spec.selection is None:
        raise ValueError(f"a {spec.kind} request has no key")
    return spec.selection


def _read_array(spec: ReadSpec, dataset: h5py.Dataset, memory: StageMemory) -> None:
    out = memory.data(spec.shape, spec.dtype, spec.at)
    sel = _selection(spec)
    field_shape = dataset.dtype[spec.field].shape if spec.field else ()
    if not field_shape:
        read_selection(dataset, sel, out, spec.field)
        return
    if out.size == 0:
        return
    # The key also indexes the field's own dimensions, which HDF5 cannot select: read the rows
    # the box touches (the sorted sets of sel.dims on the dataset's dimensions) with the field
    # whole, then pick the box's elements from them and arrange them as numpy would.
    ndim = len(dataset.shape)
    rows = [_values_of(e) for e in sel.dims[:ndim]]
    mesh = np.ix_(*rows) if rows else ()
    rows_sel = translate(mesh, dataset.shape)
    block = np.empty((*rows_sel.result_shape, *field_shape), spec.dtype)
    read_selection(dataset, rows_sel, block, spec.field)
    # Where each box element lies in the block: positions within the row sets, and the
    # field's own indices as they are.
    nbox = len(sel.read_shape)
    where = []
    if sel.points is None:
        for axis, entry in enumerate(sel.dims):
            pos = np.arange(len(_values_of(entry))) if axis < ndim else _values_of(entry)
            where.append(pos.reshape([-1 if k == axis else 1 for k in range(nbox)]))
    else:
        pdims, pa, points = sel.point_dims, sel.point_axis, sel.points
        others = [d for d in range(len(sel.dims)) if d not in pdims]
        for d, entry in enumerate(sel.dims):
            if d in pdims:
                col = points[:, pdims.index(d)]
                pos = np.searchsorted(rows[d], col) if d < ndim else col
                axis = pa
            else:
                j = others.index(d)
                axis = j if j < pa else j + 1
                pos = np.arange(len(_values_of(entry))) if d < ndim else _values_of(entry)
            where.append(pos.reshape([-1 if k == axis else 1 for k in range(nbox)]))
    box = block[tuple(where)] if where else block
    out[...] = box[sel.local_key] if sel.local_key is not None else box.reshape(spec.shape)


def _values_of(entry) -> np.ndarray:
    """The sorted positions of a ``Selection.dims`` entry."""
    if isinstance(entry, np.ndarray):
        return entry
    start, step, count = entry
    return np.arange(start, start + step * count, step, dtype=np.int64)


def _key_of(entry) -> Any:
    """A per-dimension entry of ``Selection.dims`` as a numpy index (slice or index array)."""
    if isinstance(entry, np.ndarray):
        return entry
    start, step, count = entry
    return slice(start, start + step * count, step) if count else slice(0, 0)


def _read_vlen(spec: ReadSpec, dataset: h5py.Dataset, memory: StageMemory) -> None:
    """Lay the rows out as int64 offsets (n + 1) then the concatenated elements."""
    rows = np.empty(spec.shape, object)
    sel = _selection(spec)
    # h5py returns an object array of rows; its shape is the read box's.
    box = dataset[_key_of(sel.dims[0])].reshape(sel.read_shape)
    rows[...] = box[sel.local_key] if sel.local_key is not None else box.reshape(spec.shape)
    flat = [
        np.frombuffer(r, np.uint8) if isinstance(r, bytes) else
        np.asarray(r, dtype=spec.dtype).reshape(-1)
        for r in rows.reshape(-1)
    ]
    offsets = np.zeros(len(flat) + 1, np.int64)
    np.cumsum([len(r) for r in flat], out=offsets[1:])
    head = 8 * len(offsets)
    nbytes = head + int(offsets[-1]) * spec.dtype.itemsize
    check_fits(memory.capacity, nbytes, (int(offsets[-1]),), spec.dtype)
    area = memory.data((nbytes,), np.uint8)
    area[:head] = offsets.view(np.uint8)
    data = area[head:].view(spec.dtype)
    for r, a, b in zip(flat, offsets[:-1], offsets[1:], strict=True):
        data[a:b] = r
    memory.meta[0] = len(flat)


def _rows_range(spec: ReadSpec, n: int) -> range:
    start, stop, step = spec.params[-3:]
    return range(n)[slice(start, stop, step)]


# WHERE evaluates its condition on blocks of rows of about this size, as PyTables does, so the
# whole table never has to sit in a worker's memory.
_WHERE_BLOCK_BYTES = 8 << 20


def _read_where(spec: ReadSpec, dataset: h5py.Dataset, memory: StageMemory) -> None:
    import numexpr

    condition, condvars = spec.params[0], dict(spec.params[1] or {})
    rows = _rows_range(spec, dataset.shape[0])  # step >= 1, checked by the caller
    block_rows = max(1, _WHERE_BLOCK_BYTES // dataset.dtype.itemsize)
    row_shape, found = spec.shape[1:], 0
    for lo in range(0, len(rows), block_rows):
        part = rows[lo : lo + block_rows]
        sel = translate((slice(part.start, part.stop, part.step),), dataset.shape)
        block = np.empty(sel.result_shape, dataset.dtype)
        read_selection(dataset, sel, block)
        env = {name: block[name] for name in dataset.dtype.names}
        env.update(condvars)
        hits = block[numexpr.evaluate(condition, local_dict=env)]
        if spec.field is not None:
            hits = hits[spec.field]
        total = found + len(hits)
        nbytes = total * math.prod(row_shape) * spec.dtype.itemsize
        check_fits(memory.capacity, nbytes, (total, *row_shape), spec.dtype)
        memory.data((total, *row_shape), spec.dtype)[found:] = hits
        found = total
    memory.meta[0] = found


def _read_sorted(spec: ReadSpec, dataset: h5py.Dataset, memory: StageMemory) -> None:
    sortby = spec.params[0]
    column = dataset.fields(sortby)[()]
    order = np.argsort(column, kind="stable")
    positions = order[slice(*spec.params[-3:])]
    sel = translate((positions,), dataset.shape)
    read_selection(dataset, sel, memory.data(spec.shape, spec.dtype), spec.field)


# ---- caller side --------------------------------------------------------------------------


def result_view(spec: ReadSpec, memory: StageMemory) -> Any:
    """The result as it lies in the stage: a view for arrays, an object array for VLEN."""
    if spec.kind == ARRAY:  # in one C call: a batch's result is taken once per batch
        return view_array(memory.raw, spec.at, spec.dtype, spec.shape)
    if spec.kind == WHERE:
        return memory.data((int(memory.meta[0]), *spec.shape[1:]), spec.dtype)
    if spec.kind != VLEN:
        return memory.data(spec.shape, spec.dtype)
    n = int(memory.meta[0])
    offsets = memory.data((n + 1,), np.int64)
    data = memory.data((8 * (n + 1) + int(offsets[-1]) * spec.dtype.itemsize,), np.uint8)
    data = data[8 * (n + 1) :]
    data = data.view(spec.dtype)
    rows = np.empty(n, object)
    for i in range(n):
        rows[i] = _decode(data[offsets[i] : offsets[i + 1]], spec)
    shaped = rows.reshape(spec.shape)
    return shaped[()] if shaped.ndim == 0 else shaped


def _decode(row: np.ndarray, spec: ReadSpec) -> Any:
    """A row as PyTables returns it: arrays, or bytes/str/objects for its pseudo-atoms."""
    pseudo_atom = spec.pseudo_atom
    if pseudo_atom == "vlstring":
        return row.tobytes()
    if pseudo_atom == "vlunicode":
        return row.astype("<u4").tobytes().decode("utf-32-le")
    if pseudo_atom == "object":
        if not spec.allow_pickle:  # checked when the spec was made; a file is data, not code
            raise pickle_refused(spec.path)
        return pickle.loads(row.tobytes())
    return row


def copy_result(value: Any) -> Any:
    """A copy of a result that owns its memory (rows of object arrays copied too)."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            # numpy gives scalars for keys that pick one element; a record's (np.void) views
            # its array, so it is taken from a copy
            return value.copy()[()]
        if value.dtype == object:
            out = np.empty(value.shape, object)
            for i, row in np.ndenumerate(value):
                out[i] = row.copy() if isinstance(row, np.ndarray) else row
            return out
        return value.copy()
    return value
