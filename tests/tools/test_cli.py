"""Quick tests of ``python -m multitables`` (info, bench, tune) on tiny files, in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

import multitables

# The child imports multitables from where this process did (an in-place or editable build).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(multitables.__file__)))
MBS = re.compile(r"\d[\d,]*\s+\d+\.\d\d")  # "1,234  1.00": MB/s then a ratio


def run_cli(*args: str, cwd: str, timeout: float = 90) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    return subprocess.run([sys.executable, "-m", "multitables", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sample(tmp_path):
    filename = str(tmp_path / "sample.h5")
    with h5py.File(filename, "w") as f:
        f.create_dataset("data", data=np.arange(2048 * 256, dtype=np.float32).reshape(2048, 256),
                         chunks=(128, 256))
        grp = f.create_group("grp")
        grp.create_dataset("packed", data=np.zeros((1000, 8, 8), np.uint8), chunks=(100, 8, 8),
                           compression="gzip", compression_opts=4, shuffle=True)
        grp.create_dataset("flat", data=np.ones(5000, np.int64))
        rec = np.zeros(300, [("a", "f4"), ("img", "u1", (4, 4))])
        grp.create_dataset("records", data=rec, chunks=(50,))
    return filename


def test_info_lists_every_dataset(sample, tmp_path):
    out = run_cli("info", sample, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for path in ("/data", "/grp/packed", "/grp/flat", "/grp/records"):
        assert path in text
    assert "(2048, 256)" in text and "(128, 256)" in text
    assert "shuffle+gzip(4)" in text
    assert "{a:f4, img:u1[4, 4]}" in text
    # 1 MiB of whole chunks: 1024 rows of 1 KiB for /data; all 1000 rows for /grp/packed.
    data_line = next(line for line in text.splitlines() if line.startswith("/data"))
    assert "1024 (1.00 MiB)" in data_line
    packed_line = next(line for line in text.splitlines() if line.startswith("/grp/packed"))
    assert re.search(r"\b1000 \(", packed_line)


def test_info_missing_file(tmp_path):
    out = run_cli("info", str(tmp_path / "nope.h5"), cwd=str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: no such file: {tmp_path / 'nope.h5'}"


def test_info_says_what_a_default_queue_leaves_to_get_remainder(sample, tmp_path):
    out = run_cli("info", sample, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "remainder" in lines[0]
    # /data: 2048 rows in blocks of 1024 leave none.
    data = next(line for line in lines if line.startswith("/data"))
    assert data.rstrip().endswith("0 rows")
    assert "get_remainder" in out.stdout and "remainder=True" in out.stdout


def test_info_remainder_of_a_dataset_that_leaves_rows(tmp_path):
    filename = str(tmp_path / "odd.h5")
    with h5py.File(filename, "w") as f:
        # 2500 rows of 1 KiB in chunks of 128 rows: blocks of 1024 rows leave 452.
        f.create_dataset("odd", data=np.zeros((2500, 256), np.float32), chunks=(128, 256))
    out = run_cli("info", filename, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    odd = next(line for line in out.stdout.splitlines() if line.startswith("/odd"))
    assert "1024 (1.00 MiB)" in odd and odd.rstrip().endswith("452 rows")


@pytest.mark.parametrize("path, message", [
    ("/nope", "error: no dataset '/nope' in {file}"),
    ("/grp", "error: '/grp' in {file} is a group, not a dataset"),
])
def test_bench_names_a_bad_path_in_our_words(sample, tmp_path, path, message):
    out = run_cli("bench", sample, path, "--rounds", "1", cwd=str(tmp_path))
    assert out.returncode != 0
    assert out.stderr.strip() == message.format(file=sample)
    assert "Unable to" not in out.stderr  # h5py's raw text


def test_bench_missing_file(tmp_path):
    out = run_cli("bench", str(tmp_path / "nope.h5"), "/x", cwd=str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: no such file: {tmp_path / 'nope.h5'}"


def test_bench_sample_file(tmp_path):
    out = run_cli("bench", "--size-mb", "4", "--rounds", "1", "--n-procs", "1", "--json",
                  str(tmp_path / "out.json"), cwd=str(tmp_path), timeout=110)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for name in ("h5py read_direct", "Streamer queue (n_procs=1)", "Streamer queue, first pass",
                 "Streamer generator (n_procs=1)", "Loader, shuffled epoch (n_procs=1)"):
        line = next(line for line in lines if line.startswith(name))
        assert MBS.search(line), line
    assert "(sample, removed)" in out.stdout
    assert "MB/s" in out.stderr  # progress: one line per phase when not on a terminal
    results = json.loads((tmp_path / "out.json").read_text())["results"]
    # The sample holds the same data stored plainly and with gzip.
    assert [(r["path"], r["filters"]) for r in results] == [("/data", "none"),
                                                            ("/data_gzip", "gzip(4)")]
    for result in results:
        readers = result["report"]["readers"]
        assert set(readers) == {"h5py read_direct", "Streamer queue (n_procs=1)",
                                "Streamer queue, first pass", "Streamer generator (n_procs=1)",
                                "Loader, shuffled epoch (n_procs=1)"}
        assert all(r["median_mb_per_s"] > 0 for r in readers.values())
        # Every reader delivered the whole dataset, remainder included (the Loader: an epoch).
        assert {r["bytes"][0] for r in readers.values()} == {result["nbytes"]}
    assert not [p for p in os.listdir(tmp_path) if p != "out.json"]


def test_bench_user_file_and_tune(sample, tmp_path):
    out = run_cli("bench", sample, "/data", "--rounds", "1", "--n-procs", "2", "--block-size",
                  "100", cwd=str(tmp_path), timeout=110)
    assert out.returncode == 0, out.stderr
    assert "block_size 100 rows" in out.stdout
    assert "Streamer generator (n_procs=2)" in out.stdout
    out = run_cli("tune", sample, "/data", "--rounds", "1", "--max-procs", "2", "--block-sizes",
                  "128", "512", cwd=str(tmp_path), timeout=110)
    assert out.returncode == 0, out.stderr
    assert "n_procs=1" in out.stdout and "n_procs=2" in out.stdout
    assert re.search(r"best: block_size=(128|512) n_procs=[12]: [\d,]+ MB/s", out.stdout)
    # What to do with it: h5py or multitables, and the calls to make.
    assert re.search(r"start-up: a new queue's first block after [\d,]+ ms", out.stdout)
    assert re.search(r"plain h5py is the better choice|multitables is [\d.]+x plain h5py",
                     out.stdout)
    assert re.search(r"get_queue\('/data', n_procs=[12], block_size=(128|512), read_ahead=[35]\)",
                     out.stdout)


def test_bench_needs_file_and_path(sample, tmp_path):
    out = run_cli("bench", sample, cwd=str(tmp_path))
    assert out.returncode != 0
    assert "FILE and PATH" in out.stderr


def test_info_names_a_virtual_dataset_and_its_sources_filters(tmp_path):
    """A virtual dataset of gzip sources showed as unfiltered with 0.0 MB stored."""
    import h5py
    layout = h5py.VirtualLayout(shape=(400, 8), dtype="f4")
    stored = 0
    for i in range(2):
        name = str(tmp_path / f"part{i}.h5")
        with h5py.File(name, "w") as f:
            ds = f.create_dataset("x", data=np.random.default_rng(i).random((200, 8), "f4"),
                                  chunks=(50, 8), compression="gzip")
            stored += ds.id.get_storage_size()
        layout[i * 200:(i + 1) * 200] = h5py.VirtualSource(name, "x", shape=(200, 8))
    with h5py.File(tmp_path / "vds.h5", "w") as f:
        f.create_virtual_dataset("v", layout)
    out = run_cli("info", str(tmp_path / "vds.h5"), cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("/v"))
    assert "virtual, 2 sources: gzip(4)" in line
    assert f"{stored / 1e6:,.1f} MB" in line


def test_info_says_where_the_loaders_default_shuffle_is_not_uniform(tmp_path):
    path = str(tmp_path / "mixed.h5")
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=np.zeros((1000, 4), "f4"), chunks=(100, 4))
        f.create_dataset("gz", data=np.zeros((1000, 4), "f4"), chunks=(100, 4),
                         compression="gzip")
    out = run_cli("info", path, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    training = out.stdout.split("default shuffle is uniform on unfiltered data):")[1]
    assert "/gz: the Loader's default shuffle here mixes windows of chunks" in training
    assert "/raw" not in training


def test_info_names_variable_length_rows(tmp_path):
    filename = str(tmp_path / "vlen.h5")
    with h5py.File(filename, "w") as f:
        f.create_dataset("tokens", (10,), h5py.vlen_dtype(np.int32))
        f.create_dataset("text", (10,), h5py.string_dtype())
        f.create_dataset("jpeg", (10,), h5py.vlen_dtype(np.uint8))
    out = run_cli("info", filename, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("/")}
    assert "vlen int32" in lines["/tokens"] and "vlen uint8" in lines["/jpeg"]
    assert "vlen str (utf-8)" in lines["/text"]
