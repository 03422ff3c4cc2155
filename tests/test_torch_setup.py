"""multitables.torch.Loader set up as users get it wrong or right: a DataLoader that batches our
batches again, and state taken at an epoch boundary with DataLoader workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_h5py
from torch.utils.data import DataLoader

import multitables.torch

N = 1003
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("torch_setup") / "t.h5")
    write_h5py(path, "idx", np.arange(N), chunks=(40,))
    return path


def make(path, **kw):
    return multitables.torch.Loader(path, {"idx": "idx"}, 32, n_procs=1, **kw)


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("batch_size", [1, 8])
def test_a_dataloader_that_batches_again_is_refused(path, batch_size, num_workers):
    """batch_size=1 (the DataLoader's default) gave batches of shape [1, 32] without a word;
    batch_size=8 stacked eight and failed at the short last batch with a stack error."""
    with make(path) as dataset:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        with pytest.raises(ValueError, match=r"DataLoader\(dataset, batch_size=None\)"):
            next(iter(loader))
        first = next(iter(DataLoader(dataset, batch_size=None, num_workers=num_workers)))
        assert first["idx"].shape == torch.Size([32])


def epoch_rows(path, epoch, **kw) -> list[int]:
    with multitables.Loader(path, {"idx": "idx"}, 32, n_procs=1, **kw) as plain:
        plain.set_epoch(epoch)
        return np.concatenate([b["idx"] for b in plain]).tolist()


@pytest.mark.parametrize("persistent", [False, True])
def test_state_at_an_epoch_boundary_with_workers_is_the_next_epochs_start(path, persistent):
    """With num_workers > 0 state_dict() raised even between epochs, so the README's own
    checkpoint snippet broke once workers were added."""
    with make(path, shuffle=True, seed=5) as dataset:
        loader = DataLoader(dataset, batch_size=None, num_workers=2,
                            persistent_workers=persistent)
        for _ in range(2):
            assert sum(len(b["idx"]) for b in loader) == N
        state = dataset.state_dict()
        assert state["epoch"] == 2 and state["history"] == []
        it = iter(loader)
        next(it)  # epoch 2 under way: 32 batches, a few made ahead
        with pytest.raises(RuntimeError, match=r"cannot see how far DataLoader workers got"):
            dataset.state_dict()
        del it, loader
    with make(path, shuffle=True, seed=5) as resumed:
        resumed.load_state_dict(state)
        rows = [r for b in DataLoader(resumed, batch_size=None) for r in b["idx"].tolist()]
    assert rows == epoch_rows(path, 2, shuffle=True, seed=5)
