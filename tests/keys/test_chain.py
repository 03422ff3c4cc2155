"""Chained keys (multitables._keys.chain): ``arr[Chain.of(shape).index(k1).index(k2).key()]``
must be ``arr[k1][k2]``, and a key numpy refuses must raise numpy's exception at that key."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from multitables._keys.chain import Chain

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_chain(arr: np.ndarray, keys) -> None:
    """The chain of ``keys`` on ``arr``'s shape against numpy, key by key."""
    chain = Chain.of(arr.shape)
    expected = arr
    for key in keys:
        try:
            expected = expected[key]
        except Exception as exc:  # the oracle: whatever numpy raises, the chain raises
            with pytest.raises(type(exc)) as info:
                chain.index(key)
            if isinstance(exc, IndexError):
                assert str(info.value) == str(exc)
            return
        chain = chain.index(key)
        assert chain.shape == np.shape(expected)
    got = arr[chain.key()]
    assert got.shape == np.shape(expected)
    np.testing.assert_array_equal(got, expected)


A = np.arange(200 * 10).reshape(200, 10)


@pytest.mark.parametrize(
    "keys",
    [
        (slice(None), [4, 1, 4]),
        (Ellipsis, slice(None, 5)),
        (slice(10, 100), (slice(None, None, -3), 2)),
        ([7, 2, 9, 2], (slice(1, None), Ellipsis, -1)),
        (slice(None, None, 2), 5, 3),
        (slice(None), (slice(None), np.arange(10) % 3 == 0)),  # 2.0.1's test_array[:][:, mask]
        (([1, 2], [3, 4]), [1, 0, 1]),
        ([[1, 2], [3, 4]], (slice(None), 1)),  # the box's one axis split in two
        ((slice(None), None), (Ellipsis, 0)),
        (slice(None, None, -1), slice(None, None, -1)),
        (slice(5, 0, -2), [-1, 0]),
        ((np.array([[3, 1], [2, 2]]),), (1, Ellipsis, [3, 0])),
        (slice(0, 0), Ellipsis),
        (slice(0, 0), [1]),  # IndexError at the second key: index 1 on an axis of 0
        (slice(10, 20), 10),  # out of range at the second key
        (slice(10, 20), ([1], [2], [3])),  # too many indices at the second key
        ((slice(None), 3), (None, slice(None), None)),
        ((slice(None), [2, 5]), ([0, 199], [1, 0])),
        ((0, slice(None)), [True] * 10),
        (True, (0, slice(2, 4)), False),
        # One index array beside kept or reversed axes (the path that skips materialising).
        (slice(None), (slice(None, None, -1), [2, 0, 2])),
        ([3, 1, 3], (slice(None, None, -1), [1, 1])),
        ((slice(None), [4, 2]), ([[5, 1], [0, 0]], slice(None, None, -1))),
        (([[3, 1], [2, 2]], slice(2, 7)), (slice(None), [1, 0], slice(None, None, -1))),
        ((slice(None), [7, 7, 3]), (slice(None, None, -1), np.array([[0], [2]]))),
    ],
)
def test_named_chains(keys):
    check_chain(A, keys)


B = np.arange(5 * 6 * 7).reshape(5, 6, 7)


@pytest.mark.parametrize(
    "keys",
    [
        # An integer and an index array apart in the composed key: numpy would move the array's
        # axis to the front, so the chain must not write it that way.
        ((0, slice(None), slice(None)), (slice(None), [5, 1, 2])),
        ((slice(None), slice(None), 3), ([4, 0], slice(None))),
        ((slice(None), 2), (slice(None, None, -1), [6, 1, 6])),
        ((1, slice(None), 3), [5, 0]),
        ((slice(None), 1, slice(None)), ([3, 3, 0], slice(2, 5))),
    ],
)
def test_named_chains_in_three_dimensions(keys):
    check_chain(B, keys)


