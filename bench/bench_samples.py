"""Images and text: the Loader's variable-length columns and transforms in its workers, against
one core's rate of the same work, torch's DataLoader, and the fixed-size Loader.

    python bench/bench_samples.py [--images 20000] [--sequences 200000] [--rounds 3]

**JPEG**: ``--images`` JPEG-encoded 128x128 RGB images (quality 90) in a variable-length uint8
dataset, with int64 labels. The transform decodes (simplejpeg, which decodes these about 1.9x
faster than Pillow here; Pillow when simplejpeg is missing), takes a random 112x112 crop and a
random flip, giving uint8 (112, 112, 3); its ``rng`` is the Loader's.
  - ``one core``: the transform over the images in this process, one after another (the rows
    read beforehand, one generator for all): the rate of the work itself. ``two processes at
    once``: the same loop in two processes at the same time, each over its own images: what
    the two cores give together, which may be less than twice one (cores that share a
    physical core or its caches, a host that runs other work).
  - ``mt Loader``: ``Loader(n_procs=2, batch_size=256, shuffle=True, transform=...)``, one
    Loader for all rounds, an epoch per round, timed from the start of the iteration.
  - ``torch DataLoader``: ``DataLoader(num_workers=2, batch_size=256, shuffle=True)`` over a
    Dataset whose ``__getitem__`` reads one row of each column with h5py (each worker opens the
    file itself, and makes one generator) and applies the same transform; timed from the start
    of the iteration.
**Tokens**: ``--sequences`` variable-length int32 sequences of 16-512 tokens; a shuffled Loader
whose ``batch_transform`` pads each batch to its longest sequence, in MB/s of tokens read,
against the fixed-size Loader over float32 rows of the same bytes (a dataset of rows of 264
floats, the sequences' mean, shuffled with the same batch size). Each round times
``--token-epochs`` epochs of each Loader in turn, after a first epoch of each (``first epoch``:
the workers start and map the files, and the tokens' workers locate each row's heap object).
  - ``tokens Loader, Pad``: ``batch_transform=multitables.Pad(-1)``, done by the Loader
    (``copy=True``: the workers hand the rows over packed, the caller's process pads them).
    ``tokens Loader, numpy pad``: the same padding written in numpy (``pad`` below).
    ``tokens Loader, lists``: no transform, each batch a list of 256 arrays.
  - ``padded / token bytes``: a padded batch is larger than its tokens (about twice, for
    lengths uniform in 16-512), and the caller's process writes every byte of it.
    ``tokens / (f32 x token/padded bytes)``: the tokens Loader against the fixed-size
    Loader's own rate applied to the padded bytes it delivers.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import sys
import time

import datafiles
import h5py
import numpy as np

import multitables

try:
    import simplejpeg
except ImportError:  # Pillow instead
    simplejpeg = None

SIDE, CROP, BATCH = 128, 112, 256


def encode(image: np.ndarray) -> bytes:
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(image, quality=90)
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decode(data: np.ndarray) -> np.ndarray:
    if simplejpeg is not None:
        return simplejpeg.decode_jpeg(data)
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data.tobytes())).convert("RGB"))


def augment(sample, rng):
    """Decode, a random 112x112 crop, a random horizontal flip."""
    image = decode(sample[0])
    y, x = rng.integers(0, SIDE - CROP + 1, 2)
    image = image[y : y + CROP, x : x + CROP]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    return np.ascontiguousarray(image), sample[1]


def pad(tokens):
    """Token sequences padded with -1 to the batch's longest, and their lengths (vectorised:
    one concatenation and one masked assignment, no loop over the rows)."""
    lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
    out = np.full((len(tokens), lengths.max()), -1, np.int32)
    out[np.arange(out.shape[1]) < lengths[:, None]] = np.concatenate(tokens)
    return out, lengths


# ---- files ----------------------------------------------------------------------------------


def image_file(directory: str, n: int) -> str:
    filename = os.path.join(directory, f"jpeg-{n}.h5")
    if os.path.exists(filename):
        return filename
    rng = np.random.default_rng(0)
    tmp = filename + ".tmp"
    with h5py.File(tmp, "w") as f:
        jpegs = f.create_dataset("jpeg", (n,), h5py.vlen_dtype(np.uint8), chunks=(min(1024, n),))
        f.create_dataset("label", data=rng.integers(0, 1000, n), chunks=(min(4096, n),))
        for start in range(0, n, 1000):
            k = min(1000, n - start)
            grey = datafiles.images(rng, 3 * k).reshape(k, 3, 64, 64)
            rgb = np.ascontiguousarray(grey.repeat(2, 2).repeat(2, 3).transpose(0, 2, 3, 1))
            jpegs[start : start + k] = [np.frombuffer(encode(im), np.uint8) for im in rgb]
    os.replace(tmp, filename)
    return filename


def token_files(directory: str, n: int) -> tuple[str, str]:
    """The token sequences, and float32 rows of the same bytes."""
    tokens, floats = (os.path.join(directory, f"{name}-{n}.h5") for name in ("tokens", "f32tok"))
    if os.path.exists(tokens) and os.path.exists(floats):
        return tokens, floats
    rng = np.random.default_rng(1)
    lengths = rng.integers(16, 513, n)
    with h5py.File(tokens + ".tmp", "w") as f:
        seqs = f.create_dataset("tokens", (n,), h5py.vlen_dtype(np.int32),
                                    chunks=(min(4096, n),))
        for start in range(0, n, 10_000):
            part = lengths[start : start + 10_000]
            seqs[start : start + len(part)] = [rng.integers(0, 50_000, k, dtype=np.int32)
                                               for k in part]
    row = 264
    with h5py.File(floats + ".tmp", "w") as f:
        f.create_dataset("x", data=rng.random((int(lengths.sum()) // row, row), np.float32))
    os.replace(tokens + ".tmp", tokens)
    os.replace(floats + ".tmp", floats)
    return tokens, floats


# ---- readers --------------------------------------------------------------------------------


class H5Images:
    """What a torch user writes: one row of each column per item, the file opened lazily."""

    def __init__(self, filename: str, n: int):
        self.filename, self.n, self.file, self.rng = filename, n, None, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.file is None:
            self.file = h5py.File(self.filename, "r")
            self.rng = np.random.default_rng()
        sample = (self.file["jpeg"][i], self.file["label"][i])
        return augment(sample, self.rng)


def one_core(filename: str, n: int, start: int = 0) -> float:
    """Images/s of the transform alone, in this process, with one generator for all."""
    with h5py.File(filename, "r") as f:
        jpegs, labels = f["jpeg"][start : start + n], f["label"][start : start + n]
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for i in range(n):
        augment((jpegs[i], labels[i]), rng)
    return n / (time.perf_counter() - t)


def _one_of_two(filename: str, n: int, start: int, out) -> None:
    out.put(one_core(filename, n, start))


def two_cores(filename: str, n: int) -> float:
    """Images/s of the transform in two processes at once, each over its own ``n`` images:
    what the two cores give together (the bound a Loader with two workers meets)."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_one_of_two, args=(filename, n, k * n, out)) for k in (0, 1)]
    for proc in procs:
        proc.start()
    rates = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return 2 * n / max(n / r for r in rates)


