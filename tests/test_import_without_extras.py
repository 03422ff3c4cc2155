"""The package imports, and reads local files, without its optional extras: urllib3 and botocore
(the remote extra), torch, dask. The README's first command installs none of them."""

from __future__ import annotations

import subprocess
import sys

import h5py
import numpy as np

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"urllib3", "botocore", "torch", "dask", "distributed"}:
            raise ImportError(f"no {name} here")
sys.meta_path.insert(0, Block())
"""


def test_import_and_read_a_local_file_without_extras(tmp_path):
    """``import multitables`` failed without urllib3: the many-files Loader imported the S3
    listing at import time."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(10)
    code = BLOCK + f"""
import multitables
with multitables.Loader({str(path)!r}, "x", 5, n_procs=1) as loader:
    print(sum(int(b.sum()) for b in loader))
try:
    multitables.Reader("http://127.0.0.1:9/x.h5").get_dataset("x")
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "45"
    assert "pip install 'multitables[remote]'" in lines[1]
