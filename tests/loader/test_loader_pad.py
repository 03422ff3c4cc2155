"""``multitables.Pad``: variable-length rows padded to one length, by itself on any batch and done
by a Loader's reads (values against h5py and against Pad run on the unpadded batch)."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
from helpers import write_vlen_parts

import multitables
from multitables._hdf5.vlenread import VlenRows, gather_rows
from multitables.errors import TransformError

N = 257
SEED = 3


def sequences(n: int, seed: int, dtype, most: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(-100, 100, rng.integers(0, most)).astype(dtype) for _ in range(n)]


def padded_by_hand(rows: list[np.ndarray], fill, width: int | None = None):
    width = max(len(r) for r in rows) if width is None else width
    out = np.full((len(rows), width), fill, rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : min(len(r), width)] = r[:width]
    return out, np.array([min(len(r), width) for r in rows], np.int64)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """int32 token rows (chunked, and gzip-compressed: read by h5py), float32 rows, a label
    that is the row number, and strings."""
    path = str(tmp_path_factory.mktemp("pad") / "text.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=np.arange(N), chunks=(50,))
        f.create_dataset("tokens", (N,), h5py.vlen_dtype(np.int32), chunks=(40,))[:] = (
            sequences(N, 1, np.int32))
        f.create_dataset("zipped", (N,), h5py.vlen_dtype(np.int32), chunks=(40,),
                         compression="gzip")[:] = sequences(N, 1, np.int32)
        f.create_dataset("f32", (N,), h5py.vlen_dtype(np.float32))[:] = (
            sequences(N, 2, np.float32))
        f.create_dataset("words", (N,), h5py.string_dtype())[:] = [f"w{i}" for i in range(N)]
    return path


def truth(path: str, column: str) -> list[np.ndarray]:
    with h5py.File(path, "r") as f:
        return list(f[column][:])


# ---- Pad by itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, fill", [(np.int32, -1), (np.float32, -1.5), (np.uint8, 7),
                                         (np.float64, np.nan), (np.int16, 0)])
def test_pads_a_list_of_arrays_like_numpy(dtype, fill):
    rows = sequences(33, 4, dtype)
    rows[5] = rows[5][:0]  # an empty row
    padded, lengths = multitables.Pad(fill)(rows)
    want, want_lengths = padded_by_hand(rows, fill)
    assert padded.dtype == want.dtype and padded.shape == want.shape
    np.testing.assert_array_equal(padded, want)  # NaN fills compare equal here
    np.testing.assert_array_equal(lengths, want_lengths)


def test_pads_rows_of_several_dimensions_along_the_first():
    rng = np.random.default_rng(0)
    rows = [rng.random((k, 3, 2)) for k in (4, 0, 7, 1)]
    padded, lengths = multitables.Pad(9.0)(rows)
    assert padded.shape == (4, 7, 3, 2) and lengths.tolist() == [4, 0, 7, 1]
    for row, want in zip(padded, rows, strict=True):
        assert np.array_equal(row[: len(want)], want) and (row[len(want) :] == 9.0).all()


def test_length_and_truncate():
    rows = [np.arange(k, dtype=np.int32) for k in (3, 9, 5)]
    padded, lengths = multitables.Pad(0, length=12)(rows)
    np.testing.assert_array_equal(padded, padded_by_hand(rows, 0, 12)[0])
    assert lengths.tolist() == [3, 9, 5]
    padded, lengths = multitables.Pad(-1, length=4, truncate=True)(rows)
    np.testing.assert_array_equal(padded, padded_by_hand(rows, -1, 4)[0])
    assert lengths.tolist() == [3, 4, 4]
    with pytest.raises(ValueError, match="row 1 of the batch is 9 long, past Pad's length 4"):
        multitables.Pad(length=4)(rows)


def test_other_columns_are_left_as_they_are():
    rows = [np.arange(k, dtype=np.int64) for k in (2, 1)]
    labels = np.array([4, 5])
    words = ["a", "bc"]
    batch = multitables.Pad(-1)({"tokens": rows, "label": labels, "words": words})
    assert batch["label"] is labels and batch["words"] is words
    np.testing.assert_array_equal(batch["tokens"][0], [[0, 1], [0, -1]])
    tokens, same_labels = multitables.Pad(-1)((rows, labels))
    assert same_labels is labels and tokens[1].tolist() == [2, 1]


@pytest.mark.parametrize("args, kw, error, match", [
    (("x",), {}, TypeError, "fill must be a number"),
    ((0,), {"length": -1}, ValueError, "length must be a whole number"),
    ((0,), {"length": 2.5}, ValueError, "length must be a whole number"),
    ((0,), {"truncate": True}, ValueError, "truncate=True needs a length"),
])
def test_bad_arguments_are_refused(args, kw, error, match):
    with pytest.raises(error, match=match):
        multitables.Pad(*args, **kw)


def test_rows_it_cannot_pad_raise_naming_them():
    with pytest.raises(ValueError, match="row 0 is int32 of shape .3,., row 1 float64"):
        multitables.Pad()([np.zeros(3, np.int32), np.zeros(2)])
    with pytest.raises(ValueError, match="fill -1 does not fit the rows' dtype uint8"):
        multitables.Pad(-1)([np.zeros(3, np.uint8)])
    with pytest.raises(ValueError, match="fill 0.5 does not fit the rows' dtype int32"):
        multitables.Pad(0.5)([np.zeros(3, np.int32)])


def test_gather_rows_checks_its_spans_and_rows():
    image = np.arange(16, dtype=np.uint8)
    out = np.zeros((2, 8), np.uint8)
    fill = np.array([0xAA, 0xBB], np.uint8)  # an element of two unequal bytes
    gather_rows(image, np.array([2, 10]), np.array([4, 6]), np.array([1, 0]), out, fill)
    assert out[1].tolist() == [2, 3, 4, 5, 0xAA, 0xBB, 0xAA, 0xBB]
    assert out[0].tolist() == [10, 11, 12, 13, 14, 15, 0xAA, 0xBB]
    with pytest.raises(ValueError, match="span 12:20 is outside the image of 16 bytes"):
        gather_rows(image, np.array([12]), np.array([8]), np.array([0]), out, fill)
    with pytest.raises(ValueError, match="row 2 is outside the 2 rows"):
        gather_rows(image, np.array([0]), np.array([2]), np.array([2]), out, fill)
    with pytest.raises(ValueError, match="rows of 8 bytes are not whole elements of 3"):
        gather_rows(image, np.array([0]), np.array([2]), np.array([0]), out, np.zeros(3, np.uint8))


def test_spans_of_negative_and_out_of_range_rows(text_file):
    expected = truth(text_file, "tokens")
    with h5py.File(text_file, "r") as f:
        heap = VlenRows.of(f["tokens"])
        assert heap is not None
        offsets, sizes = heap.spans(np.array([-1, 0, -N]))
        for at, size, row in zip(offsets, sizes, [N - 1, 0, 0], strict=True):
            got = heap.image[at : at + size].view(np.int32)
            assert np.array_equal(got, expected[row])
        with pytest.raises(IndexError, match=f"index {N} is out of bounds"):
            heap.spans(np.array([3, N]))
        with pytest.raises(IndexError, match=f"index {-N - 1} is out of bounds"):
            heap.take(np.array([-N - 1]))


# ---- Pad done by a Loader's reads ------------------------------------------------------------


def check_batches(loader, expected: list[np.ndarray], fill, width=None) -> list[int]:
    """Every batch's padded rows against h5py's; the rows seen."""
    seen = []
    for (padded, lengths), labels in loader:
        rows = [expected[r] for r in labels.tolist()]
        want, want_lengths = padded_by_hand(rows, fill, width)
        assert padded.dtype == want.dtype
        np.testing.assert_array_equal(padded, want)
        np.testing.assert_array_equal(lengths, want_lengths)
        seen += labels.tolist()
    return seen


@pytest.mark.parametrize("column", ["tokens", "zipped", "f32"])
@pytest.mark.parametrize("copy", [True, False])
def test_loader_pads_in_its_reads_equal_to_h5py(text_file, column, copy):
    """``zipped`` is read by h5py (a filtered heap dataset), the others from the heap."""
    fill = -2 if column != "f32" else 0.25
    with multitables.Loader(text_file, [column, "label"], 32, shuffle=True, n_procs=2,
                            copy=copy, batch_transform=multitables.Pad(fill)) as loader:
        seen = check_batches(loader, truth(text_file, column), fill)
    assert sorted(seen) == list(range(N))


def test_padded_by_the_reads_equals_pad_run_on_the_batch(text_file):
    """The reads' padding and Pad called on the unpadded batch (a batch transform that is not a
    Pad itself) give the same batches, strings and labels included."""
    columns = {"t": "tokens", "w": "words", "y": "label"}
    pad = multitables.Pad(-1, length=30, truncate=True)
    kw = dict(shuffle=True, seed=SEED, n_procs=2)
    with multitables.Loader(text_file, columns, 16, batch_transform=pad, **kw) as fused, \
            multitables.Loader(text_file, columns, 16, batch_transform=lambda b: pad(b),
                               **kw) as plain:
        for epoch in range(2):
            n = 0
            for a, b in zip(fused, plain, strict=True):
                assert a.keys() == b.keys() and a["w"] == b["w"]
                np.testing.assert_array_equal(a["y"], b["y"])
                for got, want in zip(a["t"], b["t"], strict=True):
                    np.testing.assert_array_equal(got, want)
                assert a["t"][0].shape == (16 if len(a["y"]) == 16 else N % 16, 30)
                n += len(a["y"])
            assert n == N, epoch


def test_loader_pad_of_many_files(text_file, tmp_path):
    expected = truth(text_file, "tokens")
    paths = write_vlen_parts(tmp_path, "tokens", expected)
    with multitables.Loader(paths, ["tokens", "label"], 16, shuffle=True, n_procs=2,
                            batch_transform=multitables.Pad(7)) as loader:
        seen = check_batches(loader, expected, 7)
    assert sorted(seen) == list(range(N))


def test_loader_pad_too_long_row_names_the_batch(text_file):
    with multitables.Loader(text_file, ["tokens", "label"], 16, n_procs=2,
                            batch_transform=multitables.Pad(length=3)) as loader:
        with pytest.raises(TransformError, match=r"batch_transform raised on the batch of "
                           r"rows \d+, \d+, .*text.h5: ValueError: row \d+ of the batch is \d+ "
                           "long, past Pad's length 3"):
            list(loader)
        assert len(list(multitables.Loader(text_file, "label", 64, n_procs=1))) == 5


def test_torch_gives_padded_tensors(text_file):
    torch = pytest.importorskip("torch")
    import multitables.torch

    expected = truth(text_file, "tokens")
    with multitables.torch.Loader(text_file, ["tokens", "label"], batch_size=32, n_procs=1,
                                  batch_transform=multitables.Pad(-1)) as dataset:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        rows = 0
        for (padded, lengths), labels in loader:
            assert isinstance(padded, torch.Tensor) and padded.dtype == torch.int32
            assert lengths.dtype == torch.int64
            want, _ = padded_by_hand([expected[r] for r in labels.tolist()], -1)
            assert np.array_equal(padded.numpy(), want)
            rows += len(labels)
        assert rows == N


def test_loader_pad_to_a_length_past_the_slots_grows_them(text_file):
    """Batches of 16 x 20,000 int32 (1.3 MB), padded by the workers (copy=False: the caller
    gets views of the slots), do not fit the first slots: made again in larger ones."""
    with multitables.Loader(text_file, ["tokens", "label"], 16, shuffle=True, n_procs=2,
                            copy=False,
                            batch_transform=multitables.Pad(-1, length=20_000)) as loader:
        seen = check_batches(loader, truth(text_file, "tokens"), -1, 20_000)
    assert sorted(seen) == list(range(N))


def test_rows_all_empty_pad_to_nothing_and_pad_pickles():
    padded, lengths = multitables.Pad(-1)([np.zeros(0, np.int32)] * 2)
    assert padded.shape == (2, 0) and padded.dtype == np.int32 and lengths.tolist() == [0, 0]
    pad = pickle.loads(pickle.dumps(multitables.Pad(5, length=3)))
    assert repr(pad) == "Pad(fill=5, length=3)"
    assert pad([np.arange(2)])[0].tolist() == [[0, 1, 5]]
