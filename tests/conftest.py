"""Suite-wide guards (no test may leave a child process, an open descriptor, a memfd or a
/dev/shm entry behind) and the files that the failure-model tests share."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import (
    N_ROWS,
    Resources,
    leaks_since,
    sample,
    write_big,
    write_h5py,
    write_pytables,
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "stress: repeats a race until it would show (seconds each; CI runs them)")


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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed  # for no_leaks: a failure's traceback holds its objects
    return report


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fail the test if it leaves child processes, open descriptors, memfds (open or mapped) or
    /dev/shm entries of ours behind (see helpers.leaks_since). After a failed test the leaks are
    only cleaned up: its traceback keeps its objects, and the failure is the news."""
    before = Resources.now()
    yield
    leaks = leaks_since(before, settle=0 if getattr(request.node, "call_failed", False) else 5)
    if not getattr(request.node, "call_failed", False):
        assert not leaks, "\n".join(leaks)
