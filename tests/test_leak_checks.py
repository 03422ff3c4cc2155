"""The checks behind the suite's no-leak fixture (helpers.Resources, helpers.leaks_since), each
shown to fail on the leak it is for: a child process, a descriptor, a memfd of ours left open or
left mapped; and not to fail on what this process held before, or on other programs' names in
/dev/shm. The last test runs the fixture end to end on tests that leak descriptors and memfds."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import re
import shutil
import textwrap
import time

import pytest
from helpers import REPO, Child, Resources, leaks_since

pytestmark = pytest.mark.timeout(60)

SETTLE = 0.2  # a leak stays a leak: no need to wait the fixture's 5 s for it to go


def test_nothing_left_is_no_leak(tmp_path):
    before = Resources.now()
    with open(tmp_path / "f", "w"):
        pass
    fd = os.memfd_create("multitables-test")
    os.ftruncate(fd, 4096)
    with mmap.mmap(fd, 4096):
        pass
    os.close(fd)
    assert leaks_since(before, SETTLE) == []


def test_a_descriptor_left_open_is_named_with_its_file(tmp_path):
    before = Resources.now()
    f = open(tmp_path / "kept.txt", "w")
    try:
        leaks = leaks_since(before, SETTLE)
        assert leaks == [f"test left file descriptors open: [({f.fileno()}, "
                         f"'{tmp_path / 'kept.txt'}')]"]
    finally:
        f.close()
    assert leaks_since(before, SETTLE) == []


def test_a_pipe_left_open_is_a_leak():
    before = Resources.now()
    r, w = os.pipe()
    try:
        (leak,) = leaks_since(before, SETTLE)
        assert re.fullmatch(rf"test left file descriptors open: \[\({r}, 'pipe:\[\d+\]'\), "
                            rf"\({w}, 'pipe:\[\d+\]'\)\]", leak), leak
    finally:
        os.close(r)
        os.close(w)


def test_a_memfd_left_open_is_a_leak():
    before = Resources.now()
    fd = os.memfd_create("multitables-stage")
    try:
        assert leaks_since(before, SETTLE) == [
            f"test left memfds open: [({fd}, '/memfd:multitables-stage (deleted)')]"]
    finally:
        os.close(fd)


def test_a_memfd_closed_but_still_mapped_is_a_leak():
    """Its descriptor is gone, its memory is not: the mapping holds it. (Python's ``mmap`` keeps
    a descriptor of its own; C code, as the ring's, maps without one: libc's mmap here.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = 3 * mmap.PAGESIZE
    before = Resources.now()
    fd = os.memfd_create("multitables-queue")
    os.ftruncate(fd, size)
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    try:
        (leak,) = leaks_since(before, SETTLE)
        assert leak == (f"test left memfds mapped: ['{address:x}-{address + size:x} "
                        "/memfd:multitables-queue (deleted)']"), leak
    finally:
        libc.munmap(address, size)
    assert leaks_since(before, SETTLE) == []


def test_an_arena_of_a_collectable_cycle_is_no_leak():
    """Garbage that only a collection frees is collected before anything is called a leak."""
    from multitables._engine.shm import SharedArena

    before = Resources.now()
    arena = SharedArena(4096)
    cycle = [arena]
    cycle.append(cycle)
    del arena, cycle
    assert leaks_since(before, SETTLE) == []


def test_descriptors_held_before_are_not_leaks(tmp_path):
    kept = open(tmp_path / "before.txt", "w")
    fd = os.memfd_create("multitables-before")
    try:
        before = Resources.now()
        assert leaks_since(before, SETTLE) == []
    finally:
        kept.close()
        os.close(fd)


def _fork_sleeping(seconds: float) -> int:
    pid = os.fork()
    if pid == 0:  # a bare fork: no pipe or sentinel of multiprocessing's to count as a leak
        try:
            time.sleep(seconds)
        finally:
            os._exit(0)
    return pid


def test_a_child_process_left_running_is_a_leak_and_is_killed():
    before = Resources.now()
    pid = _fork_sleeping(60)
    try:
        (leak,) = leaks_since(before, SETTLE)
        assert leak.startswith(f"test left child processes: [({pid}, "), leak
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9  # killed by the check
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)


