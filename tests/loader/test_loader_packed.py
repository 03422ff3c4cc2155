"""Loader batches laid out as read (``_loader/packed.py``): variable-length arrays with no
transform, or with only a ``Pad`` done by the consumer; values against h5py and against the
batches made sample by sample (``payload.py``)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import write_vlen_parts

import multitables
from multitables._hdf5 import vlenread
from multitables._hdf5.source import describe
from multitables._hdf5.vlenread import VlenRows, gather_rows, pack
from multitables._loader.samples import ARRAY, BYTES, FIXED, packed_kinds
from multitables.errors import TransformError

N = 263
SEED = 11


def rows_of(n: int, seed: int, dtype, most: int = 50) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-90, 90, rng.integers(0, most)).astype(dtype) for _ in range(n)]


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    """Variable-length columns of each layout the lane reads (heap: chunked and contiguous;
    filtered: through h5py), fixed-size ones beside them (a gzip label that is the row number,
    a table with fields, 2-D rows), and rows never written (null references)."""
    path = str(tmp_path_factory.mktemp("packed") / "packed.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=np.arange(N), chunks=(32,), compression="gzip")
        f.create_dataset("table", data=np.array(
            [(i, -i / 2) for i in range(N)], [("a", "<i4"), ("b", "<f8")]))
        f.create_dataset("grid", data=np.arange(N * 6, dtype=np.int16).reshape(N, 2, 3))
        f.create_dataset("u8", (N,), h5py.vlen_dtype(np.uint8), chunks=(40,))[:] = rows_of(
            N, 1, np.uint8)
        f.create_dataset("i64", (N,), h5py.vlen_dtype(np.int64))[:] = rows_of(N, 2, np.int64)
        f.create_dataset("f32z", (N,), h5py.vlen_dtype(np.float32), chunks=(40,),
                         compression="gzip")[:] = rows_of(N, 3, np.float32)
        holes = f.create_dataset("holes", (N,), h5py.vlen_dtype(np.int32), chunks=(64,))
        for i in range(0, N, 3):  # the rest never written: empty rows
            holes[i] = np.arange(i % 9, dtype=np.int32)
    return path


def truth(path: str, column: str) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        return list(f[column][:])


VLEN = ["u8", "i64", "f32z", "holes"]
COLUMNS = {**{k: k for k in VLEN}, "label": "label", "a": "table/a", "grid": "grid"}


@pytest.mark.parametrize("copy", [True, False])
def test_packed_lists_equal_h5py(packed_file, copy):
    expected = {k: truth(packed_file, k) for k in VLEN}
    seen = []
    with multitables.Loader(packed_file, COLUMNS, 16, shuffle=True, seed=SEED, n_procs=2,
                            copy=copy) as loader:
        for _ in range(2):  # two epochs
            for batch in loader:
                rows = batch["label"].tolist()
                assert batch["a"].tolist() == rows
                assert np.array_equal(batch["grid"].reshape(len(rows), -1) // 6,
                                      np.repeat(np.array(rows)[:, None], 6, 1))
                for k in VLEN:
                    assert len(batch[k]) == len(rows)
                    for got, row in zip(batch[k], rows, strict=True):
                        want = expected[k][row]
                        assert got.dtype == want.dtype and np.array_equal(got, want), (k, row)
                seen += rows
    assert sorted(seen) == sorted(2 * list(range(N)))


def test_packed_copy_false_lends_views_until_the_next(packed_file):
    """Rows of a variable-length column given with copy=False are views of the slot: poisoned
    (all bits set) once the next batch is asked for, as fixed-size ones are."""
    expected = truth(packed_file, "i64")
    with multitables.Loader(packed_file, ["label", "i64"], 16, n_procs=2,
                            copy=False) as loader:
        it = iter(loader)
        labels, first = next(it)
        kept = [row.copy() for row in first]
        assert all(np.array_equal(a, expected[r]) for a, r in zip(kept, range(16), strict=True))
        next(it)
        assert all((row == -1).all() for row in first)
        assert (labels == -1).all()
        owned = multitables.Loader(packed_file, ["label", "i64"], 16, n_procs=1)
        with owned:
            it = iter(owned)
            _, first = next(it)
            next(it)
            assert all(np.array_equal(a, b) for a, b in zip(first, kept, strict=True))


@pytest.mark.parametrize("pad", [multitables.Pad(7), multitables.Pad(7, length=20,
                                                                       truncate=True),
                                 multitables.Pad(3, length=60)])
def test_padded_by_the_consumer_equals_pad_run_on_the_batch(packed_file, pad):
    """The lane (copy=True: the consumer pads) and Pad called on the list batch give the same
    arrays and lengths, over the heap and through h5py."""
    columns = {"u8": "u8", "f32z": "f32z", "holes": "holes", "y": "label"}
    kw = dict(shuffle=True, seed=SEED, n_procs=2)
    with multitables.Loader(packed_file, columns, 16, batch_transform=pad, **kw) as fused, \
            multitables.Loader(packed_file, columns, 16, **kw) as plain:
        n = 0
        for a, b in zip(fused, plain, strict=True):
            b = pad(b)
            np.testing.assert_array_equal(a["y"], b["y"])
            for k in ("u8", "f32z", "holes"):
                for got, want in zip(a[k], b[k], strict=True):
                    assert got.dtype == want.dtype
                    np.testing.assert_array_equal(got, want)
                assert a[k][0].flags.owndata or a[k][0].base is not None
            n += len(a["y"])
        assert n == N


@pytest.mark.parametrize("copy", [True, False])
def test_pad_errors_raise_in_the_training_process_either_way(packed_file, copy):
    """Where the consumer pads (copy=True) or the worker (copy=False), a row past Pad's length
    and a fill that does not fit are TransformErrors naming the batch."""
    with multitables.Loader(packed_file, ["i64", "label"], 16, n_procs=2, copy=copy,
                            batch_transform=multitables.Pad(length=2)) as loader:
        with pytest.raises(TransformError, match=r"batch_transform raised on the batch of rows "
                           r"\d+, \d+, .*packed.h5: ValueError: row \d+ of the batch is \d+ long, "
                           "past Pad's length 2"):
            list(loader)
    with multitables.Loader(packed_file, ["u8", "label"], 16, n_procs=2, copy=copy,
                            batch_transform=multitables.Pad(-1)) as loader:
        with pytest.raises(TransformError, match="Pad's fill -1 does not fit the rows' dtype "
                           "uint8"):
            list(loader)
        # and the Loader reads again
        assert len(list(multitables.Loader(packed_file, "label", 64, n_procs=1))) == 5


def test_rows_longer_than_guessed_grow_the_slots(tmp_path):
    """The slots are sized from rows spread over the file; longer rows between them make
    batches that do not fit: made again in larger slots, rows and order unchanged."""
    path = str(tmp_path / "long.h5")
    rows = [np.full(1 + (i % 5 == 2) * 150_000, i, np.int32) for i in range(200)]
    with h5py.File(path, "w") as f:
        f.create_dataset("x", (200,), h5py.vlen_dtype(np.int32))[:] = rows
    for pad in (None, multitables.Pad(0)):
        with multitables.Loader(path, "x", 20, shuffle=True, seed=1, n_procs=2,
                                batch_transform=pad) as loader:
            order = loader.order(0).rows(0, 200)
            for k, batch in enumerate(loader):
                want = [rows[r] for r in order[20 * k : 20 * k + 20]]
                if pad is None:
                    assert all(np.array_equal(a, b) for a, b in zip(batch, want, strict=True))
                else:
                    padded, lengths = batch
                    assert lengths.tolist() == [len(w) for w in want]
                    assert padded.shape == (20, max(map(len, want)))
                    assert all((p[: len(w)] == w).all() and not p[len(w) :].any()
                               for p, w in zip(padded, want, strict=True))


def test_packed_over_many_files(packed_file, tmp_path):
    """Rows of a batch lie in several files: each file's rows are laid out in turn, and placed
    in the batch's order."""
    expected = rows_of(N, 5, np.int32)
    paths = write_vlen_parts(tmp_path, "seq", expected, cuts=((0, 7), (7, 150)))
    for copy in (True, False):
        with multitables.Loader(paths, ["label", "seq"], 16, shuffle=True, n_procs=2,
                                copy=copy) as loader:
            got = [(r, v.copy()) for b in loader for r, v in zip(b[0].tolist(), b[1],
                                                                  strict=True)]
        assert sorted(r for r, _ in got) == list(range(N))
        assert all(np.array_equal(v, expected[r]) for r, v in got)


