"""Index translation (multitables._keys._indexing) and its worker-side reads
(multitables._hdf5.hyperslab).

numpy is the oracle: for every key, ``translate`` must give numpy's result shape and a plan
that, applied to the data, gives ``arr[key]``; or raise the exception type numpy raises.
"""

from __future__ import annotations

import contextlib
import pickle

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from multitables._hdf5 import hyperslab
from multitables._hdf5._rows import runs
from multitables._hdf5.hyperslab import field_dtype, read_selection, result_layout
from multitables._keys import _indexing
from multitables._keys._indexing import PLAIN_TAG, Selection, translate
from multitables._reader.readspec import ARRAY, ReadSpec, from_wire, to_wire

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- oracle and reference applier -----------------------------------------------------------


def apply_plan(arr: np.ndarray, sel: Selection) -> np.ndarray:
    """Pure-numpy reading of ``sel`` from in-memory ``arr``: the box, then ``local_key``."""
    if 0 in sel.result_shape:
        return np.empty(sel.result_shape, arr.dtype)

    def values(e):
        return np.arange(e[0], e[0] + e[1] * e[2], e[1]) if isinstance(e, tuple) else e

    if sel.points is None:
        box = np.asarray(arr[np.ix_(*map(values, sel.dims))] if arr.ndim else arr[()])
    else:
        other = [d for d in range(arr.ndim) if d not in sel.point_dims]
        key = [None] * arr.ndim
        m = len(sel.points)
        for j, d in enumerate(sel.point_dims):
            key[d] = sel.points[:, j].reshape((m,) + (1,) * len(other))
        for j, d in enumerate(other):
            tail = (1,) * (len(other) - j - 1)
            key[d] = values(sel.dims[d]).reshape((1,) * (j + 1) + (-1,) + tail)
        box = np.moveaxis(arr[tuple(key)], 0, sel.point_axis)
    assert box.shape == sel.read_shape
    if sel.local_key is None:
        return box.reshape(sel.result_shape)
    return box[sel.local_key]


def numpy_outcome(arr, key):
    try:
        return arr[key], None
    except Exception as exc:  # the oracle: whatever numpy raises, we must raise too
        return None, exc


def check_translate(arr: np.ndarray, key) -> Selection | None:
    expected, exc = numpy_outcome(arr, key)
    if exc is not None:
        with pytest.raises(type(exc)) as info:
            translate(key, arr.shape)
        if isinstance(exc, IndexError):
            assert str(info.value) == str(exc)
        return None
    sel = translate(key, arr.shape)
    assert sel.result_shape == np.shape(expected)
    assert sel.shape == arr.shape
    for e in sel.dims:
        if isinstance(e, tuple):
            assert e[1] >= 1 and e[2] >= 0
        else:
            assert e.dtype == np.int64 and np.all(np.diff(e) > 0)
    got = apply_plan(arr, sel)
    assert got.shape == np.shape(expected)
    np.testing.assert_array_equal(got, expected)
    assert same_plan(pickle.loads(pickle.dumps(sel)), sel)  # as workers receive it
    assert same_plan(through_the_wire(sel), sel)
    return sel


def through_the_wire(sel: Selection) -> Selection:
    """``sel`` as a worker takes it from a request's bytes (readspec.to_wire)."""
    spec = ReadSpec(ARRAY, "/x", None, sel, sel.result_shape, np.dtype("f4"), at=8)
    back = from_wire(to_wire(spec))
    assert (back.kind, back.path, back.shape, back.at) == (ARRAY, "/x", sel.result_shape, 8)
    return back.selection


def test_batches_of_rows_travel_without_pickle():
    for key in (np.array([9, 2, 5]), [3, 4, 8], slice(2, 9), slice(None, None, -1)):
        sel = translate(key, (10, 3))
        spec = ReadSpec(ARRAY, "/x", "field", sel, sel.result_shape, np.dtype("f4"))
        data = to_wire(spec)
        assert data[:1] == PLAIN_TAG or isinstance(key, slice) and key.step == -1, key
        back = from_wire(data)
        assert same_plan(back.selection, sel) and back.field == "field"