def test_chain_of_a_field_with_dimensions():
    # ds[k]['v'] on a table is ds['v'][k] when k has no explicit ellipsis; with one, the
    # ellipsis covers the rows only.
    rows = np.arange(6 * 2 * 3).reshape(6, 2, 3)
    chain = Chain.of((6,)).index((Ellipsis, [4, 0])).extend((2, 3)).index((slice(None), 1))
    np.testing.assert_array_equal(rows[chain.key()], rows[[4, 0]][:, 1])
    chain = Chain.of((6,)).index((Ellipsis, None)).extend((2, 3))
    assert chain.shape == (6, 1, 2, 3)
    np.testing.assert_array_equal(rows[chain.key()], rows[:, None])


def test_chain_reads_what_it_returns():
    # ds[:][[4, 1, 4]] must not read the whole dataset: the key names the rows.
    key = Chain.of((10**9, 3)).index(slice(None)).index([4, 1, 4]).key()
    assert np.asarray(key[0]).size <= 3


@pytest.mark.parametrize("keys", [
    (Ellipsis, Ellipsis), ((), None), (None, 0), ((None, None), (slice(None), 0)),
    (None, slice(1, None)), ((None, None), (slice(0, 0), Ellipsis)), (True, [0]),
    (None, (slice(None), None), (0, slice(0, 0))),
])
def test_chains_on_a_scalar(keys):
    check_chain(np.array(7), keys)


@pytest.mark.parametrize("keys", [((None, None), (slice(0, 0), slice(0, 0))), (True, [0, 0])])
def test_scalar_chains_no_one_key_gives_are_refused(keys):
    chain = Chain.of(())
    for key in keys:
        chain = chain.index(key)
    with pytest.raises(NotImplementedError, match="scalar"):
        chain.key()


# --- hypothesis ------------------------------------------------------------------------------


@st.composite
def a_key(draw, shape):
    """A basic key, an index array (negative, repeated, unsorted), a mask, or a mix."""
    kind = draw(st.sampled_from(["basic", "array", "mask", "mixed", "grid"]))
    if kind == "basic" or not shape:
        return draw(hnp.basic_indices(shape, min_dims=0, allow_newaxis=True))
    axis = draw(st.integers(0, len(shape) - 1))
    n = shape[axis]
    if kind == "array":
        arr = draw(hnp.arrays(np.intp, draw(st.sampled_from([(0,), (1,), (3,), (2, 2), (4,)])),
                              elements=st.integers(-n - 1, n) if n else st.just(0)))
        before = draw(st.sampled_from([slice(None), slice(None, None, -1)]))
        return (before,) * axis + (arr,)
    if kind == "grid" and n >= 4:
        # Sorted, unique, consecutive: read as one slab, which the result splits in two axes.
        start = draw(st.integers(0, n - 4))
        return (slice(None),) * axis + (start + np.arange(4).reshape(2, 2),)
    if kind == "mask":
        return (slice(None),) * axis + (draw(hnp.arrays(np.bool_, (n,))),)
    # Two arrays (broadcast together) around a slice: numpy moves their block to the front.
    if len(shape) < 3:
        return draw(hnp.basic_indices(shape, allow_newaxis=True))
    a = draw(st.lists(st.integers(0, shape[0] - 1), min_size=1, max_size=3)) if shape[0] else []
    b = draw(st.lists(st.integers(0, shape[2] - 1), min_size=1, max_size=1)) if shape[2] else []
    return (np.array(a, np.intp), draw(st.sampled_from([slice(None), slice(None, None, -2)])),
            np.array(b, np.intp))


@st.composite
def chains(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6))
    arr = np.arange(int(np.prod(shape))).reshape(shape)
    keys = []
    current = arr
    for _ in range(draw(st.integers(2, 3))):
        key = draw(a_key(current.shape))
        keys.append(key)
        try:
            current = current[key]
        except Exception:
            break
    return arr, keys


@SETTINGS
@given(chains())
def test_chains_equal_numpy(case):
    arr, keys = case
    check_chain(arr, keys)