def test_torch_gives_lists_of_tensors_from_the_lane(packed_file):
    torch = pytest.importorskip("torch")
    import multitables.torch

    expected = truth(packed_file, "i64")
    with multitables.torch.Loader(packed_file, ["i64", "label"], batch_size=32,
                                  n_procs=1) as dataset:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        rows = 0
        for tokens, labels in loader:
            assert all(isinstance(t, torch.Tensor) and t.dtype == torch.int64 for t in tokens)
            for t, row in zip(tokens, labels.tolist(), strict=True):
                assert np.array_equal(t.numpy(), expected[row])
            rows += len(labels)
        assert rows == N


def test_which_columns_are_laid_out_as_read(packed_file):
    infos = [describe(packed_file, name, {}) for name in ("label", "i64")]
    assert packed_kinds(infos, [FIXED, ARRAY]) == [(np.dtype("<i8"), ()), (np.dtype("<i8"),
                                                                           None)]
    assert packed_kinds(infos, [FIXED, BYTES]) is None  # bytes and strings are pickled


# ---- the heap's rows, located once -----------------------------------------------------------


def test_rows_located_once_are_recalled_by_later_readers(packed_file, monkeypatch):
    """A second reader of the same file (a worker's next epoch) finds the rows located before,
    with no locate; a file past KNOWN_ROWS is located each time, with the same values."""
    expected = truth(packed_file, "i64")
    order = np.random.default_rng(0).permutation(N)
    with h5py.File(packed_file, "r") as f:
        assert all(np.array_equal(a, expected[r]) for a, r in
                   zip(VlenRows.of(f["i64"]).take(order[:10]), order[:10], strict=True))
    calls = []
    original = VlenRows._locate
    monkeypatch.setattr(VlenRows, "_locate", lambda self, rows: calls.append(len(rows)) or
                        original(self, rows))
    with h5py.File(packed_file, "r") as f:
        got = VlenRows.of(f["i64"]).take(order[:10])
    assert calls == [] and all(np.array_equal(a, expected[r])
                               for a, r in zip(got, order[:10], strict=True))
    with h5py.File(packed_file, "r") as f:
        got = VlenRows.of(f["i64"]).take(order)  # the rest: located with the first rows' block
    assert calls == []
    assert all(np.array_equal(a, expected[r]) for a, r in zip(got, order, strict=True))
    monkeypatch.setattr(vlenread, "_HEAPS", type(vlenread._HEAPS)())
    monkeypatch.setattr(vlenread, "KNOWN_ROWS", N - 1)
    calls.clear()
    for _ in range(2):
        with h5py.File(packed_file, "r") as f:
            got = VlenRows.of(f["i64"]).take(order)
        assert all(np.array_equal(a, expected[r]) for a, r in zip(got, order, strict=True))
    assert calls == [N, N]  # not kept: located by each reader