@contextlib.contextmanager
def patched(module, **values):
    """Set module attributes (thresholds) for the duration of a block."""
    old = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(module, name, value)


def forced_points():
    """Make every multi-array superset plan a point plan."""
    return patched(_indexing, _SUPERSET_FACTOR=1, _SUPERSET_SLACK=0)


# --- named edge cases -----------------------------------------------------------------------

A3 = np.arange(5 * 6 * 7).reshape(5, 6, 7)
A1 = np.arange(10) * 1.5
A0 = np.array(3.25)

NAMED_3D = {
    "int": 2,
    "negative int": -1,
    "numpy int scalar": np.int64(3),
    "uint scalar": np.uint8(4),
    "0-d int array": np.array(-2),
    "ints": (1, -2, 3),
    "slice": slice(1, 4),
    "slice step": slice(None, None, 2),
    "slice negative step": slice(None, None, -1),
    "slice negative step 3": (slice(4, 0, -3), slice(None, None, -2)),
    "empty slice": slice(3, 1),
    "empty negative slice": slice(1, 3, -1),
    "clamped slice": slice(-100, 100),
    "ellipsis": Ellipsis,
    "ellipsis middle": (1, ..., 2),
    "ellipsis zero dims": (1, 2, ..., 3),
    "newaxis": (None, 1, None, slice(2, 4), None),
    "empty tuple": (),
    "list sorted": [0, 2, 3],
    "list unsorted repeats": [4, 0, 4, 1, -1],
    "empty list": [],
    "nested empty list": [[]],
    "2-d int array": np.array([[0, 1], [4, 2]]),
    "int array dim 1": (slice(None), [5, 0, 0, 2]),
    "int array uint8": np.array([3, 1], dtype=np.uint8),
    "progression array": [1, 3],
    "two arrays": ([0, 4, 2], [5, 1, 1]),
    "two arrays broadcast": (np.array([[0], [3]]), np.array([1, 2, 5])),
    "three arrays": ([0, 1, 4], [5, 5, 0], [6, 0, 3]),
    "arrays separated by slice": ([0, 4], slice(None), [1, 6]),
    "int and array separated": (0, slice(None), [1, 6]),
    "arrays separated by empty ellipsis": (slice(None), [1], ..., [2]),
    "arrays adjacent after slice": (slice(1, 3), [1, 0], [6, 6]),
    "array newaxis array": ([0, 1], None, [2, 3]),
    "array and reversed slice": ([3, 0], slice(None, None, -2)),
    "bool mask 1-d": np.array([True, False, True, True, False]),
    "bool list": [True, False, False, True, True],
    "bool mask dim 1": (slice(None), np.array([1, 0, 1, 0, 0, 1], bool)),
    "bool mask 2-d": (np.arange(30).reshape(5, 6) % 4 == 0),
    "bool mask 3-d": A3 % 3 == 0,
    "bool mask all false": np.zeros(5, bool),
    "bool mask and array": (np.array([1, 0, 1, 1, 0], bool), [1, 2, 3]),
    "bool mask trailing": (Ellipsis, np.array([1, 0, 0, 0, 0, 1, 1], bool)),
    "bool scalar true": True,
    "bool scalar false": False,
    "numpy bool scalar": np.True_,
    "bool scalar with slice": (slice(None), True, 2),
    "bool scalar moved": (0, slice(None), True),
    "false with array": (False, [0, 1]),
    "0-d bool array": np.array(True),
    "empty array and slice": ([], slice(None, None, -1)),
    "bool mask zero-length axis": np.zeros((5, 0), bool),
    "out of range in empty broadcast": ([12], []),
    # errors
    "int out of range": 5,
    "negative int out of range": -6,
    "array out of range": [0, 5],
    "array negative out of range": (slice(None), [-7]),
    "too many indices": (0, 0, 0, 0),
    "too many with mask": (np.ones((5, 6), bool), 0, 0),
    "two ellipses": (..., ...),
    "float": 1.0,
    "numpy float": np.float64(1.0),
    "string": "a",
    "float list": [1.0, 2.0],
    "float array": np.array([1.0]),
    "object array": np.array([0], dtype=object),
    "list of slices": [0, slice(None)],
    "ragged list": [[0, 1], [2]],
    "huge int": 10**30,
    "float slice": slice(0.5, 2),
    "zero step": slice(None, None, 0),
    "broadcast mismatch": ([0, 1], [0, 1, 2]),
    "bool shape mismatch": np.ones(4, bool),
    "bool shape mismatch axis 1": (slice(None), np.ones(7, bool)),
}


