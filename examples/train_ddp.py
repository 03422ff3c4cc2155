"""Data-parallel training from one HDF5 file: DistributedDataParallel fed by ``multitables``.

    torchrun --nproc_per_node=2 examples/train_ddp.py [--file F] [--epochs 2] [--batch-size 64]

On CPU the ranks talk through gloo (on one machine without a network: add
``--master_addr=127.0.0.1`` and set ``GLOO_SOCKET_IFNAME=lo``). Each rank builds a
``multitables.torch.Loader`` over the same file; its rank and world size come from
``torch.distributed`` (the default), so each rank reads only its share of every shuffled epoch,
and all ranks yield the same number of batches: DDP's gradient all-reduce steps in lock-step.

The features, labels and row numbers are three datasets of one file. Without ``--file`` (one
machine only), rank 0 writes the file in a temporary directory and tells the others its path; with
``--file`` (on a file system all ranks see), rank 0 writes it there if it is missing. Then a
barrier, then all read.

Half way through the last epoch rank 0 saves a checkpoint (model, optimizer, and the Loader's
``state_dict()``: the same on every rank, since it records the epoch and the batches played, not
the rank). The run trains on to the end, then restarts from the checkpoint, as a relaunched job
would, and checks that every rank plays exactly the batches it played after the checkpoint.
``--report FILE`` writes, per rank, the row numbers it saw and its step counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import multitables.torch

FEATURES, CLASSES = 32, 4
# A model this small trains fastest on one thread; the Loader's workers get the other cores.
torch.set_num_threads(1)


def write_data(path: str, rows: int, seed: int = 0) -> None:
    """``features`` (rows, 32) float32 in gzip chunks, ``labels`` int64 (a noisy linear rule of
    the features) and ``index``, each row's number, so that a batch says which rows it holds."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    w = rng.standard_normal((FEATURES, CLASSES), dtype=np.float32)
    noise = 0.5 * rng.standard_normal((rows, CLASSES), dtype=np.float32)
    labels = np.argmax(features @ w + noise, axis=1).astype(np.int64)
    partial = f"{path}.partial-{os.getpid()}"  # never a half-written file under the real name
    with h5py.File(partial, "w") as f:
        f.create_dataset("features", data=features, chunks=(min(rows, 256), FEATURES),
                         compression="gzip")
        f.create_dataset("labels", data=labels, chunks=(min(rows, 1024),))
        f.create_dataset("index", data=np.arange(rows, dtype=np.int64), chunks=(min(rows, 1024),))
    os.replace(partial, path)


