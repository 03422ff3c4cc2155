"""The HDF5 file that the front doors read over HTTP and S3 in these tests, and its truth."""

from __future__ import annotations

import h5py
import numpy as np

H5_NAME = "remote.h5"
N = 1000


def write_remote_h5(path: str) -> dict[str, np.ndarray]:
    """Small (about 2 MB) and made for every read path: ``x`` unfiltered in whole-row chunks
    (ranged GETs into shared memory), ``gz`` gzip+shuffle in whole-row chunks (fetched and
    decoded), ``label`` contiguous, ``table`` a compound table, ``wide`` chunked across rows (left
    to HDF5). ``N`` rows each, a prime-ish chunk length so that blocks cut chunks."""
    rng = np.random.default_rng(19)
    truth = {
        "x": rng.random((N, 64), dtype=np.float32),
        "gz": rng.integers(0, 50, (N, 32), dtype=np.int32),
        "label": np.arange(N, dtype=np.int64) * 7,
        "table": np.array([(i, i / 3) for i in range(N)], [("a", "<i4"), ("b", "<f8")]),
        "wide": rng.random((N, 40)),
    }
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=truth["x"], chunks=(37, 64))
        f.create_dataset("gz", data=truth["gz"], chunks=(53, 32), compression="gzip",
                         shuffle=True)
        f.create_dataset("label", data=truth["label"])
        f.create_dataset("table", data=truth["table"], chunks=(64,))
        f.create_dataset("wide", data=truth["wide"], chunks=(100, 8))
    return truth