@pytest.mark.parametrize("key", NAMED_3D.values(), ids=NAMED_3D.keys())
def test_named_keys(key):
    check_translate(A3, key)
    with forced_points():
        check_translate(A3, key)


@pytest.mark.parametrize(
    "key", [(), ..., None, True, False, (True, True), (..., None), 0, [], slice(None), np.array(0)]
)
def test_zero_dim(key):
    check_translate(A0, key)


@pytest.mark.parametrize("key", [slice(None), slice(0, 0), [], [0, 0], np.zeros(0, bool), 0])
def test_zero_length_dataset(key):
    check_translate(np.zeros((0, 3)), key)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (12, "index 12 is out of bounds for axis 0 with size 10"),
        ([3, -11], "index -11 is out of bounds for axis 0 with size 10"),
        ((0, 0), "too many indices for array: array is 1-dimensional, but 2 were indexed"),
        (
            np.ones(3, bool),
            "boolean index did not match indexed array along axis 0; size of axis "
            "is 10 but size of corresponding boolean axis is 3",
        ),
        (2.0, r"only integers, slices \(`:`\), ellipsis \(`...`\)"),
        (np.array([1.5]), r"arrays used as indices must be of integer \(or boolean\) type"),
    ],
)
def test_error_messages_1d(key, message):
    with pytest.raises(IndexError, match=message):
        translate(key, A1.shape)


def test_broadcast_error_message():
    with pytest.raises(
        IndexError,
        match=r"shape mismatch: indexing arrays could not be "
        r"broadcast together with shapes \(2,\) \(3,\) ",
    ):
        translate(([0, 1], [0, 1, 2]), (4, 4))
    with pytest.raises(IndexError, match=r"with shapes \(1,2\) \(4,\) "):
        translate(([[0, 1]], slice(None), [0, 1, 2, 3]), (4, 4, 4))


def test_plans():
    """The plans the reader relies on for speed: no gather where none is needed."""
    sel = translate(np.s_[2:8, ::3], (10, 9))
    assert sel.dims == ((2, 1, 6), (0, 3, 3)) and sel.local_key is None
    sel = translate([1, 2, 3], (10, 4))
    assert sel.dims == ((1, 1, 3), (0, 1, 4)) and sel.local_key is None
    sel = translate((5, [1, 2, 3]), (10, 4))
    assert sel.local_key is None and sel.result_shape == (3,)
    sel = translate(np.s_[::-1], (10,))
    assert sel.dims == ((0, 1, 10),) and sel.local_key == (slice(None, None, -1),)
    assert translate([7, 1, 7, 4], (10, 4)).dims[0] == (1, 3, 3)
    sel = translate([7, 1, 7, 5], (10, 4))
    np.testing.assert_array_equal(sel.dims[0], [1, 5, 7])
    np.testing.assert_array_equal(sel.local_key[0], [2, 0, 2, 1])
    assert sel.read_shape == (3, 4) and sel.result_shape == (4, 4)
    assert translate((0, slice(None), [1, 2]), (3, 4, 5)).local_key is not None
    assert translate(np.s_[3:3], (10,)).local_key is None


