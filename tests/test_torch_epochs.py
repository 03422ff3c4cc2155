"""multitables.torch.Loader: which epoch DataLoader workers play after the main process played
one, and after a resume. Workers play copies of the dataset, so the epoch reaches them only
through what the copies share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import write_h5py
from torch.utils.data import DataLoader

import multitables.torch

N, BATCH, SEED = 1003, 32, 3


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("torch_epochs") / "rows.h5")
    write_h5py(path, "idx", np.arange(N), chunks=(40,))
    return path


def make(path) -> multitables.torch.Loader:
    return multitables.torch.Loader(path, "idx", BATCH, shuffle=True, seed=SEED, n_procs=1)


def batch_set(batches) -> list[tuple[int, ...]]:
    """The batches as row tuples, in a canonical order: the same whatever worker made each."""
    return sorted(tuple(b.tolist()) for b in batches)


def epoch_batches(dataset, epoch: int) -> list[tuple[int, ...]]:
    """The batches of ``epoch`` as the public order says (one rank: positions 0..N in order)."""
    rows = dataset.order(epoch).rows(0, N)
    return batch_set(torch.from_numpy(rows[k:k + BATCH]) for k in range(0, N, BATCH))


def played_epoch(dataset, batches) -> int | None:
    """Which of the first ten epochs ``batches`` are (None: none of them)."""
    got = batch_set(batches)
    return next((e for e in range(10) if epoch_batches(dataset, e) == got), None)


@pytest.mark.timeout(60)
def test_workers_play_the_epoch_after_one_played_in_the_main_process(path):
    """Bug guarded: after an epoch played in the main process (``num_workers=0``), the
    DataLoader workers of the next iteration replay that epoch instead of the next one (the
    epoch played here never reaches the state the workers' copies share)."""
    with make(path) as dataset:
        assert played_epoch(dataset, DataLoader(dataset, batch_size=None)) == 0
        workers = DataLoader(dataset, batch_size=None, num_workers=2)
        assert played_epoch(dataset, workers) == 1, "the workers did not play the next epoch"
        assert played_epoch(dataset, workers) == 2


@pytest.mark.timeout(60)
def test_workers_resume_the_epoch_of_a_loaded_state(path):
    """Bug guarded: ``load_state_dict``'s epoch does not reach the DataLoader workers' shared
    epoch, so after a resume (a new process: the training script run again) the workers play
    the epoch the fresh dataset started at, not the one saved."""
    with make(path) as trained:
        for _ in range(2):  # two epochs, then a checkpoint at the epoch boundary
            for _ in DataLoader(trained, batch_size=None):
                pass
        state = trained.state_dict()
    assert state["epoch"] == 2
    with make(path) as resumed:
        resumed.load_state_dict(state)
        workers = DataLoader(resumed, batch_size=None, num_workers=2)
        assert played_epoch(resumed, workers) == 2, "the workers did not resume epoch 2"
        assert played_epoch(resumed, workers) == 3


@pytest.mark.timeout(60)
def test_the_main_process_plays_the_epoch_after_the_workers_last_one(path):
    """Bug guarded: after an epoch played in DataLoader workers, a ``num_workers=0`` pass on the
    same dataset replayed it (the workers played copies: the main process's own count of the
    next epoch never moved), so epochs went 0, 0, 1 instead of 0, 1, 2."""
    with make(path) as dataset:
        workers = DataLoader(dataset, batch_size=None, num_workers=2)
        assert played_epoch(dataset, workers) == 0
        assert played_epoch(dataset, DataLoader(dataset, batch_size=None)) == 1
        assert played_epoch(dataset, workers) == 2
        assert played_epoch(dataset, DataLoader(dataset, batch_size=None)) == 3
