"""A crew takes more workers while its job runs (``Crew.add``: a Reader's second worker starts
once the first falls behind), but never from a pool that was closed or collected meanwhile: no
worker may start that nobody would end."""

from __future__ import annotations

import gc

import psutil
import pytest

from multitables._engine.pool import StandbyWorkers
from multitables.errors import ClosedError


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_a_crew_of_a_closed_pool_starts_no_worker():
    before = _children()
    standby = StandbyWorkers(None, "Test")
    crew = standby.run(object(), 0)  # type: ignore[arg-type]  # no worker: the job never travels
    standby.close()
    with pytest.raises(ClosedError, match="this Test is closed"):
        crew.add(object())  # type: ignore[arg-type]
    assert crew.procs == [] and _children() == before


def test_a_crew_whose_pool_was_collected_starts_no_worker():
    before = _children()
    standby = StandbyWorkers(None, "Test")
    crew = standby.run(object(), 0)  # type: ignore[arg-type]
    del standby
    gc.collect()
    with pytest.raises(ClosedError, match="Test's workers are closed"):
        crew.add(object())  # type: ignore[arg-type]
    assert crew.procs == [] and _children() == before
