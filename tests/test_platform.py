"""multitables needs Linux; elsewhere importing it says so."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO


def test_import_elsewhere_raises_a_clear_import_error():
    code = "import sys; sys.platform = 'darwin'; import multitables"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode != 0
    assert "ImportError: multitables runs on Linux only" in run.stderr
    assert "this is darwin" in run.stderr
