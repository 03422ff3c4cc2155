"""Train a small PyTorch model from an HDF5 file with ``multitables.torch.Loader``, and resume it.

    python examples/train_torch.py [--file data.h5] [--rows 8192] [--epochs 3] [--batch-size 64]

Features (N, 32) float32 in gzip chunks and integer labels are two datasets of one file (written
in a temporary directory unless ``--file`` names one; a missing ``--file`` is written there). The
Loader reads them into its own worker processes, shuffles them chunk-aware, and yields aligned
``(features, labels)`` batches of tensors that ``DataLoader(dataset, batch_size=None)`` passes
through as they are: ``num_workers=0`` is the right setting, since the Loader has its workers.

Half way through the last epoch the script saves a checkpoint (model, optimizer and the
Loader's ``state_dict()``) and trains on to the end. Then it starts again from the checkpoint
alone, as a restarted job would: a new model, a new optimizer and a new Loader, each loaded from
it. The resumed run plays exactly the batches the uninterrupted run played after the checkpoint,
and so ends with the same weights. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

import multitables.torch

FEATURES, CLASSES = 32, 4
# A model this small trains fastest on one thread; the Loader's workers get the other cores.
torch.set_num_threads(1)


def write_data(path: str, rows: int, seed: int = 0) -> None:
    """``features`` (rows, 32) float32 in gzip chunks; ``labels`` int64, a noisy linear rule of
    the features, so that a small model can learn it."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((rows, FEATURES), dtype=np.float32)
    w = rng.standard_normal((FEATURES, CLASSES), dtype=np.float32)
    noise = 0.5 * rng.standard_normal((rows, CLASSES), dtype=np.float32)
    labels = np.argmax(features @ w + noise, axis=1).astype(np.int64)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features, chunks=(min(rows, 256), FEATURES),
                         compression="gzip")
        f.create_dataset("labels", data=labels, chunks=(min(rows, 1024),))


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, 64), nn.ReLU(), nn.Linear(64, CLASSES))


def make_dataset(args: argparse.Namespace) -> multitables.torch.Loader:
    # Two datasets of one file, batches are (features, labels) tuples, aligned row for row.
    return multitables.torch.Loader(args.file, ["features", "labels"], args.batch_size,
                                    shuffle=True, seed=args.seed, n_procs=args.n_procs)


def train(model, optimizer, dataset, epochs: int, played: list, step: int = 0,
          after_step=None) -> None:
    """Train to the end of epoch ``epochs - 1``, appending the batches to ``played``.

    Each iteration of the DataLoader plays the Loader's next epoch; its state says which, and a
    resumed Loader plays the rest of the epoch it was saved in first. ``step`` is the number of
    the first batch (not 0 when resuming mid-epoch). ``after_step(epoch, step)`` runs after each
    optimizer step.
    """
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=None)  # the Loader makes the batches
    for epoch in range(dataset.state_dict()["epoch"], epochs):
        total = count = 0.0
        first = step
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            played.append((x, y))
            total, count = total + loss.item() * len(y), count + len(y)
            if after_step is not None:
                after_step(epoch, step)
            step += 1
        print(f"epoch {epoch}: batches {first}-{step - 1} of {len(dataset)}, "
              f"mean loss {total / count:.4f}")
        step = 0


def accuracy(model: nn.Module, path: str) -> float:
    with h5py.File(path, "r") as f, torch.no_grad():
        x, y = torch.from_numpy(f["features"][()]), torch.from_numpy(f["labels"][()])
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", help="HDF5 file to train from (written if missing; default: a "
                   "new file in a temporary directory)")
    p.add_argument("--rows", type=int, default=8192, help="rows of a written file (8192)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the shuffle")
    p.add_argument("--n-procs", type=int, default=None,
                   help="the Loader's worker processes (default: its own choice)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.file = args.file or os.path.join(tmp, "train.h5")
        if not os.path.exists(args.file):
            write_data(args.file, args.rows, args.seed)
            print(f"wrote {args.file}: features ({args.rows}, {FEATURES}) float32, gzip; "
                  f"labels ({args.rows},) int64")
        return run(args, os.path.join(tmp, "checkpoint.pt"))


def run(args: argparse.Namespace, checkpoint: str) -> int:
    # ---- the uninterrupted run, saving a checkpoint half way through its last epoch
    torch.manual_seed(args.seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    played: list = []
    with make_dataset(args) as dataset:
        if len(dataset) < 2:
            raise SystemExit(f"{args.file}: {len(dataset)} batch(es) of {args.batch_size} rows "
                             "an epoch; resuming mid-epoch needs at least 2")
        at = (args.epochs - 1, len(dataset) // 2 - 1)  # save after this (epoch, step)
        saved_after = 0

        def save(epoch: int, step: int) -> None:
            nonlocal saved_after
            if (epoch, step) == at:
                # The Loader's state is plain JSON-serialisable data: where its next iteration
                # resumes (right after the batch just played), and the settings it needs.
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "loader": dataset.state_dict(), "step": step + 1}, checkpoint)
                saved_after = len(played)

        train(model, optimizer, dataset, args.epochs, played, after_step=save)
        n_batches = len(dataset)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    uninterrupted = played[saved_after:]
    print(f"uninterrupted run: accuracy {accuracy(model, args.file):.3f}; checkpoint saved "
          f"after batch {at[1]} of epoch {at[0]} ({n_batches} batches of {args.batch_size} rows "
          f"an epoch)")

    # ---- a restarted job: everything from the checkpoint, nothing from the run above
    state = torch.load(checkpoint)
    model = make_model()
    model.load_state_dict(state["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.load_state_dict(state["optimizer"])
    resumed: list = []
    with make_dataset(args) as dataset:
        dataset.load_state_dict(state["loader"])
        train(model, optimizer, dataset, args.epochs, resumed, step=state["step"])
    same = len(resumed) == len(uninterrupted) and all(
        torch.equal(x, u) and torch.equal(y, v)
        for (x, y), (u, v) in zip(resumed, uninterrupted, strict=True))
    weights = max((model.state_dict()[k] - v).abs().max().item() for k, v in final.items())
    print(f"resumed run: {len(resumed)} batches, "
          f"{'identical to' if same else 'DIFFERENT from'} the {len(uninterrupted)} batches the "
          f"uninterrupted run played after the checkpoint")
    print(f"resumed run: accuracy {accuracy(model, args.file):.3f}; largest weight difference "
          f"from the uninterrupted run {weights:.3g}")
    return 0 if same and weights < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