def test_a_child_that_exits_within_the_settle_time_is_no_leak():
    before = Resources.now()
    pid = _fork_sleeping(0.3)
    try:
        assert leaks_since(before, 5) == []
    finally:
        os.waitpid(pid, 0)


def test_dev_shm_names_count_only_when_ours():
    """/dev/shm belongs to the whole machine: other programs' names there come and go."""
    ours, theirs = (f"/dev/shm/{p}-leak-check-{os.getpid()}" for p in ("multitables", "other"))
    assert_only_counted(ours, theirs)


def assert_only_counted(ours: str, theirs: str) -> None:
    """Leave both names in /dev/shm: the leak check reports ``ours`` alone."""
    before = Resources.now()
    try:
        for name in (ours, theirs):
            open(name, "w").close()
        assert leaks_since(before, SETTLE) == [
            f"test left /dev/shm entries: ['{os.path.basename(ours)}']"]
    finally:
        for name in (ours, theirs):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


_LEAKY_TESTS = """
    import mmap, os

    KEEP = []

    def test_leaves_a_file_open(tmp_path):
        KEEP.append(open(tmp_path / "left-open.txt", "w"))

    def test_leaves_a_memfd_open():
        KEEP.append(os.memfd_create("multitables-leaky"))

    def test_leaves_a_memfd_mapped():
        fd = os.memfd_create("multitables-mapped")
        os.ftruncate(fd, 4096)
        KEEP.append(mmap.mmap(fd, 4096))
        os.close(fd)

    def test_fails_and_leaks():
        KEEP.append(os.memfd_create("multitables-failed"))
        assert False, "the test's own failure"

    def test_clean():
        with open(__file__):
            pass
"""


def test_the_fixture_fails_tests_that_leak_descriptors_and_memfds(tmp_path):
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(os.path.join(REPO, "tests", name), tmp_path / name)
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(_LEAKY_TESTS))
    with Child("import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))",
               "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir", tmp_path,
               "-c", os.devnull, tmp_path, cwd=tmp_path) as child:
        out, err, _ = child.finish(50)
    out += err
    assert child.returncode == 1, out
    assert re.search(r"test left file descriptors open: \[\(\d+, '[^']*left-open.txt'\)\]",
                     out), out
    assert re.search(r"test left memfds open: \[\(\d+, '/memfd:multitables-leaky \(deleted\)'",
                     out), out
    assert re.search(r"test left memfds mapped: \['[0-9a-f-]+ /memfd:multitables-mapped", out), out
    # A failed test is reported once, as a failure; what it left is cleaned up, not reported.
    assert "/memfd:multitables-failed" not in out, out
    assert re.search(r"\b1 failed, 4 passed, 3 errors\b", out), out


_MP_HELPERS = """
    from helpers import Resources, leaks_since
    import multiprocessing.forkserver, multiprocessing.resource_tracker
    before = Resources.now()
    multiprocessing.resource_tracker.ensure_running()
    multiprocessing.forkserver.ensure_running()
    print(leaks_since(before, 0.2))
"""


def test_multiprocessings_own_helpers_are_no_leak():
    """The resource tracker and the fork server, started by the first test that needs them,
    live as long as the process that started them (here a fresh child Python)."""
    with Child(_MP_HELPERS, cwd=os.path.join(REPO, "tests")) as child:
        out, err, _ = child.finish(30)
    assert child.returncode == 0, err
    assert out.strip() == "[]", out


def test_dev_shm_names_of_another_test_run_are_not_ours():
    """The leak fixture's own test leaves bait named after its process: another run of the
    suite on the machine, seeing it, must not take it for its own leak."""
    other_pid = 1  # init: never this process or its parent
    theirs = f"/dev/shm/multitables-test-leak-{other_pid}"
    mine = f"/dev/shm/multitables-test-leak-{os.getpid()}"
    assert_only_counted(mine, theirs)