def test_point_plan_when_superset_is_large():
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 1000, 50), rng.integers(0, 1000, 50)
    arr = np.arange(1000 * 1000, dtype=np.int32).reshape(1000, 1000)
    sel = check_translate(arr, (rows, cols))
    assert sel.points is not None and sel.read_size <= 50
    sel = check_translate(arr, (rows[:3], cols[:3]))  # small: the superset is read
    assert sel.points is None


def test_selection_pickles():
    for key in [np.s_[::-2, 1], ([2, 1, 2], [0, 0, 3]), np.array([1, 0, 1], bool)]:
        sel = translate(key, (3, 4))
        back = pickle.loads(pickle.dumps(sel))
        assert type(back) is Selection
        assert (back.shape, back.read_shape, back.result_shape) == (
            sel.shape,
            sel.read_shape,
            sel.result_shape,
        )
        np.testing.assert_array_equal(
            apply_plan(np.arange(12).reshape(3, 4), back), np.arange(12).reshape(3, 4)[key]
        )
    with forced_points():
        sel = translate(([0, 2], [1, 3]), (3, 4))
    back = pickle.loads(pickle.dumps(sel))
    np.testing.assert_array_equal(back.points, sel.points)
    assert back.point_dims == sel.point_dims and back.point_axis == sel.point_axis
    assert sel.nbytes(4) == 8 and sel.size == 2


def test_runs():
    starts, lengths = runs(np.array([1, 2, 3, 7, 9, 10], np.int64))
    assert starts.tolist() == [1, 7, 9] and lengths.tolist() == [3, 1, 2]
    assert [a.tolist() for a in runs(np.zeros(0, np.int64))] == [[], []]


# --- hypothesis: translate against numpy ----------------------------------------------------

shapes = hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6)


@st.composite
def mixed_keys(draw, shape):
    """Keys of every kind numpy accepts (and some it refuses), mixed freely."""
    n = len(shape)
    items = []
    for i in range(draw(st.integers(0, n + 1))):
        side = shape[min(i, n - 1)] if n else 1
        kind = draw(
            st.sampled_from(
                [
                    "int",
                    "slice",
                    "none",
                    "ellipsis",
                    "bool",
                    "list",
                    "array",
                    "mask",
                    "int0d",
                    "npint",
                ]
            )
        )
        if kind == "int":
            items.append(draw(st.integers(-side - 1, side)))
        elif kind == "slice":
            bound = st.none() | st.integers(-side - 2, side + 2)
            step = st.none() | st.sampled_from([-3, -2, -1, 1, 2, 3])
            items.append(slice(draw(bound), draw(bound), draw(step)))
        elif kind == "none":
            items.append(None)
        elif kind == "ellipsis":
            items.append(Ellipsis)
        elif kind == "bool":
            items.append(draw(st.sampled_from([True, False, np.True_, np.False_])))
        elif kind == "list":
            items.append(draw(st.lists(st.integers(-side, max(side - 1, 0)), max_size=5)))
        elif kind == "array":
            items.append(
                draw(
                    hnp.arrays(
                        np.intp,
                        hnp.array_shapes(min_dims=1, max_dims=2, max_side=3),
                        elements=st.integers(-side, max(side - 1, 0)),
                    )
                )
            )
        elif kind == "mask":
            k = draw(st.integers(1, max(1, min(2, n - i))))
            mshape = tuple(shape[min(i + j, n - 1)] for j in range(k)) if n else (1,)
            items.append(draw(hnp.arrays(np.bool_, mshape)))
        elif kind == "int0d":
            items.append(np.array(draw(st.integers(-side, side))))
        else:
            items.append(np.int16(draw(st.integers(-side, side))))
    if len(items) == 1 and draw(st.booleans()):
        return items[0]
    return tuple(items)


