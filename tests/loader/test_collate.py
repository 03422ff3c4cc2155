"""How a batch of transformed samples is collated (``Collator``): stacked while the values
allow, a list of them as they came once one does not stack."""

from __future__ import annotations

import numpy as np
import pytest

from multitables._loader.transforms import collate


def alike(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


def test_arrays_and_numbers_of_one_shape_stack():
    samples = [(np.full((2, 3), i, np.int16), i, float(i), "x" * i) for i in range(5)]
    images, ints, floats, words = collate(samples, np.empty)
    assert images.shape == (5, 2, 3) and images.dtype == np.int16
    assert (images == np.arange(5)[:, None, None]).all()
    assert ints.dtype == np.int64 and ints.tolist() == list(range(5))
    assert floats.dtype == np.float64 and floats.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert words == ["", "x", "xx", "xxx", "xxxx"]


@pytest.mark.parametrize("late", [
    np.zeros((2, 4), np.int16),  # another shape
    np.zeros((2, 3), np.int32),  # another dtype
    7,  # not an array
])
def test_a_late_value_that_does_not_stack_makes_a_list_of_them_all(late):
    """The values stacked before it come back as arrays equal to those the transform gave."""
    values = [np.full((2, 3), i, np.int16) for i in range(4)] + [late]
    got = collate([{"v": v, "n": i} for i, v in enumerate(values)], np.empty)
    assert got["n"].tolist() == list(range(5))
    assert isinstance(got["v"], list) and len(got["v"]) == 5
    assert all(alike(a, b) for a, b in zip(got["v"], values, strict=True))


def test_numbers_then_another_kind_keep_the_numbers_as_they_came():
    values = [1, 2, np.int64(3)]  # a numpy int after Python ones: not stacked together
    assert collate(values, np.empty) == values
    assert all(type(a) is type(b) for a, b in zip(collate(values, np.empty), values, strict=True))


def test_zero_dimensional_arrays_come_back_as_such():
    values = [np.array(i, np.float32) for i in range(3)] + [np.zeros(2, np.float32)]
    got = collate(values, np.empty)
    assert all(alike(a, b) and a.shape == b.shape for a, b in zip(got, values, strict=True))


def test_samples_spelled_otherwise_are_refused():
    with pytest.raises(TypeError, match=r"sample 0 is a tuple of 2, sample 2 is a tuple of 3"):
        collate([(1, 2), (3, 4), (5, 6, 7)], np.empty)
    with pytest.raises(TypeError, match=r"sample 0 is a dict of \['a'\], sample 1 is a list"):
        collate([{"a": 1}, [1]], np.empty)
