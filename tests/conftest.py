"""Suite-wide guards (no test may leave a child process or a shared-memory object behind) and
the files that the failure-model tests share."""

from __future__ import annotations

import gc
import time

import h5py
import numpy as np
import psutil
import pytest
from helpers import N_ROWS, sample, shm_entries, write_big, write_h5py, write_pytables


@pytest.fixture(scope="session")
def data_files(tmp_path_factory):
    """(path, tables_path, truth): ``x`` (4 MB in gzip chunks), ``small``, ``empty``, a group and
    a plain compound ``table`` in the first file; PyTables' kinds of array in the second."""
    d = tmp_path_factory.mktemp("data")
    path = d / "data.h5"
    truth = {"x": write_big(path)}
    truth["small"] = write_h5py(path, "small", sample((N_ROWS, 3), "<f8"))
    with h5py.File(path, "a") as f:
        f.create_dataset("empty", shape=(0, 3), dtype="f4")
        f.create_group("group")
        f.create_dataset("table", data=np.zeros(N_ROWS, [("a", "i4"), ("b", "f8")]))
    tables_path = d / "tables.h5"
    truth.update(write_pytables(tables_path))
    return str(path), str(tables_path), truth


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail the test if it leaves child processes or new /dev/shm entries behind."""
    me = psutil.Process()
    children_before = {p.pid for p in me.children(recursive=True)}
    shm_before = shm_entries()
    yield
    gc.collect()
    deadline = time.monotonic() + 5
    while True:
        extra = [p for p in me.children(recursive=True) if p.pid not in children_before]
        extra = [p for p in extra if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    leaked_shm = shm_entries() - shm_before
    for p in extra:
        p.kill()
    assert not extra, f"test left child processes: {[(p.pid, p.cmdline()) for p in extra]}"
    assert not leaked_shm, f"test left /dev/shm entries: {sorted(leaked_shm)}"
