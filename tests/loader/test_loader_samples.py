"""Loader: variable-length columns, and transforms run in the workers (values against h5py)."""

from __future__ import annotations

import os
import pickle
import signal
import textwrap

import h5py
import numpy as np
import pytest
from helpers import write_vlen_parts

import multitables
from multitables.errors import TransformError

N = 301  # prime: no batch size divides it
SEED = 5


def _rows(n: int, seed: int, most: int, dtype) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 200, rng.integers(0, most)).astype(dtype) for _ in range(n)]


@pytest.fixture(scope="module")
def vlen_file(tmp_path_factory):
    """One column of each variable-length kind beside fixed-size ones; ``label`` is the row
    number, so a batch says which rows it holds."""
    path = str(tmp_path_factory.mktemp("samples") / "vlen.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("label", data=np.arange(N), chunks=(32,), compression="gzip")
        f.create_dataset("img", data=np.arange(N * 12, dtype="u1").reshape(N, 3, 4))
        u8 = f.create_dataset("u8", (N,), h5py.vlen_dtype(np.uint8), chunks=(50,))
        u8[:] = _rows(N, 1, 40, np.uint8)
        i32 = f.create_dataset("i32", (N,), h5py.vlen_dtype(np.int32))
        i32[:] = _rows(N, 2, 30, np.int32)
        f64 = f.create_dataset("f64be", (N,), h5py.vlen_dtype(np.dtype(">f8")))
        f64[:] = [r.astype(">f8") / 3 for r in _rows(N, 3, 9, np.float64)]
        text = f.create_dataset("text", (N,), h5py.string_dtype())
        text[:] = [f"ligne {i} é{'∑' * (i % 4)}" for i in range(N)]
        ascii_ = f.create_dataset("ascii", (N,), h5py.string_dtype("ascii"))
        ascii_[:] = [b"x" * (i % 7) + str(i).encode() for i in range(N)]
        opaque = f.create_dataset("opaque", (N,), h5py.vlen_dtype(np.dtype("V1")))
        for i, r in enumerate(_rows(N, 4, 20, np.uint8)):
            opaque[i] = r.view("V1")
        f.create_dataset("grid", (N, 2), h5py.vlen_dtype(np.int32))
        f.create_dataset("rec", (N,), np.dtype([("a", "i4"), ("s", h5py.string_dtype())]))
    return path


def truth(path: str, column: str) -> list:
    """Each row of ``column`` as the Loader gives it, read with h5py."""
    with h5py.File(path, "r") as f:
        ds = f[column]
        if h5py.check_string_dtype(ds.dtype) is not None:
            values = list(ds[:])
            return [v.decode() for v in values] if column == "text" else values
        if ds.dtype.metadata and h5py.check_vlen_dtype(ds.dtype).kind == "V":
            return [r.tobytes() for r in ds[:]]
        return list(ds[:])


def make(path, columns, batch_size=16, **kw) -> multitables.Loader:
    kw.setdefault("n_procs", 2)
    return multitables.Loader(path, columns, batch_size, **kw)


def same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("copy", [True, False])
def test_each_kind_equals_h5py_every_row_once(vlen_file, copy):
    kinds = ["u8", "i32", "f64be", "text", "ascii", "opaque"]
    expected = {k: truth(vlen_file, k) for k in kinds}
    columns = {k: k for k in kinds} | {"label": "label", "img": "img"}
    seen = []
    with make(vlen_file, columns, shuffle=True, seed=SEED, copy=copy) as loader:
        for batch in loader:
            assert isinstance(batch["label"], np.ndarray) and batch["img"].shape[1:] == (3, 4)
            for k in kinds:
                assert isinstance(batch[k], list) and len(batch[k]) == len(batch["label"])
            for i, row in enumerate(batch["label"].tolist()):
                seen.append(row)
                assert (batch["img"][i].ravel() == np.arange(12 * row, 12 * row + 12) % 256).all()
                for k in kinds:
                    assert same(batch[k][i], expected[k][row]), (k, row)
        assert sorted(seen) == list(range(N))
        assert seen != sorted(seen)  # shuffled


def test_single_and_tuple_columns(vlen_file):
    expected = truth(vlen_file, "i32")
    with make(vlen_file, "i32", batch_size=50) as loader:
        rows = [row for batch in loader for row in batch]
    assert all(same(a, b) for a, b in zip(rows, expected, strict=True))
    with make(vlen_file, ["label", "text"], batch_size=50) as loader:
        batch = next(iter(loader))
    assert isinstance(batch, tuple) and batch[1][:2] == truth(vlen_file, "text")[:2]


def test_ranks_and_resume_deliver_each_row_once(vlen_file):
    rows = []
    for rank in range(3):
        with make(vlen_file, ["label", "u8"], shuffle=True, rank=rank, world_size=3,
                  drop_last=True) as loader:
            rows += [r for b in loader for r in b[0].tolist()]
            assert len(loader) == N // 3 // 16
    assert len(rows) == len(set(rows)) == 3 * (N // 3 // 16) * 16
    with make(vlen_file, ["label", "u8"], shuffle=True, n_procs=1) as loader:
        whole = [b[0].tolist() for b in loader]
        loader.set_epoch(0)
        it = iter(loader)
        first = [next(it)[0].tolist() for _ in range(5)]
        state = loader.state_dict()
    with make(vlen_file, ["label", "u8"], shuffle=True) as resumed:
        resumed.load_state_dict(state)
        rest = [b[0].tolist() for b in resumed]
    assert first + rest == whole


def test_refused_columns_name_the_problem(vlen_file):
    with pytest.raises(TypeError, match=r"grid.*2 dimensions"):
        make(vlen_file, "grid")
    with pytest.raises(TypeError, match="rec.*variable-length fields"):
        make(vlen_file, "rec")


# ---- PyTables VLArrays --------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlarray_file(tmp_path_factory):
    tables = pytest.importorskip("tables")
    path = str(tmp_path_factory.mktemp("samples") / "vlarrays.h5")
    values = {
        "u8": [np.arange(i % 9, dtype="u1") for i in range(40)],
        "i32": [np.arange(i % 5, dtype="i4") * i for i in range(40)],
        "bytes": [b"ab\x00c" * (i % 3) for i in range(40)],
        "text": [f"é{i}" * (i % 4) for i in range(40)],
        "obj": [{"row": i, "tags": ["a"] * (i % 3)} for i in range(40)],
    }
    atoms = {"u8": tables.UInt8Atom(), "i32": tables.Int32Atom(),
             "bytes": tables.VLStringAtom(), "text": tables.VLUnicodeAtom(),
             "obj": tables.ObjectAtom()}
    with tables.open_file(path, "w") as f:
        for name, atom in atoms.items():
            array = f.create_vlarray("/", name, atom)
            for value in values[name]:
                array.append(value)
    return path, values


def test_pytables_vlarrays(vlarray_file):
    path, values = vlarray_file
    names = ["u8", "i32", "bytes", "text"]
    with make(path, names, batch_size=7, shuffle=True) as loader:
        got = {}
        for batch in loader:
            for name, column in zip(names, batch, strict=True):
                for value in column:
                    got.setdefault(name, []).append(value)
    order = [int(len(v)) for v in got["u8"]]  # u8 row i has i % 9 elements
    assert sorted(map(bytes, got["bytes"])) == sorted(values["bytes"])
    assert sorted(got["text"]) == sorted(values["text"])
    assert len(order) == 40
    with make(path, names) as loader:  # in order: row for row
        batch = next(iter(loader))
    for name, column in zip(names, batch, strict=True):
        for a, b in zip(column, values[name], strict=False):
            assert same(a, b) if not isinstance(b, np.ndarray) else np.array_equal(a, b)


def test_pickled_objects_only_when_allowed(vlarray_file):
    path, values = vlarray_file
    with pytest.raises(ValueError, match="allow_pickle=True"):
        make(path, "obj")
    with make(path, "obj", batch_size=40, allow_pickle=True) as loader:
        assert next(iter(loader)) == values["obj"]


# ---- transforms ---------------------------------------------------------------------------


def crop_flip(sample, rng):
    """A random window of 4 of a row's int32s (padded), flipped half the time."""
    tokens = np.concatenate([sample["i32"], np.zeros(4, np.int32)])
    start = rng.integers(0, len(tokens) - 3)
    window = tokens[start : start + 4]
    if rng.random() < 0.5:
        window = window[::-1]
    return {"x": window.copy(), "y": sample["label"], "n": len(sample["text"])}


def expected_crops(loader, path, rows, epoch):
    i32, text = truth(path, "i32"), truth(path, "text")
    out = []
    for row in rows:
        sample = {"i32": i32[row], "label": np.int64(row), "text": text[row]}
        out.append(crop_flip(sample, loader.sample_rng(epoch, row))["x"])
    return np.stack(out)


def test_transform_runs_in_workers_with_reproducible_rng(vlen_file):
    columns = {"i32": "i32", "label": "label", "text": "text"}
    with make(vlen_file, columns, shuffle=True, seed=SEED, transform=crop_flip) as loader:
        for epoch in range(2):
            batches = list(loader)
            rows = np.concatenate([b["y"] for b in batches])
            assert sorted(rows.tolist()) == list(range(N))
            x = np.concatenate([b["x"] for b in batches])
            assert x.dtype == np.int32 and x.shape == (N, 4)
            assert np.array_equal(x, expected_crops(loader, vlen_file, rows, epoch))
            assert isinstance(batches[0]["n"], np.ndarray)  # Python ints stack too
            assert batches[0]["n"].tolist() == [len(truth(vlen_file, "text")[r])
                                                for r in batches[0]["y"]]


def test_sample_rngs_differ_by_seed_epoch_and_row(vlen_file):
    with make(vlen_file, "label", seed=1) as a, make(vlen_file, "label", seed=2) as b:
        draws = [r.integers(0, 2**62, 4).tolist() for r in (
            a.sample_rng(0, 5), a.sample_rng(0, 5), a.sample_rng(1, 5), a.sample_rng(0, 6),
            b.sample_rng(0, 5))]
    assert draws[0] == draws[1]
    assert len({tuple(d) for d in draws}) == 4


def test_transform_resumed_epoch_equals_uninterrupted(vlen_file):
    columns = {"i32": "i32", "label": "label", "text": "text"}
    with make(vlen_file, columns, shuffle=True, transform=crop_flip) as loader:
        loader.set_epoch(3)
        whole = [b["x"] for b in loader]
        loader.set_epoch(3)
        it = iter(loader)
        for _ in range(4):
            next(it)
        state = loader.state_dict()
    with make(vlen_file, columns, shuffle=True, transform=crop_flip, n_procs=1) as resumed:
        resumed.load_state_dict(state)
        rest = [b["x"] for b in resumed]
    assert len(rest) == len(whole) - 4
    for a, b in zip(rest, whole[4:], strict=True):
        assert np.array_equal(a, b)


def test_transform_results_of_many_shapes_come_as_lists(vlen_file):
    with make(vlen_file, ["label", "i32"], batch_size=10,
              transform=lambda s: (s[1] * 2, str(s[0]), s[0])) as loader:
        doubled, names, labels = next(iter(loader))
    expected = truth(vlen_file, "i32")
    assert isinstance(doubled, list) and all(
        np.array_equal(d, 2 * e) for d, e in zip(doubled, expected, strict=False))
    assert names == [str(i) for i in range(10)]
    assert labels.tolist() == list(range(10))


def pad_batch(batch):
    """Pad a batch's token sequences to its longest."""
    tokens, labels = batch
    longest = max(len(t) for t in tokens)
    out = np.full((len(tokens), longest), -1, np.int32)
    for i, t in enumerate(tokens):
        out[i, : len(t)] = t
    return out, labels


def test_batch_transform_pads_sequences(vlen_file):
    expected = truth(vlen_file, "i32")
    with make(vlen_file, ["i32", "label"], batch_size=32, shuffle=True,
              batch_transform=pad_batch) as loader:
        n = 0
        for padded, labels in loader:
            assert padded.shape == (len(labels), max(len(expected[r]) for r in labels))
            for row, line in zip(labels.tolist(), padded, strict=True):
                k = len(expected[row])
                assert np.array_equal(line[:k], expected[row]) and (line[k:] == -1).all()
            n += len(labels)
    assert n == N


def test_transform_of_large_samples_grows_the_slots(vlen_file):
    """Samples of 200 KB: a batch needs more than the first slots hold."""
    def big(row):
        return np.full((160, 160), row, np.float64)

    with make(vlen_file, "label", batch_size=16, transform=big) as loader:
        for _ in range(2):  # the second epoch starts with the grown slots
            rows = 0
            for batch in loader:
                assert batch.shape[1:] == (160, 160)
                assert (batch == np.arange(rows, rows + len(batch))[:, None, None]).all()
                rows += len(batch)
            assert rows == N


def test_copy_false_lends_batches_until_the_next(vlen_file):
    with make(vlen_file, "label", batch_size=16, copy=False,
              transform=lambda row: np.full(3, row, np.float64)) as loader:
        it = iter(loader)
        first = next(it)
        assert first[:, 0].tolist() == list(range(16))
        second = next(it)
        assert np.isnan(first).all()  # poisoned once the next was asked for
        assert second[:, 0].tolist() == list(range(16, 32))
        kept = np.array(second)
        next(it)
        assert np.array_equal(kept[:, 0], np.arange(16, 32))


def fail_on_row_7(sample):
    if sample == 7 and os.path.exists(os.environ["FAIL_FLAG"]):
        return 1 / 0
    return sample * 2


def test_transform_error_names_row_and_columns_then_next_epoch_works(vlen_file, tmp_path,
                                                                      monkeypatch):
    flag = tmp_path / "fail"
    flag.write_text("")
    monkeypatch.setenv("FAIL_FLAG", str(flag))
    with make(vlen_file, "label", batch_size=4, transform=fail_on_row_7) as loader:
        with pytest.raises(TransformError) as info:
            list(loader)
        text = str(info.value)
        assert "row 7 of" in text and "'label'" in text
        assert "ZeroDivisionError: division by zero" in text
        assert "fail_on_row_7" in text  # the worker's traceback, the original's included
        flag.unlink()
        rows = np.concatenate(list(loader))
        assert rows.tolist() == [2 * r for r in range(N)]


def test_batch_transform_error_names_the_rows(vlen_file):
    def broken(batch):
        raise KeyError("nope")

    with make(vlen_file, ["label", "i32"], batch_size=8, batch_transform=broken) as loader:
        # Every batch fails: the first failure, of any worker, is the one raised.
        with pytest.raises(TransformError, match=r"batch_transform raised on the batch of rows "
                                                 r"(\d+), \d+, .*KeyError: 'nope'"):
            next(iter(loader))


def test_unpicklable_transform_refused_where_workers_do_not_fork(vlen_file):
    with pytest.raises(TypeError, match=r"transform .*cannot be pickled.*start_method='spawn'"):
        make(vlen_file, "label", transform=lambda row: row, start_method="spawn")
    with make(vlen_file, "label", transform=lambda row: row + 1) as loader:  # fork: fine
        assert np.concatenate(list(loader)).tolist() == list(range(1, N + 1))
        with pytest.raises(TypeError, match="cannot be pickled.*another process"):
            pickle.dumps(loader)


def double(sample):
    return tuple(column * 2 for column in sample)


def test_module_level_transform_with_spawned_workers(vlen_file):
    with make(vlen_file, ["label", "u8"], transform=double, start_method="spawn",
              batch_size=100) as loader:
        batches = list(loader)
    assert np.concatenate([b[0] for b in batches]).tolist() == [2 * r for r in range(N)]
    expected = truth(vlen_file, "u8")
    assert all(np.array_equal(a, 2 * b) for a, b in zip(
        [r for b in batches for r in b[1]], expected, strict=True))
    with make(vlen_file, ["label"], transform=double) as loader:
        copy = pickle.loads(pickle.dumps(loader))
        assert np.concatenate([b[0] for b in copy]).tolist() == [2 * r for r in range(N)]
        copy.close()


def test_many_files_of_variable_length_rows(vlen_file, tmp_path):
    expected = truth(vlen_file, "i32")
    paths = write_vlen_parts(tmp_path, "i32", expected)
    with make(paths, ["label", "i32"], batch_size=16, shuffle=True) as loader:
        got = [(r, v) for b in loader for r, v in zip(b[0].tolist(), b[1], strict=True)]
    assert sorted(r for r, _ in got) == list(range(N))
    assert all(np.array_equal(v, expected[r]) for r, v in got)


def test_torch_gives_lists_of_tensors(vlen_file):
    torch = pytest.importorskip("torch")
    import multitables.torch

    columns = {"i32": "i32", "text": "text", "label": "label"}
    dataset = multitables.torch.Loader(vlen_file, columns, batch_size=32, n_procs=1)
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        rows, expected = [], truth(vlen_file, "i32")
        for batch in loader:
            assert isinstance(batch["label"], torch.Tensor)
            assert all(isinstance(t, torch.Tensor) for t in batch["i32"])
            assert all(isinstance(s, str) for s in batch["text"])
            for row, tokens in zip(batch["label"].tolist(), batch["i32"], strict=True):
                assert np.array_equal(tokens.numpy(), expected[row])
                rows.append(row)
        assert sorted(rows) == list(range(N))
    finally:
        dataset.close()
    with multitables.torch.Loader(vlen_file, ["i32", "label"], batch_size=32, n_procs=1,
                                  batch_transform=pad_batch) as padded:
        first = next(iter(torch.utils.data.DataLoader(padded, batch_size=None)))
        assert isinstance(first[0], torch.Tensor) and first[0].dtype == torch.int32


def test_readme_images_and_text_examples_run(tmp_path, monkeypatch):
    """The README's "Images and text" code, as written, on files made here."""
    simplejpeg = pytest.importorskip("simplejpeg")
    from helpers import REPO

    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Images and text", 1)[1].split("\n## ", 1)[0]
    blocks = [textwrap.dedent(b.split("```", 1)[0]) for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 128, 128, 3), np.uint8)
    monkeypatch.chdir(tmp_path)
    with h5py.File("images.h5", "w") as f:
        jpeg = f.create_dataset("jpeg", (20,), h5py.vlen_dtype(np.uint8))
        jpeg[:] = [np.frombuffer(simplejpeg.encode_jpeg(im, quality=90), np.uint8)
                   for im in images]
        f.create_dataset("label", data=np.arange(20))
    with h5py.File("tokens.h5", "w") as f:
        f.create_dataset("tokens", (70,), h5py.vlen_dtype(np.int32))[:] = [
            np.arange(i % 9 + 1, dtype=np.int32) for i in range(70)]
    seen: list = []
    names: dict = {"seen": seen}
    exec(blocks[0].replace("    ...", "    seen.append((images.shape, images.dtype, labels))"),
         names)
    names["loader"].close()
    assert [s[0] for s in seen] == [(20, 112, 112, 3)] and seen[0][1] == np.uint8
    assert sorted(seen[0][2].tolist()) == list(range(20))
    batches: list = []
    names["batches"] = batches
    exec(blocks[1].replace("    ...", "    batches.append((tokens, lengths))"), names)
    names["text"].close()
    assert [len(t) for t, _ in batches] == [64, 6]
    # Row i is arange(i % 9 + 1): its padded line holds its i % 9 + 1 numbers, then -1.
    assert sorted(n for _, lengths in batches for n in lengths.tolist()) == sorted(
        i % 9 + 1 for i in range(70))
    for tokens, lengths in batches:
        assert tokens.shape[1] == lengths.max() and tokens.dtype == np.int32
        for line, n in zip(tokens, lengths.tolist(), strict=True):
            assert line[:n].tolist() == list(range(n)) and (line[n:] == -1).all()


def test_torch_dataloader_workers_run_a_lambda_transform(vlen_file):
    """DataLoader workers fork from the training process and the Loader's workers from them:
    a lambda reaches both without pickling."""
    torch = pytest.importorskip("torch")
    import multitables.torch

    with multitables.torch.Loader(vlen_file, ["label", "i32"], batch_size=16, n_procs=1,
                                  transform=lambda s: (s[0] * 2, len(s[1]))) as dataset:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        doubled, lengths = zip(*loader, strict=True)
    expected = truth(vlen_file, "i32")
    rows = torch.cat(doubled) // 2
    assert sorted(rows.tolist()) == list(range(N))
    assert torch.cat(lengths).tolist() == [len(expected[r]) for r in rows.tolist()]


def die_on_row_5(row):
    if row == 5 and os.path.exists(os.environ["DIE_FLAG"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return row


def test_a_worker_killed_in_a_transform_raises_then_next_epoch_works(vlen_file, tmp_path,
                                                                      monkeypatch):
    flag = tmp_path / "die"
    flag.write_text("")
    monkeypatch.setenv("DIE_FLAG", str(flag))
    with make(vlen_file, "label", batch_size=4, transform=die_on_row_5) as loader:
        with pytest.raises(multitables.SubprocessException, match="signal 9|SIGKILL"):
            list(loader)
        flag.unlink()
        assert np.concatenate(list(loader)).tolist() == list(range(N))
