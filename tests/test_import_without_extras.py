"""The package imports, and reads local files, without its optional extras: botocore (the
remote extra, for s3:// URLs), torch, dask. The README's first command installs none of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    multitables.Reader("s3://bucket/x.h5").get_dataset("x")
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "45"
    assert "pip install 'multitables[remote]'" in lines[1]


def test_read_over_http_without_extras(tmp_path):
    """An http(s) URL needs nothing beyond the standard library: no urllib3, no botocore."""
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(1000), chunks=(100,))
    tests = str(Path(__file__).parent)
    code = BLOCK + f"""
sys.path.insert(0, {tests!r})
import multitables
from servers.rangeserver import RangeServer
with RangeServer({str(tmp_path)!r}) as srv:
    with multitables.Reader(srv.url("x.h5")) as reader:
        x = reader.get_dataset("x")
        print(int(reader.request(x[::7], x.create_stage(143)).get().sum()))
print("urllib3" in sys.modules, "botocore" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(np.arange(1000)[::7].sum()), "False", "False"]
