"""Suite-wide guards: no test may leave a child process or a shared-memory object behind."""

from __future__ import annotations

import gc
import os
import time

import psutil
import pytest


def _shm_entries() -> set[str]:
    # PyTorch's DataLoader (benchmarks running beside the tests) names its segments torch_*.
    try:
        return {name for name in os.listdir("/dev/shm") if not name.startswith("torch_")}
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail the test if it leaves child processes or new /dev/shm entries behind."""
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    shm_before = _shm_entries()
    yield
    gc.collect()
    deadline = time.monotonic() + 5
    while True:
        extra = [p for p in me.children(recursive=True) if p.pid not in children_before]
        extra = [p for p in extra if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    leaked_shm = _shm_entries() - shm_before
    for p in extra:
        p.kill()
    assert not extra, f"test left child processes: {[(p.pid, p.cmdline()) for p in extra]}"
    assert not leaked_shm, f"test left /dev/shm entries: {sorted(leaked_shm)}"
