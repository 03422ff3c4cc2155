"""Test files written the way users write them (h5py and PyTables), and their ground truth."""

from __future__ import annotations

import collections

import h5py
import numpy as np

N_ROWS = 97  # prime: most block sizes leave a remainder


def sample(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    return rng.normal(size=shape).astype(dtype)


def write_h5py(path, name, data, **create_kwargs) -> np.ndarray:
    with h5py.File(path, "a") as f:
        f.create_dataset(name, data=data, **create_kwargs)
    return data


TABLE_DTYPE = np.dtype([("image", "u1", (4, 4)), ("vec", "<f8", (3,)), ("score", "<f4")])


def write_pytables(path) -> dict[str, np.ndarray]:
    """A Table, an Array, a compressed CArray and an EArray, as PyTables writes them."""
    import tables

    rng = np.random.default_rng(1)
    rows = np.zeros(N_ROWS, TABLE_DTYPE)
    rows["image"] = rng.integers(0, 255, (N_ROWS, 4, 4))
    rows["vec"] = rng.normal(size=(N_ROWS, 3))
    rows["score"] = rng.normal(size=N_ROWS)
    array = sample((N_ROWS, 6), "f8", 2)
    carray = sample((N_ROWS, 5, 2), "i4", 3)
    earray = sample((N_ROWS, 7), "f4", 4)
    filters = tables.Filters(complevel=4, complib="zlib", shuffle=True)
    with tables.open_file(str(path), "w") as f:
        table = f.create_table("/", "table", description=TABLE_DTYPE, chunkshape=(10,))
        table.append(rows)
        f.create_array("/", "array", array)
        f.create_carray("/", "carray", obj=carray, filters=filters, chunkshape=(8, 5, 2))
        e = f.create_earray("/", "earray", tables.Float32Atom(), (0, 7), chunkshape=(16, 7))
        e.append(earray)
    return {"table": rows, "array": array, "carray": carray, "earray": earray}


def block_counter(blocks) -> collections.Counter:
    """Blocks as a multiset, compared by dtype, shape and bytes."""
    return collections.Counter((b.dtype.str, b.shape, b.tobytes()) for b in blocks)


def expected_blocks(truth: np.ndarray, block_size: int, remainder: bool) -> list[np.ndarray]:
    n = len(truth)
    stop = n if remainder else n - n % block_size
    return [truth[i : min(i + block_size, stop)] for i in range(0, stop, block_size)]


def cyclic_block(truth: np.ndarray, block_size: int, ticket: int) -> np.ndarray:
    rows = (ticket * block_size + np.arange(block_size)) % len(truth)
    return truth[rows]