def basic_or_array_keys(shape):
    ints = hnp.integer_array_indices(
        shape, result_shape=hnp.array_shapes(min_dims=1, max_dims=2, max_side=4)
    )
    masks = st.integers(1, len(shape)).flatmap(
        lambda k: st.tuples(hnp.arrays(np.bool_, shape[:k]), hnp.basic_indices(shape[k:]))
    )
    masks = masks.map(lambda t: (t[0],) + (t[1] if isinstance(t[1], tuple) else (t[1],)))
    basic = hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True)
    if 0 in shape:  # integer_array_indices needs sides > 0
        return st.one_of(basic, masks, mixed_keys(shape))
    return st.one_of(basic, ints, masks, mixed_keys(shape))


@SETTINGS
@given(st.data())
def test_translate_matches_numpy(data):
    shape = data.draw(shapes, label="shape")
    key = data.draw(basic_or_array_keys(shape), label="key")
    arr = np.arange(int(np.prod(shape))).reshape(shape)
    check_translate(arr, key)


def same_plan(a: Selection, b: Selection) -> bool:
    def entry(e):
        if isinstance(e, np.ndarray):
            return ("array", e.dtype, e.shape, e.tolist())
        return e

    def key(k):
        return None if k is None else [entry(x) for x in k]

    return (a.shape, key(a.dims), a.read_shape, a.result_shape, entry(a.points), a.point_dims,
            a.point_axis) == (b.shape, key(b.dims), b.read_shape, b.result_shape,
                              entry(b.points), b.point_dims, b.point_axis) and key(
        a.local_key) == key(b.local_key)


@SETTINGS
@given(st.data())
def test_row_array_keys_plan_as_the_general_code(data):
    """One 1-D index array (a random batch) has its own quick translation: it must give numpy's
    result, and the very plan of the general code, for sorted, shuffled, repeated, negative,
    progression and out-of-range rows, as arrays of any integer type, lists, 1-tuples, and
    ``(rows, ...)`` (2.0.1's spelling of a batch: the plan of the rows alone)."""
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9))
    shape = shape[:1] + tuple(data.draw(st.sampled_from([s, 0])) for s in shape[1:])  # empty rows
    n = shape[0]
    rows = data.draw(st.lists(st.integers(-n - 2, n + 1), min_size=1, max_size=12))
    if data.draw(st.booleans(), label="a progression"):
        start, step = data.draw(st.integers(0, n - 1)), data.draw(st.integers(1, 3))
        rows = list(range(start, n, step))
    dtype = data.draw(st.sampled_from([np.int64, np.int32, np.int8, np.uint16, np.intp]))
    if np.issubdtype(dtype, np.unsignedinteger) or dtype == np.int8:
        rows = [r for r in rows if 0 <= r <= 127] or [0]
    form = data.draw(st.sampled_from(["array", "list", "tuple", "array, ...", "list, ..."]))
    array = np.array(rows, dtype)
    key = {"array": array, "list": rows, "tuple": (array,), "array, ...": (array, Ellipsis),
           "list, ...": (rows, Ellipsis)}[form]
    arr = np.arange(int(np.prod(shape))).reshape(shape)
    sel = check_translate(arr, key)
    if sel is not None:
        alone = key[0] if form.endswith("...") else key
        assert same_plan(sel, _indexing._translate(alone, shape))


@SETTINGS
@given(st.data())
def test_one_slice_plans_as_the_general_code(data):
    """One slice (a block of rows) has its own quick translation too."""
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9))
    bound = st.none() | st.integers(-12, 12)
    key = slice(data.draw(bound), data.draw(bound), data.draw(st.none() | st.integers(-4, 4)))
    key = key if data.draw(st.booleans()) else (key,)
    arr = np.arange(int(np.prod(shape))).reshape(shape)
    sel = check_translate(arr, key)
    if sel is not None:
        assert same_plan(sel, _indexing._translate(key, shape))