def epoch_rate(loader, units, epochs: int = 1) -> float:
    t = time.perf_counter()
    done = sum(units(batch) for _ in range(epochs) for batch in loader)
    return done / (time.perf_counter() - t)


def torch_epoch(filename: str, n: int) -> float:
    from torch.utils.data import DataLoader

    loader = DataLoader(H5Images(filename, n), batch_size=BATCH, shuffle=True, num_workers=2)
    return epoch_rate(loader, lambda batch: len(batch[1]))


def images_round(images: str, args, mt, note) -> None:
    """One round of the JPEG figures."""
    core = one_core(images, min(args.images, 4000))
    note("one core (images/s)", core)
    both = two_cores(images, min(args.images // 2, 4000))
    note("two processes at once (images/s)", both)
    note("two processes / (2 x one core)", both / (2 * core))
    loader = epoch_rate(mt, lambda batch: len(batch[1]))
    note("mt Loader (images/s)", loader)
    note("mt Loader / (2 x one core)", loader / (2 * core))
    note("mt Loader / two processes", loader / both)
    if not args.no_torch:
        torch = torch_epoch(images, args.images)
        note("torch DataLoader (images/s)", torch)
        note("mt Loader / torch", loader / torch)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--sequences", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--token-epochs", type=int, default=3,
                   help="shuffled epochs of each Loader a round times, after a first one")
    p.add_argument("--dir", default=datafiles.DEFAULT_DIR)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--only", choices=("images", "tokens"), help="run one of the two parts")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    print(f"decoder: {'simplejpeg' if simplejpeg is not None else 'Pillow'}; "
          f"medians of {args.rounds} rounds; 2 cores", file=sys.stderr)
    images = image_file(args.dir, args.images)
    tokens, floats = token_files(args.dir, args.sequences)
    rows: dict[str, list[float]] = {}

    def note(name: str, value: float) -> None:
        rows.setdefault(name, []).append(value)

    mt = multitables.Loader(images, ["jpeg", "label"], BATCH, shuffle=True, n_procs=2,
                            transform=augment)
    text = multitables.Loader(tokens, "tokens", BATCH, shuffle=True, n_procs=2,
                              batch_transform=multitables.Pad(-1))
    text_numpy = multitables.Loader(tokens, "tokens", BATCH, shuffle=True, n_procs=2,
                                    batch_transform=pad)
    text_lists = multitables.Loader(tokens, "tokens", BATCH, shuffle=True, n_procs=2)
    fixed = multitables.Loader(floats, "x", BATCH, shuffle=True, n_procs=2)
    sizes = [0, 0]  # bytes of tokens, of padded batches

    def tokens_of(batch) -> int:
        sizes[0] += int(batch[1].sum()) * 4
        sizes[1] += batch[0].nbytes
        return int(batch[1].sum()) * 4

    def tokens_round() -> None:
        token = epoch_rate(text, tokens_of, args.token_epochs) / 1e6
        note("tokens Loader, Pad (MB/s)", token)
        note("tokens Loader, numpy pad (MB/s)", epoch_rate(
            text_numpy, lambda batch: int(batch[1].sum()) * 4, args.token_epochs) / 1e6)
        note("tokens Loader, lists (MB/s)", epoch_rate(
            text_lists, lambda batch: sum(map(len, batch)) * 4, args.token_epochs) / 1e6)
        f32 = epoch_rate(fixed, lambda batch: batch.nbytes, args.token_epochs) / 1e6
        note("f32 Loader (MB/s)", f32)
        note("tokens / f32", token / f32)
        note("padded / token bytes", sizes[1] / sizes[0])
        note("tokens / (f32 x token/padded bytes)", token / (f32 * sizes[0] / sizes[1]))

    try:
        if args.only != "images":  # first epochs: the workers start, the files are mapped
            first = epoch_rate(text, tokens_of) / epoch_rate(fixed, lambda b: b.nbytes)
            note("first epoch: tokens / f32", first)
            epoch_rate(text_numpy, lambda batch: 0)
            epoch_rate(text_lists, lambda batch: 0)
        for r in range(args.rounds):
            if args.only != "tokens":
                images_round(images, args, mt, note)
            if args.only != "images":
                tokens_round()
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in rows.items()),
                  file=sys.stderr)
    finally:
        mt.close()
        text.close()
        text_numpy.close()
        text_lists.close()
        fixed.close()
    width = max(map(len, rows))
    for name, values in rows.items():
        print(f"{name:<{width}}  {statistics.median(values):10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
