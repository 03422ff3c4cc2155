"""Bad input gets a clear exception naming the value, raised in the caller before any worker
starts: missing files and paths, wrong arguments, keys out of range, a stage too small."""

from __future__ import annotations

import os
import re

import numpy as np
import psutil
import pytest
from helpers import BIG_COLS, BIG_ROWS

import multitables

pytestmark = pytest.mark.timeout(60)


def _bad_input_calls(path, tables_path):
    """(front door, what goes wrong, call, exception type, message pattern)."""
    missing = os.path.join(os.path.dirname(path), "missing.h5")
    directory = os.path.dirname(path)
    not_hdf5 = os.path.join(os.path.dirname(path), "not_hdf5.h5")
    S = multitables.Streamer  # noqa: N806
    R = multitables.Reader  # noqa: N806
    return [
        ("missing file", lambda: S(missing).get_queue("x"), FileNotFoundError, re.escape(missing)),
        ("missing file", lambda: R(missing).get_dataset("x"), FileNotFoundError,
         re.escape(missing)),
        ("unreadable", lambda: S(directory).get_queue("x"), OSError, re.escape(directory)),
        ("unreadable", lambda: R(directory).get_dataset("x"), OSError, re.escape(directory)),
        ("not hdf5", lambda: S(not_hdf5).get_queue("x"), OSError, re.escape(not_hdf5)),
        ("not hdf5", lambda: R(not_hdf5).get_dataset("x"), OSError, re.escape(not_hdf5)),
        ("no path", lambda: S(path).get_queue("/no/such"), KeyError, "/no/such"),
        ("no path", lambda: R(path).get_dataset("/no/such"), KeyError, "/no/such"),
        ("group", lambda: S(path).get_queue("group"), TypeError, "'group'.*not a dataset"),
        ("group", lambda: R(path).get_dataset("group"), TypeError, "'group'.*not a dataset"),
        ("empty", lambda: S(path).get_queue("empty"), ValueError, "/empty.*empty"),
        ("block_size 0", lambda: S(path).get_queue("x", block_size=0), ValueError,
         "block_size must be >= 1, got 0"),
        ("block_size -3", lambda: S(path).get_queue("x", block_size=-3), ValueError,
         "block_size.*-3"),
        ("block_size float", lambda: S(path).get_queue("x", block_size=2.5), TypeError,
         "block_size.*2.5"),
        ("block_size str", lambda: S(path).get_queue("x", block_size="10"), TypeError,
         "block_size.*'10'"),
        ("read_ahead 0", lambda: S(path).get_queue("x", read_ahead=0), ValueError,
         "read_ahead must be >= 1, got 0"),
        ("n_procs 0", lambda: S(path).get_queue("x", n_procs=0), ValueError,
         "n_procs must be >= 1, got 0"),
        ("n_procs 0", lambda: R(path, n_procs=0), ValueError, "n_procs must be >= 1, got 0"),
        ("n_procs -1", lambda: R(path, n_procs=-1), ValueError, "n_procs.*-1"),
        ("n_procs float", lambda: R(path, n_procs=1.5), TypeError, "n_procs.*1.5"),
        ("field", lambda: S(tables_path).get_queue("/table", field="nope"), ValueError,
         "no field 'nope'"),
        ("field", lambda: R(tables_path).get_dataset("/table")["nope"], ValueError,
         "no field 'nope'"),
        ("field", lambda: R(tables_path).get_dataset("/table").col("nope"), ValueError,
         "no field 'nope'"),
        ("h5py kwarg", lambda: S(path, bogus_option=1).get_queue("x"), TypeError,
         "bogus_option"),
        ("h5py kwarg", lambda: R(path, bogus_option=1).get_dataset("x"), TypeError,
         "bogus_option"),
    ]


def test_bad_input_raises_in_the_caller_naming_the_value(data_files):
    path, tables_path, _ = data_files
    with open(os.path.join(os.path.dirname(path), "not_hdf5.h5"), "w") as f:
        f.write("this is not an HDF5 file\n" * 100)
    children_before = len(psutil.Process().children(recursive=True))
    for what, call, exc_type, pattern in _bad_input_calls(path, tables_path):
        with pytest.raises(exc_type, match=pattern) as info:
            call()
        assert type(info.value) is not multitables.SubprocessException, what
        # Raised before any worker started.
        assert len(psutil.Process().children(recursive=True)) == children_before, what


@pytest.mark.parametrize(
    "key, pattern",
    [
        (np.s_[BIG_ROWS], f"index {BIG_ROWS} is out of bounds for axis 0 with size {BIG_ROWS}"),
        (np.s_[-BIG_ROWS - 1], f"index {-BIG_ROWS - 1} is out of bounds"),
        (np.s_[[1, BIG_ROWS + 5]], f"index {BIG_ROWS + 5} is out of bounds"),
        (np.s_[0, BIG_COLS], f"index {BIG_COLS} is out of bounds for axis 1"),
        (np.s_[1, 2, 3], "too many indices"),
        (np.s_[1.5], "only integers"),
        (np.s_[np.ones(3, bool)], "boolean index did not match"),
    ],
)
def test_bad_keys_raise_index_error(data_files, key, pattern):
    with multitables.Reader(data_files[0], n_procs=1) as reader:
        ds = reader.get_dataset("x")
        with pytest.raises(IndexError, match=pattern):
            ds[key]
        with pytest.raises(IndexError):
            np.zeros((BIG_ROWS, BIG_COLS), "f4")[key]  # numpy agrees


def test_stage_too_small_names_both_sizes(data_files):
    with multitables.Reader(data_files[0], n_procs=1) as reader:
        ds = reader.get_dataset("small")
        stage = ds.create_stage(2)
        with pytest.raises(multitables.SharedMemoryError,
                           match=r"stage holds 48 bytes but the result needs 120"):
            reader.request(ds[0:5], stage).get()
        np.testing.assert_array_equal(reader.request(ds[0:2], stage).get(),
                                      data_files[2]["small"][:2])