@pytest.mark.parametrize("key", [
    [True, False, True, False, True], [np.int64(3), 1], [3, np.int32(1)], [2**70], [-2**70],
    [2**63 - 1], [1.0, 2], [[1, 2], [0, 4]], [-1, -5], [], [4, 4, 0], ([True] * 5, Ellipsis),
    ([1, 2], 0), ([1, 2], Ellipsis, 1), (Ellipsis, Ellipsis), (Ellipsis, [1, 0]), ([5], Ellipsis),
    ([0, 2], Ellipsis), (np.array(3), Ellipsis), (2, Ellipsis), (slice(1, 4), Ellipsis),
])
def test_list_keys_match_numpy(key):
    """Lists of Python ints are converted in one C loop; anything else in a list (bools, numpy
    scalars, floats, nested lists, ints past int64) goes numpy's way, and ``(rows, ...)`` must
    select what ``rows`` does: numpy's result or numpy's exception, every time."""
    check_translate(np.arange(20).reshape(5, 4), key)


def test_row_array_translation_copies_the_key():
    rows = np.array([5, 1, 4])
    sel = translate(rows, (10, 2))
    rows[:] = 0
    assert sel.dims[0].tolist() == [1, 4, 5] and sel.local_key[0].tolist() == [2, 0, 1]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_translate_point_plans_match_numpy(data):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=6))
    key = data.draw(st.one_of(hnp.integer_array_indices(shape), mixed_keys(shape)))
    arr = np.arange(int(np.prod(shape))).reshape(shape)
    with forced_points():
        check_translate(arr, key)


# --- reading with h5py ----------------------------------------------------------------------

COMPOUND = np.dtype([("a", "<f4"), ("img", "u1", (2, 3)), ("b", ">i8")])


@pytest.fixture(scope="module")
def h5file(tmp_path_factory):
    rng = np.random.default_rng(42)
    path = tmp_path_factory.mktemp("indexing") / "data.h5"
    with h5py.File(path, "w") as f:
        f["contig"] = rng.normal(size=(7, 6, 5))
        f.create_dataset("chunked", data=rng.normal(size=(9, 8, 4)).astype("f4"), chunks=(2, 3, 4))
        f.create_dataset(
            "gzip4d",
            data=rng.integers(0, 100, (4, 5, 3, 6)).astype("i2"),
            chunks=(2, 2, 2, 2),
            compression="gzip",
        )
        f.create_dataset(
            "bigendian", data=rng.integers(-50, 50, (11, 3)).astype(">i4"), chunks=(4, 3)
        )
        f["rows"] = rng.normal(size=(40,))
        comp = np.zeros((6, 5), COMPOUND)
        comp["a"] = rng.normal(size=(6, 5))
        comp["img"] = rng.integers(0, 255, (6, 5, 2, 3))
        comp["b"] = rng.integers(-9, 9, (6, 5))
        f.create_dataset("compound", data=comp, chunks=(3, 2))
        f["scalar"] = 2.5
    with h5py.File(path, "r") as f:
        yield f


def read(ds, key, field=None):
    sel = translate(key, ds.shape)
    shape, dtype = result_layout(sel, ds.dtype, field)
    out = np.full(shape, 99, dtype)
    read_selection(ds, sel, out, field)
    return out


def check_read(ds, key, field=None):
    full = ds[()]
    expected, exc = numpy_outcome(full, key)
    if exc is not None:
        with pytest.raises(type(exc)):
            translate(key, ds.shape)
        return
    if isinstance(expected, np.generic):  # numpy's scalars lose the byte order
        expected = np.asarray(expected, dtype=full.dtype)
    if field is not None:
        expected = expected[field]
    got = read(ds, key, field)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


DATASETS = ["contig", "chunked", "gzip4d", "bigendian", "rows", "compound"]


@pytest.mark.parametrize("name", ["contig", "chunked"])
@pytest.mark.parametrize("key", NAMED_3D.values(), ids=NAMED_3D.keys())
def test_read_named_keys(h5file, name, key):
    ds = h5file[name]
    check_read(ds, key)
    with forced_points(), patched(hyperslab, _MAX_SLABS=2, _MAX_POINTS=3, _Selector=None):
        check_read(ds, key)


