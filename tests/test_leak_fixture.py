"""The suite's no-leak fixture (conftest.py) can fail: run end to end on tests that leak."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import textwrap

import pytest
from helpers import REPO, Child

pytestmark = pytest.mark.timeout(60)

_LEAKY_TESTS = """
    import multiprocessing, os, time

    def test_leaves_a_process():
        multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,),
                                                    daemon=True).start()

    def test_leaves_shared_memory():
        open("/dev/shm/{name}", "w").close()

    def test_clean():
        pass
"""

_RUN_PYTEST = "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))"


def test_no_leaks_fixture_catches_leaks(tmp_path):
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(os.path.join(REPO, "tests", name), tmp_path / name)
    name = f"multitables-test-leak-{os.getpid()}"
    (tmp_path / "test_leaky.py").write_text(textwrap.dedent(_LEAKY_TESTS).format(name=name))
    try:
        with Child(_RUN_PYTEST, "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                   "--rootdir", tmp_path, "-c", os.devnull, tmp_path, cwd=tmp_path) as child:
            out, err, _ = child.finish(50)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")
    out += err
    assert child.returncode == 1, out
    assert "test left child processes" in out, out
    assert f"test left /dev/shm entries: ['{name}']" in out, out
    assert re.search(r"\b3 passed, 2 errors\b", out), out  # teardown errors of 2 of 3 tests
