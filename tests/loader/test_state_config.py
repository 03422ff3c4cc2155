"""A Loader's state loads only into a Loader that plays epochs the same way: every setting that
shapes an epoch is checked, ``drop_last`` included."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import write_h5py

import multitables

N_ROWS = 103  # prime: drop_last changes both the number of batches and the rows delivered


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("state") / "rows.h5")
    write_h5py(path, "idx", np.arange(N_ROWS), chunks=(10,))
    return path


def make(path, **kw) -> multitables.Loader:
    return multitables.Loader(path, "idx", 8, shuffle=True, seed=5, n_procs=1, **kw)


@pytest.mark.parametrize("saved, loading", [(True, False), (False, True)])
def test_a_state_saved_with_another_drop_last_is_refused(path, saved, loading):
    """Bug guarded: the state's configuration check leaves ``drop_last`` out, so a state saved
    with ``drop_last=True`` loads silently into a Loader with ``drop_last=False`` (or the other
    way round): its batch counts and delivered rows mean other positions there, and the resumed
    run plays other rows than the interrupted one would have, without a word."""
    with make(path, drop_last=saved) as source, make(path, drop_last=loading) as target:
        assert len(source) != len(target)  # the setting matters for this file
        state = source.state_dict()
        with pytest.raises(ValueError, match="drop_last"):
            target.load_state_dict(state)


def test_a_state_saved_with_the_same_drop_last_loads(path):
    """The refusal above is about ``drop_last`` alone: the same settings load."""
    with make(path, drop_last=True) as source, make(path, drop_last=True) as target:
        target.load_state_dict(source.state_dict())
        assert target.state_dict() == source.state_dict()