@pytest.mark.parametrize("key", [(), ..., None, True, False])
def test_read_scalar_dataset(h5file, key):
    check_read(h5file["scalar"], key)


@pytest.mark.parametrize("field", ["a", "img", "b"])
@pytest.mark.parametrize(
    "key",
    [
        (),
        2,
        ([4, 0, 4], slice(None, None, -2)),
        (slice(None), [3, 1]),
        np.arange(30).reshape(6, 5) % 3 == 0,
        (slice(2, 2), 0),
    ],
)
def test_read_field(h5file, field, key):
    check_read(h5file["compound"], key, field)


def test_field_errors(h5file):
    assert field_dtype(COMPOUND, "img") == np.dtype(("u1", (2, 3)))
    assert field_dtype(np.dtype("f4"), None) == np.dtype("f4")
    with pytest.raises(
        ValueError,
        match=r"no field 'c' in dataset; fields are \('a', 'img', "
        r"'b'\)",
    ):
        field_dtype(COMPOUND, "c")
    with pytest.raises(ValueError, match="no field 'x'"):
        read(h5file["contig"], 0, "x")


def test_read_rejects_wrong_out(h5file):
    ds = h5file["contig"]
    sel = translate(0, ds.shape)
    with pytest.raises(ValueError, match="needs shape"):
        read_selection(ds, sel, np.empty((6, 4)), None)
    with pytest.raises(ValueError, match="needs shape"):
        read_selection(ds, sel, np.empty((6, 5), "f4"), None)
    with pytest.raises(ValueError, match="C-contiguous"):
        read_selection(ds, sel, np.empty((5, 6)).T, None)


def test_read_many_runs(h5file):
    """More runs than one union takes: batched reads along the split dimension."""
    ds = h5file["rows"]
    key = np.r_[0:40:2, 1:40:7, 3]
    for max_slabs in (1, 3, 256):
        with patched(hyperslab, _MAX_SLABS=max_slabs, _Selector=None):
            check_read(ds, key)
            check_read(h5file["chunked"], (slice(None), [7, 0, 2, 5, 3], [0, 3, 2]))
            check_read(h5file["chunked"], ([8, 0, 2, 5, 3], slice(None), [3, 2, 1, 2, 0]))


@SETTINGS
@given(st.data())
def test_read_matches_numpy(h5file, data):
    ds = h5file[data.draw(st.sampled_from(DATASETS), label="dataset")]
    key = data.draw(basic_or_array_keys(ds.shape), label="key")
    field = (
        data.draw(st.sampled_from(["a", "img", None]), label="field") if (ds.dtype.names) else None
    )
    check_read(ds, key, field)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_read_point_plans_match_numpy(h5file, data):
    ds = h5file[data.draw(st.sampled_from(DATASETS[:4] + ["compound"]), label="dataset")]
    key = data.draw(
        st.one_of(hnp.integer_array_indices(ds.shape), mixed_keys(ds.shape)), label="key"
    )
    field = "img" if ds.dtype.names else None
    limits = dict(
        _MAX_SLABS=data.draw(st.sampled_from([1, 2, 256])),
        _MAX_POINTS=data.draw(st.sampled_from([1, 5, 1 << 20])),
        _MIN_SLAB_ELEMENTS=data.draw(st.sampled_from([1, 8, 10**9])),
    )
    with forced_points(), patched(hyperslab, **limits):
        check_read(ds, key, field)