def test_pack_and_gather_rows_check_their_arguments():
    image = np.arange(16, dtype=np.uint8)
    starts, lengths = np.zeros(2, np.int64), np.zeros(2, np.int64)
    values = np.zeros(6, np.uint8)
    end, longest = pack(image, np.array([8, 2]), np.array([4, 2]), None, values, 0, starts,
                        lengths, 2)
    assert (end, longest) == (6, 2) and starts.tolist() == [0, 2] and lengths.tolist() == [2, 1]
    assert values.tolist() == [8, 9, 10, 11, 2, 3]
    values[:] = 0
    assert pack(image, np.array([8]), np.array([8]), np.array([1]), values, 0, starts, lengths,
                1) == (8, 8)
    assert not values.any() and starts[1] == 0 and lengths[1] == 8  # noted, not copied
    with pytest.raises(ValueError, match="outside the image of 16 bytes"):
        pack(image, np.array([12]), np.array([8]), None, values, 0, starts, lengths, 1)
    with pytest.raises(ValueError, match="a span of 6 bytes is not whole elements of 4"):
        pack(image, np.array([0]), np.array([6]), None, values, 0, starts, lengths, 4)
    with pytest.raises(ValueError, match="row 2 is outside the 2 places"):
        pack(image, np.array([0]), np.array([1]), np.array([2]), values, 0, starts, lengths, 1)
    out = np.zeros((2, 6), np.uint8)
    fill = np.array([0xEE, 0xFF], np.uint8)
    gather_rows(image, np.array([1, 5]), np.array([2, 1]), None, out, fill, 2)
    assert out.tolist() == [[2, 3, 4, 5, 0xEE, 0xFF], [10, 11, 0xEE, 0xFF, 0xEE, 0xFF]]
    with pytest.raises(ValueError, match="outside the image"):
        gather_rows(image, np.array([7]), np.array([2]), None, out, fill, 2)