class Run:
    """One training run on this rank: a DDP model, its optimizer and a Loader."""

    def __init__(self, args: argparse.Namespace):
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        self.model = DistributedDataParallel(
            nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES)))
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        # rank and world_size default to torch.distributed's: each rank gets its share.
        self.dataset = multitables.torch.Loader(
            args.file, {"x": "features", "y": "labels", "index": "index"}, args.batch_size,
            shuffle=True, seed=args.seed, drop_last=args.drop_last, n_procs=args.n_procs)
        self.loss_fn = nn.CrossEntropyLoss()

    def train(self, epochs: int, step: int = 0, after_step=None) -> list[dict]:
        """Train to the end of epoch ``epochs - 1``; per epoch played, the rows and the steps.

        The first epoch is the one the Loader stands in (the rest of it, if resumed), and
        ``step`` the number of its first batch. ``after_step(epoch, step)`` runs after each step.
        """
        played = []
        loader = DataLoader(self.dataset, batch_size=None)  # the Loader makes the batches
        for epoch in range(self.dataset.state_dict()["epoch"], epochs):
            rows, steps, total = [], 0, 0.0
            for batch in loader:
                self.optimizer.zero_grad()
                loss = self.loss_fn(self.model(batch["x"]), batch["y"])
                loss.backward()  # DDP all-reduces the gradients: every rank must step
                self.optimizer.step()
                rows.append(batch["index"].tolist())
                steps, total = steps + 1, total + loss.item()
                if after_step is not None:
                    after_step(epoch, step)
                step += 1
            played.append({"epoch": epoch, "rows": rows, "steps": steps})
            if dist.get_rank() == 0:
                print(f"epoch {epoch}: {steps} steps a rank, mean loss on rank 0 "
                      f"{total / max(steps, 1):.4f}", flush=True)
            step = 0
        return played

    def close(self) -> None:
        self.dataset.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", help="HDF5 file (rank 0 writes it if missing; default: a new file "
                   "in a temporary directory)")
    p.add_argument("--rows", type=int, default=8192, help="rows of a written file (8192)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="rows per batch on each rank")
    p.add_argument("--drop-last", action="store_true",
                   help="drop the rows that do not fill a batch on every rank (no row repeats)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the shuffle")
    p.add_argument("--n-procs", type=int, default=None,
                   help="each rank's Loader worker processes (default: the Loader's choice)")
    p.add_argument("--report", metavar="FILE",
                   help="write the rows and steps of every rank as JSON (rank 0 writes it)")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return run(args, tmp)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace, tmp: str) -> int:
    rank = dist.get_rank()
    if rank == 0:
        args.file = args.file or os.path.join(tmp, "train.h5")
        if not os.path.exists(args.file):
            write_data(args.file, args.rows, args.seed)
            print(f"wrote {args.file}: features ({args.rows}, {FEATURES}), labels, index",
                  flush=True)
    shared = [args.file, os.path.join(tmp, "checkpoint.pt")]
    dist.broadcast_object_list(shared, src=0)  # also the barrier: the file is written
    args.file, checkpoint = shared
    with h5py.File(args.file, "r") as f:
        n_rows = len(f["index"])

    # ---- the uninterrupted run, with a checkpoint half way through its last epoch
    first = Run(args)
    if len(first.dataset) < 2:
        first.close()
        raise SystemExit(f"{args.file}: {n_rows} rows make {len(first.dataset)} batch(es) of "
                         f"{args.batch_size} a rank; resuming mid-epoch needs at least 2")
    at = (args.epochs - 1, len(first.dataset) // 2 - 1)  # save after this (epoch, step)

    def save(epoch: int, step: int) -> None:
        if (epoch, step) == at and rank == 0:
            torch.save({"model": first.model.module.state_dict(),
                        "optimizer": first.optimizer.state_dict(),
                        "loader": first.dataset.state_dict(), "step": step + 1}, checkpoint)

    try:
        played = first.train(args.epochs, after_step=save)
        final = [t.clone() for t in first.model.module.state_dict().values()]
    finally:
        first.close()
    dist.barrier()  # the checkpoint is on disk

    # ---- a relaunched job: every rank starts from rank 0's checkpoint
    state = torch.load(checkpoint)
    resumed_run = Run(args)
    try:
        resumed_run.model.module.load_state_dict(state["model"])
        resumed_run.optimizer.load_state_dict(state["optimizer"])
        resumed_run.dataset.load_state_dict(state["loader"])
        resumed = resumed_run.train(args.epochs, step=state["step"])
        weights = max((t - u).abs().max().item() for t, u in zip(
            resumed_run.model.module.state_dict().values(), final, strict=True))
    finally:
        resumed_run.close()
    after_checkpoint = played[-1]["rows"][state["step"]:]
    same = resumed[0]["rows"] == after_checkpoint and len(resumed) == 1

    mine = {"rank": rank, "epochs": played, "checkpoint_step": state["step"],
            "resumed": resumed, "resumed_is_the_rest": same, "weight_difference": weights}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    ok = all(r["resumed_is_the_rest"] and r["weight_difference"] < 1e-5 for r in everyone)
    if rank == 0:
        steps = [[e["steps"] for e in r["epochs"]] for r in everyone]
        print(f"steps per epoch on each rank: {steps}")
        print(f"resumed after step {state['step']} of epoch {at[0]}: "
              f"{[r['resumed'][0]['steps'] for r in everyone]} steps on each rank, "
              f"{'the same batches as' if ok else 'DIFFERENT from'} the uninterrupted run; "
              f"largest weight difference {max(r['weight_difference'] for r in everyone):.3g}",
              flush=True)
        if args.report:
            with open(args.report, "w") as f:
                json.dump({"world_size": dist.get_world_size(), "rows": n_rows,
                           "batch_size": args.batch_size, "drop_last": args.drop_last,
                           "ranks": everyone}, f)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