def test_string_and_enum_datasets_read_after_same_layout_ones(tmp_path):
    """dtypes equal to numpy but not to HDF5 (h5py's string encodings, enums) keep their type."""
    path = tmp_path / "s.h5"
    hdf5_path = {"chunks": (2,), "fletcher32": True}  # checksums: only HDF5 reads these
    with h5py.File(path, "w") as f:
        f.create_dataset("ascii", data=np.array([b"abc", b"de"], "S6"), **hdf5_path)
        utf8 = h5py.string_dtype("utf-8", 6)
        f.create_dataset("utf8", data=np.array([b"xyz", b"q"], utf8), dtype=utf8, **hdf5_path)
        f.create_dataset("plain", data=np.array([1, 0], "i1"), **hdf5_path)
        f.create_dataset("enum", data=np.array([1, 0], "i1"),
                         dtype=h5py.enum_dtype({"a": 0, "b": 1}, basetype="i1"), **hdf5_path)
    with h5py.File(path, "r") as f:
        for name in ("ascii", "utf8", "plain", "enum"):
            ds = f[name]
            sel = _indexing.translate((slice(None),), ds.shape)
            out = np.empty(sel.result_shape, ds.dtype)
            hyperslab.read_selection(ds, sel, out)
            np.testing.assert_array_equal(out, ds[()])


@pytest.mark.parametrize("rows", [
    [2**58 + 5, 3, 2**58 + 5, 0],  # past the bits a packed value may take
    [2**56 - 1, 2**56, 7, 2**56 - 1],  # either side of them
    [2**60 - 1, 0, 2**60 - 1],
])
def test_rows_too_large_to_pack_sort_as_well(rows):
    """A value that leaves no room for its position in one word is sorted the other way; the
    plan is numpy's unique values and where each row went, either way."""
    sel = translate(np.array(rows), (2**60,))
    unique, inverse = np.unique(rows, return_inverse=True)
    entry = sel.dims[0]  # two values make a progression: (start, step, count)
    if isinstance(entry, tuple):
        entry = [entry[0] + entry[1] * k for k in range(entry[2])]
    np.testing.assert_array_equal(entry, unique)
    np.testing.assert_array_equal(sel.local_key[0], inverse)
    assert sel.result_shape == (len(rows),)


def test_index_arrays_either_side_of_the_small_sort():
    # Up to _SMALL_SORT rows sort as values and positions packed in one word, longer ones by
    # numpy's argsort.
    arr = np.arange(300 * 2).reshape(300, 2)
    rng = np.random.default_rng(5)
    for n in (127, 128, 129, 500):
        check_translate(arr, rng.integers(-300, 300, n))  # repeats and negative rows
        check_translate(arr, (rng.permutation(300)[:min(n, 300)], 1))


def test_a_plain_request_is_written_in_place_and_read_back_whole():
    """``put_plain`` writes a request's length and words at an offset of a stage's header, as
    ``plain_request`` spells them; ``read_plain`` gives back what went in, and refuses bytes cut
    short or of another kind."""
    from multitables._keys._indexing import read_plain

    rng = np.random.default_rng(3)
    for key in (rng.permutation(40)[:9], slice(3, 30, 4), (np.array([7, 3]), ...), [5, 5, 1]):
        sel = translate(key, (40, 3))
        data = sel.plain_request(b"head!", (9, 3), 24)
        assert data is not None
        header = np.zeros(24 + len(data), np.uint8)
        assert not sel.put_plain(header, 16, 8 + len(data) - 1, b"head!", (9, 3), 24)
        assert not header.any()  # too little room: nothing written
        assert sel.put_plain(header, 16, 8 + len(data), b"head!", (9, 3), 24)
        assert int(header[16:24].view(np.int64)[0]) == len(data)
        assert header[24:].tobytes() == data
        head, at, shape, back = read_plain(data)
        assert (head, at, shape) == (b"head!", 24, (9, 3)) and same_plan(back, sel)
        for cut in (0, 7, 8, len(data) - 8):
            with pytest.raises(ValueError, match="plain request"):
                read_plain(data[:cut])
    diagonal = np.arange(200)
    points = translate((diagonal, diagonal), (200, 200))  # read as points: pickled instead
    assert points.points is not None and points.plain_request(b"", (200,), 0) is None