# ---- found by review: each fails without its fix -----------------------------------------------


def test_files_of_other_variable_length_types_are_refused(tmp_path):
    """numpy's dtypes of variable-length rows all compare equal: a file of int64 rows beside
    one of int32 rows read the int64 bytes as int32."""
    paths = []
    for name, dtype in (("a", np.int32), ("b", np.int64), ("c", None)):
        paths.append(str(tmp_path / f"{name}.h5"))
        with h5py.File(paths[-1], "w") as f:
            if dtype is None:
                f.create_dataset("x", (4,), h5py.string_dtype())[:] = ["s"] * 4
            else:
                f.create_dataset("x", (4,), h5py.vlen_dtype(dtype))[:] = [
                    np.arange(i, dtype=dtype) for i in range(4)]
    with pytest.raises(ValueError, match=r"b\.h5: /x holds rows of variable-length arrays of "
                       "int64, the first file's hold variable-length arrays of int32"):
        multitables.Loader(paths[:2], "x", 2)
    with pytest.raises(ValueError, match=r"c\.h5: /x holds rows of variable-length utf-8 "
                       "strings, the first file's hold variable-length arrays of int32"):
        multitables.Loader([paths[0], paths[2]], "x", 2)


@pytest.mark.parametrize("copy", [True, False])
def test_a_field_of_a_table_comes_contiguous(packed_file, copy):
    """A column that is one field of a table, beside a variable-length one: an array of its own
    (a tensor cannot be made of a strided view), as the pickled batches gave it."""
    with multitables.Loader(packed_file, ["table/b", "i64", "label"], 16, n_procs=1,
                            copy=copy) as loader:
        for b, _, labels in loader:
            assert b.flags.c_contiguous and b.strides == (8,)
            assert b.tolist() == [-r / 2 for r in labels.tolist()]
    torch = pytest.importorskip("torch")
    import multitables.torch as mt_torch

    with mt_torch.Loader(packed_file, ["table/b", "i64"], batch_size=16, n_procs=1) as dataset:
        b, _ = next(iter(dataset))
        assert isinstance(b, torch.Tensor) and b.tolist() == [-r / 2 for r in range(16)]


@pytest.mark.parametrize("pad", [None, multitables.Pad(0)])
def test_a_column_of_an_hdf5_array_type(tmp_path, pad):
    """Rows of an HDF5 array type (numpy's subarray dtype, ``('<i4', (3,))``) beside a
    variable-length column come as h5py gives them, (n, 3) int32: laid out as read, or pickled
    (a Pad with copy=False: the workers pad, and stack the fixed-size rows in the slot)."""
    path = str(tmp_path / "sub.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("arr", (10,), np.dtype(("<i4", (3,))))[:] = np.arange(30).reshape(10, 3)
        f.create_dataset("v", (10,), h5py.vlen_dtype(np.int32))[:] = [
            np.arange(i, dtype=np.int32) for i in range(10)]
    for copy in (True, False):
        with multitables.Loader(path, ["arr", "v"], 4, n_procs=1, copy=copy,
                                batch_transform=pad) as loader:
            arrs = [a.copy() for a, _ in loader]
        got = np.concatenate(arrs)
        assert got.dtype == np.int32 and got.tolist() == np.arange(30).reshape(10, 3).tolist()


def test_spans_far_past_the_image_are_refused_not_copied():
    """offset + size overflowed int64 in the checks: a span far past the image passed them
    and the copy read past the image (a segfault), hence in a process of its own."""
    code = """if True:
        import numpy as np
        from multitables._hdf5 import vlenread
        image, far = np.zeros(64, np.uint8), np.array([2**63 - 8])
        calls = {
            "pack": lambda: vlenread.pack(image, far, np.array([16]), None, np.zeros(64, np.uint8),
                                          0, np.zeros(1, np.int64), np.zeros(1, np.int64), 1),
            "gather_rows": lambda: vlenread.gather_rows(image, far, np.array([16]), None,
                                                        np.zeros((1, 16), np.uint8),
                                                        np.zeros(1, np.uint8)),
        }
        for name, call in calls.items():
            try:
                call()
            except ValueError as exc:
                print(name, exc)
    """
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{name} span {2**63 - 8}:{2**63 + 8} is outside the image of 64 bytes"
        for name in ("pack", "gather_rows")]
