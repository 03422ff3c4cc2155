"""multitables.torch.Loader inside torch's DataLoader: tensors, worker splits, start methods."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from helpers import sample
from torch.utils.data import DataLoader

import multitables.torch

N = 1003


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("torch") / "t.h5")
    table = np.zeros(N, [("label", "<i8"), ("w", "<f4")])
    table["label"] = np.arange(N) % 10
    table["w"] = np.arange(N) / 2
    with h5py.File(path, "w") as f:
        f.create_dataset("idx", data=np.arange(N), chunks=(40,))
        f.create_dataset("x", data=sample((N, 3), "<f4"), chunks=(40, 3), compression="gzip")
        f.create_dataset("t", data=table, chunks=(64,))
        f.create_dataset("big", data=np.arange(N, dtype=">f4"))
        f.create_dataset("names", data=np.array([b"ab"] * N))
    return path


def truth(path, name):
    with h5py.File(path, "r") as f:
        return f[name][()]


def make(path, columns=None, batch_size=32, **kw):
    kw.setdefault("n_procs", 1)
    columns = columns or {"idx": "idx", "x": "x", "label": "/t/label"}
    return multitables.torch.Loader(path, columns, batch_size, **kw)


def rows_of(batches) -> np.ndarray:
    return torch.cat([b["idx"] for b in batches]).numpy()


def test_batches_are_tensors_equal_to_the_file(path):
    x, table = truth(path, "x"), truth(path, "t")
    with make(path, shuffle=True) as dataset:
        batches = list(DataLoader(dataset, batch_size=None))
        assert len(batches) == len(dataset) == -(-N // 32)
        for batch in batches:
            assert isinstance(batch["x"], torch.Tensor) and batch["x"].dtype == torch.float32
            rows = batch["idx"].numpy()
            np.testing.assert_array_equal(batch["x"].numpy(), x[rows])
            np.testing.assert_array_equal(batch["label"].numpy(), table["label"][rows])
        assert sorted(rows_of(batches).tolist()) == list(range(N))


def test_tuple_and_single_columns(path):
    with make(path, ["idx", "x"]) as dataset:
        first = next(iter(DataLoader(dataset, batch_size=None)))
        # The DataLoader's default_convert turns a tuple into a list (torch's own rule).
        assert isinstance(first, (tuple, list)) and first[0].tolist() == list(range(32))
    with make(path, "idx") as dataset:
        first = next(iter(DataLoader(dataset, batch_size=None)))
        assert first.tolist() == list(range(32))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_split_the_epoch(path, context):
    with make(path, shuffle=True, seed=5) as dataset:
        dataset.set_epoch(1)
        loader = DataLoader(dataset, batch_size=None, num_workers=2,
                            multiprocessing_context=context)
        rows = rows_of(list(loader))
        assert sorted(rows.tolist()) == list(range(N))  # no row twice, none missing
        dataset.set_epoch(2)
        other = rows_of(list(loader))
        assert sorted(other.tolist()) == list(range(N))
        assert not np.array_equal(rows, other)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_pin_memory(path):
    with make(path) as dataset:
        batches = list(DataLoader(dataset, batch_size=None, pin_memory=True))
        np.testing.assert_array_equal(rows_of(batches), np.arange(N))


def test_state_dict_resumes_the_same_batches(path):
    with make(path, shuffle=True) as dataset:
        it = iter(DataLoader(dataset, batch_size=None))
        for _ in range(4):
            next(it)
        state = dataset.state_dict()
        rest = rows_of(list(it))
    with make(path, shuffle=True) as resumed:
        resumed.load_state_dict(state)
        np.testing.assert_array_equal(rows_of(list(DataLoader(resumed, batch_size=None))), rest)


def test_a_table_as_one_column_is_refused(path):
    with pytest.raises(TypeError, match="'/t/label'"):
        make(path, "/t")


def batch_set(batches) -> list[tuple[int, ...]]:
    """The batches as row tuples, in a canonical order: the same set whatever worker made each."""
    return sorted(tuple(b["idx"].tolist()) for b in batches)


def plain_batches(path, epoch, **kw):
    with multitables.Loader(path, {"idx": "idx"}, 32, n_procs=1, **kw) as plain:
        plain.set_epoch(epoch)
        return sorted(tuple(b["idx"].tolist()) for b in plain)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("persistent", [False, True])
def test_epochs_follow_one_another_in_dataloader_workers(path, persistent):
    """Without set_epoch each DataLoader pass plays the next epoch, as without workers; with it,
    the epoch chosen, even for persistent workers."""
    with make(path, {"idx": "idx"}, shuffle=True, seed=3) as dataset:
        loader = DataLoader(dataset, batch_size=None, num_workers=2,
                            persistent_workers=persistent)
        for epoch in range(3):
            assert batch_set(loader) == plain_batches(path, epoch, shuffle=True, seed=3)
        dataset.set_epoch(1)
        assert batch_set(loader) == plain_batches(path, 1, shuffle=True, seed=3)
        # Between epochs the state is the next epoch's start (issue 22: it raised here).
        assert dataset.state_dict()["epoch"] == 2
        del loader  # persistent workers end with their DataLoader


@pytest.mark.timeout(90)
def test_copy_false_in_dataloader_workers_sends_whole_batches(path):
    x = truth(path, "x")
    with make(path, {"idx": "idx", "x": "x"}, shuffle=True, copy=False) as dataset:
        batches = list(DataLoader(dataset, batch_size=None, num_workers=2))
        for batch in batches:
            np.testing.assert_array_equal(batch["x"].numpy(), x[batch["idx"].numpy()])
        assert sorted(rows_of(batches).tolist()) == list(range(N))


def test_columns_torch_cannot_hold(path):
    with make(path, {"idx": "idx", "big": "big"}) as dataset:
        batch = next(iter(DataLoader(dataset, batch_size=None)))
        assert batch["big"].dtype == torch.float32
        np.testing.assert_array_equal(batch["big"].numpy(), np.arange(32, dtype="f4"))
    with pytest.raises(TypeError, match="'names' holds \\|S2"):
        make(path, "names")


def test_the_torch_loader_takes_the_loaders_arguments():
    # It spells them out again (so help() shows them): the two must not drift apart.
    import inspect

    import multitables

    assert inspect.signature(multitables.torch.Loader.__init__) == inspect.signature(
        multitables.Loader.__init__)
