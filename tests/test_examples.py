"""The training examples run and do what they print: one process, and two gloo ranks (torchrun)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytest.importorskip("torch")

from helpers import REPO

EXAMPLES = os.path.join(REPO, "examples")


def run(argv: list[str], timeout: float) -> str:
    """Run ``argv`` in the repository in a new process group; its stdout if it exits with 0.

    Fails the test, never hangs it: at ``timeout`` the whole group (torchrun, its ranks and
    their Loader workers) is killed.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(argv)} ran past {timeout} s; its output:\n{out}")
    finally:
        if proc.poll() is None:  # an exception on the way (e.g. Ctrl-C): leave no process
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"{' '.join(argv)} exited with {proc.returncode}:\n{out}"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_train_torch_resumes_with_the_same_batches(tmp_path):
    path = tmp_path / "train.h5"
    rows, batch = 2000, 64
    out = run([sys.executable, os.path.join(EXAMPLES, "train_torch.py"), "--file", str(path),
               "--rows", str(rows), "--epochs", "2", "--batch-size", str(batch),
               "--n-procs", "1"], timeout=90)
    with h5py.File(path, "r") as f:  # the file it wrote
        assert f["features"].shape == (rows, 32) and f["features"].dtype == np.float32
        assert f["features"].compression == "gzip"
        assert f["labels"].shape == (rows,) and f["labels"].dtype == np.int64
    n = -(-rows // batch)  # 32 batches an epoch, the last one short
    epochs = re.findall(r"^epoch (\d+): batches (\d+)-(\d+) of (\d+), mean loss ([\d.]+)$", out,
                        re.M)
    # Two whole epochs, then the resumed run: the second half of the last epoch.
    assert [e[:4] for e in epochs] == [("0", "0", str(n - 1), str(n)),
                                       ("1", "0", str(n - 1), str(n)),
                                       ("1", str(n // 2), str(n - 1), str(n))], out
    assert float(epochs[1][4]) < float(epochs[0][4]), out  # it learns
    assert f"checkpoint saved after batch {n // 2 - 1} of epoch 1 ({n} batches of {batch}" in out
    assert (f"resumed run: {n - n // 2} batches, identical to the {n - n // 2} batches the "
            "uninterrupted run played after the checkpoint") in out
    weight = re.search(r"largest weight difference from the uninterrupted run (\S+)", out)
    assert weight and float(weight[1]) == 0.0, out
    accuracies = [float(a) for a in re.findall(r"accuracy ([\d.]+)", out)]
    assert len(accuracies) == 2 and accuracies[0] == accuracies[1] > 0.5, out  # chance: 0.25


@pytest.mark.timeout(150)
def test_train_ddp_two_gloo_ranks_get_disjoint_shares_in_lock_step(tmp_path):
    # drop_last: shares are disjoint and batches full. (Without it the ranks cover the epoch
    # with a little padding: test_loader checks that; one torchrun run here costs ~10 s.)
    rows, batch, world = 2000, 32, 2
    report = tmp_path / "report.json"
    out = run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               os.path.join(EXAMPLES, "train_ddp.py"), "--file", str(tmp_path / "train.h5"),
               "--rows", str(rows), "--batch-size", str(batch), "--epochs", "2",
               "--n-procs", "1", "--drop-last", "--report", str(report)], timeout=120)
    got = json.loads(report.read_text())
    ranks = got["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and got["rows"] == rows
    n = rows // (world * batch)  # 31 steps an epoch on each rank; 16 rows dropped
    orders = []
    for epoch in range(2):
        shares = [r["epochs"][epoch] for r in ranks]
        assert [s["epoch"] for s in shares] == [epoch, epoch]
        assert [s["steps"] for s in shares] == [n, n]  # lock-step: the same count on each rank
        assert all(len(b) == batch for s in shares for b in s["rows"])  # full batches only
        everything = np.concatenate([np.concatenate(s["rows"]) for s in shares])
        # Disjoint shares, no row twice, all rows real.
        assert len(np.unique(everything)) == len(everything) == n * world * batch
        assert set(everything.tolist()) <= set(range(rows))
        assert not np.array_equal(everything, np.sort(everything))  # shuffled
        orders.append(everything)
    assert not np.array_equal(orders[0], orders[1])  # a new order each epoch
    step = ranks[0]["checkpoint_step"]
    assert step == n // 2
    for r in ranks:  # the relaunched job plays, on each rank, exactly the rest of its epoch
        assert [e["epoch"] for e in r["resumed"]] == [1]
        assert r["resumed"][0]["rows"] == r["epochs"][1]["rows"][step:]
        assert r["resumed"][0]["steps"] == n - step
        assert r["resumed_is_the_rest"] and r["weight_difference"] == 0.0
    assert f"steps per epoch on each rank: {[[n, n], [n, n]]}" in out
    assert "the same batches as the uninterrupted run; largest weight difference 0" in out
