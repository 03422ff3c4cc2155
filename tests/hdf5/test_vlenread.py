"""Variable-length rows read from the global heap past HDF5 must equal h5py's reading, and only
plain layouts and types qualify; a damaged heap is an OSError naming the file, dataset and row."""

from __future__ import annotations

import struct

import h5py
import numpy as np
import pytest
import tables

from multitables._hdf5.vlenread import VlenRows

N = 53
KINDS = {
    "int32": h5py.vlen_dtype(np.int32),
    "uint8": h5py.vlen_dtype(np.uint8),
    "float64": h5py.vlen_dtype(np.float64),
    "int16": h5py.vlen_dtype(np.int16),
    "float16": h5py.vlen_dtype(np.float16),
    "utf8": h5py.string_dtype(),
    "ascii": h5py.string_dtype("ascii"),
    "opaque": h5py.vlen_dtype(np.dtype("V1")),
    "opaque4": h5py.vlen_dtype(np.dtype("V4")),
}


def values(kind: str, n: int = N, seed: int = 0) -> list:
    """Rows of ``kind``, some of them empty."""
    rng = np.random.default_rng(seed)
    out: list = []
    for i in range(n):
        size = 0 if i % 7 == 3 else int(rng.integers(1, 40))
        if kind in ("utf8", "ascii"):
            text = "".join(rng.choice(list("abcxyz" + ("é€" if kind == "utf8" else "")), size))
            out.append(text if kind == "utf8" else text.encode())
        elif kind == "opaque":
            out.append(np.frombuffer(rng.bytes(size), "V1"))
        elif kind == "opaque4":
            out.append(np.frombuffer(rng.bytes(4 * size), "V4"))
        else:
            out.append(rng.integers(0, 200, size).astype(KINDS[kind].metadata["vlen"]))
    return out


def write(path, kind: str, data: list | None = None, name: str = "v", **kwargs) -> list:
    data = values(kind) if data is None else data
    with h5py.File(path, "a") as f:
        ds = f.create_dataset(name, (len(data),), dtype=KINDS[kind], **kwargs)
        for i, value in enumerate(data):
            ds[i] = value
    return data


def assert_same(got: list, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert type(g) is type(w)
        if isinstance(w, bytes):
            assert g == w
        else:
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)


def orders(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [np.arange(n), np.arange(n)[::-1], rng.integers(0, n, 3 * n), rng.permutation(n),
            np.array([5, 5, 5, 0, n - 1, 0]), np.array([-1, -n, 2]), np.array([], np.int64)]


def check(ds: h5py.Dataset) -> None:
    """``take`` equals h5py's reading of ``ds`` for every order of rows."""
    rows = VlenRows.of(ds)
    assert rows is not None
    truth = [ds[i] for i in range(ds.shape[0])]
    for order in orders(ds.shape[0]):
        assert_same(rows.take(order), [truth[i] for i in order.tolist()])


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("kwargs", [{}, {"chunks": (7,)}, {"chunks": (100,), "maxshape": (None,)}])
def test_equals_h5py(tmp_path, kind, kwargs):
    write(tmp_path / "v.h5", kind, **kwargs)
    with h5py.File(tmp_path / "v.h5", "r") as f:
        check(f["v"])


@pytest.mark.parametrize("kwargs", [{"compression": "gzip"}, {"shuffle": True, "chunks": (8,)},
                                    {"compression": "lzf"}])
def test_filtered_chunks_fall_back(tmp_path, kwargs):
    write(tmp_path / "v.h5", "int32", **kwargs)
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert VlenRows.of(f["v"]) is None


def test_rows_are_their_own_objects(tmp_path):
    write(tmp_path / "v.h5", "int32")
    with h5py.File(tmp_path / "v.h5", "r") as f:
        got = VlenRows.of(f["v"]).take(np.array([0, 0, 1]))
        before = f["v"][0].copy()
        got[0][:] = -1
        np.testing.assert_array_equal(got[1], before)
        np.testing.assert_array_equal(VlenRows.of(f["v"]).take(np.array([0]))[0], before)


@pytest.mark.parametrize("kind", ["int32", "utf8"])
@pytest.mark.parametrize("kwargs", [{}, {"chunks": (64,), "maxshape": (None,)}])
def test_rows_never_written(tmp_path, kind, kwargs):
    """Rows the file holds no value for are null references (address 0), read as empty."""
    data = values(kind, 10)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        ds = f.create_dataset("v", (N,), dtype=KINDS[kind], **kwargs)
        ds[3:13] = np.array(data, dtype=object)
    with h5py.File(tmp_path / "v.h5", "r") as f:
        check(f["v"])
        assert_same(VlenRows.of(f["v"]).take(np.array([0, 40])), [f["v"][0], f["v"][40]])


def test_unallocated_data_falls_back(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("contiguous", (N,), dtype=KINDS["int32"])
        f.create_dataset("chunked", (N,), dtype=KINDS["int32"], chunks=(8,))[0] = [1, 2]
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert VlenRows.of(f["contiguous"]) is None
        assert VlenRows.of(f["chunked"]) is None


def test_other_files_fall_back(tmp_path):
    write(tmp_path / "v.h5", "int32")
    with h5py.File(tmp_path / "v.h5", "r+") as f:  # a writer's heap may be in HDF5's cache
        assert VlenRows.of(f["v"]) is None
    with h5py.File(tmp_path / "v.h5", "r", driver="core") as f:
        assert VlenRows.of(f["v"]) is None
    with open(tmp_path / "v.h5", "rb") as raw, h5py.File(raw, "r") as f:
        assert VlenRows.of(f["v"]) is None
    fcpl = h5py.h5p.create(h5py.h5p.FILE_CREATE)
    fcpl.set_sizes(4, 4)  # 4-byte addresses: references of 12 bytes
    h5py.File(h5py.h5f.create(bytes(tmp_path / "small.h5"), fcpl=fcpl)).close()
    write(tmp_path / "small.h5", "int32")
    with h5py.File(tmp_path / "small.h5", "r") as f:
        assert VlenRows.of(f["v"]) is None
        assert len(f["v"][:]) == N


def test_userblock(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w", userblock_size=1024):
        pass
    write(tmp_path / "v.h5", "utf8")
    write(tmp_path / "v.h5", "int32", name="k", chunks=(5,))
    with h5py.File(tmp_path / "v.h5", "r") as f:
        check(f["v"])
        check(f["k"])


def test_pytables_vlarrays(tmp_path):
    rng = np.random.default_rng(2)
    with tables.open_file(tmp_path / "t.h5", "w") as t:
        arrays = {
            "u1": t.create_vlarray("/", "u1", tables.UInt8Atom()),
            "i4": t.create_vlarray("/", "i4", tables.Int32Atom()),
            "s": t.create_vlarray("/", "s", tables.VLStringAtom()),
            "big": t.create_vlarray("/", "big", tables.Int32Atom(), byteorder="big"),
        }
        for i in range(N):
            size = 0 if i % 5 == 0 else int(rng.integers(1, 30))
            arrays["u1"].append(rng.integers(0, 255, size).astype(np.uint8))
            arrays["i4"].append(rng.integers(-9, 9, size).astype(np.int32))
            arrays["s"].append(rng.bytes(size))
            arrays["big"].append(np.arange(size, dtype=">i4"))
    with h5py.File(tmp_path / "t.h5", "r") as f:
        for name in ("u1", "i4", "s"):
            check(f[name])
        # h5py 3.16 returns a big-endian base's elements unconverted, labelled native: such a
        # dataset is left to h5py, so that both paths agree.
        assert VlenRows.of(f["big"]) is None


def test_big_endian_base_falls_back(tmp_path):
    with h5py.File(tmp_path / "v.h5", "w") as f:
        ds = f.create_dataset("v", (4,), dtype=h5py.vlen_dtype(np.dtype(">i4")))
        ds[0] = np.arange(3)
    with h5py.File(tmp_path / "v.h5", "r") as f:
        assert VlenRows.of(f["v"]) is None


def test_a_truncated_file_raises(tmp_path):
    path = tmp_path / "v.h5"
    write(path, "int32")
    with h5py.File(path, "r") as f:
        rows = VlenRows.of(f["v"])
        rows.take(np.array([0, 1]))
        with open(path, "r+b") as raw:
            raw.truncate(path.stat().st_size // 2)
        with pytest.raises(OSError, match="shorter than when it was mapped"):
            rows.take(np.array([0, 1]))


def test_out_of_bounds(tmp_path):
    write(tmp_path / "v.h5", "int32")
    with h5py.File(tmp_path / "v.h5", "r") as f:
        with pytest.raises(IndexError, match=f"index {N} is out of bounds for axis 0 with size"):
            VlenRows.of(f["v"]).take(np.array([0, N]))


# ---- damaged files ---------------------------------------------------------------------------


def damage(path, change) -> tuple[int, int]:
    """Apply ``change(raw, reference offset of row 0, heap collection's file offset)``."""
    with h5py.File(path, "r") as f:
        at = f["v"].id.get_offset()
    raw = bytearray(path.read_bytes())
    _, address, _ = struct.unpack_from("<IQI", raw, at)
    change(raw, at, address)
    path.write_bytes(bytes(raw))
    return at, address


def read_both(path, rows):
    """h5py's reading and ours, each a value or the exception it raised."""
    out = []
    with h5py.File(path, "r") as f:
        for read in (lambda: [f["v"][i] for i in rows], lambda: VlenRows.of(f["v"]).take(rows)):
            try:
                out.append(read())
            except Exception as e:  # noqa: BLE001 - compared below
                out.append(e)
    return out


def test_nul_in_a_string_cuts_it_as_in_h5py(tmp_path):
    path = tmp_path / "v.h5"
    write(path, "utf8", ["abcdef", "", "xyz"])
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"abcdef") + 2] = 0
    path.write_bytes(bytes(raw))
    theirs, ours = read_both(path, np.array([0, 1, 2]))
    assert ours == theirs == [b"ab", b"", b"xyz"]


def test_null_address_with_a_length_reads_empty(tmp_path):
    path = tmp_path / "v.h5"
    write(path, "int32", [np.arange(3, dtype=np.int32)] * 3)
    damage(path, lambda raw, at, a: struct.pack_into("<IQI", raw, at + 16, 5, 0, 7))
    theirs, ours = read_both(path, np.array([0, 1]))
    assert_same(ours, theirs)


def test_undefined_address_raises_as_in_h5py(tmp_path):
    path = tmp_path / "v.h5"
    write(path, "int32", [np.arange(3, dtype=np.int32)] * 3)
    damage(path, lambda raw, at, a: struct.pack_into("<IQI", raw, at + 16, 3, 2**64 - 1, 1))
    theirs, ours = read_both(path, np.array([1]))
    assert isinstance(theirs, OSError) and isinstance(ours, OSError)
    with h5py.File(path, "r") as f, pytest.raises(OSError, match=r"v.h5, dataset /v: row 1 .*"
                                                  "past the end of the file"):
        VlenRows.of(f["v"]).take(np.array([0, 1]))


@pytest.mark.parametrize("change, message", [
    (lambda raw, at, a: raw.__setitem__(slice(a, a + 4), b"GCOX"), "no GCOL version 1 signature"),
    (lambda raw, at, a: raw.__setitem__(a + 4, 2), "no GCOL version 1 signature"),
    (lambda raw, at, a: struct.pack_into("<Q", raw, a + 8, 2**40), "past the end of the file"),
    (lambda raw, at, a: struct.pack_into("<Q", raw, a + 24, 2**62), "damaged object header"),
    (lambda raw, at, a: struct.pack_into("<Q", raw, a + 24, 8), "damaged object header"),
    (lambda raw, at, a: struct.pack_into("<I", raw, at + 12, 9), "holds no such object"),
    (lambda raw, at, a: struct.pack_into("<I", raw, at, 4), "holds 4 elements of 4 bytes but "
                                                            "its heap object holds 12 bytes"),
    (lambda raw, at, a: struct.pack_into("<Q", raw, at + 4, a + 8), "no GCOL"),
])
def test_damaged_heap(tmp_path, change, message):
    path = tmp_path / "v.h5"
    write(path, "int32", [np.arange(3, dtype=np.int32), np.arange(5, dtype=np.int32)])
    damage(path, change)
    with h5py.File(path, "r") as f:
        rows = VlenRows.of(f["v"])
        with pytest.raises(OSError, match=f"v.h5, dataset /v: .*{message}"):
            rows.take(np.array([1, 0]))


def test_damage_found_after_a_good_read_still_raises(tmp_path):
    """A row naming an object the parsed collection lacks is an error, not a stale value."""
    path = tmp_path / "v.h5"
    write(path, "int32", [np.arange(3, dtype=np.int32), np.arange(5, dtype=np.int32)])
    damage(path, lambda raw, at, a: struct.pack_into("<I", raw, at + 16 + 12, 40))
    with h5py.File(path, "r") as f:
        rows = VlenRows.of(f["v"])
        assert_same(rows.take(np.array([0])), [np.arange(3, dtype=np.int32)])
        with pytest.raises(OSError, match="row 1 names object 40"):
            rows.take(np.array([0, 1]))


def test_heap_tables_serve_every_open_of_an_unchanged_file(tmp_path):
    """A worker reopens its file each epoch: the heap collections parsed before are kept for
    the same file, not for one written since."""
    path = str(tmp_path / "again.h5")
    rows = [np.arange(i % 11, dtype=np.int32) for i in range(N)]
    with h5py.File(path, "w") as f:
        f.create_dataset("a", (N,), h5py.vlen_dtype(np.int32))[:] = rows
        f.create_dataset("b", (N,), h5py.vlen_dtype(np.int32))[:] = rows[::-1]
    with h5py.File(path, "r") as f:
        first = VlenRows.of(f["a"])
        assert all(np.array_equal(r, e) for r, e in zip(first.take(np.arange(N)), rows,
                                                            strict=True))
        assert VlenRows.of(f["b"]).heaps is first.heaps  # one file, one set of collections
    with h5py.File(path, "r") as f:
        again = VlenRows.of(f["b"])
        assert again.heaps is first.heaps and again.heaps.used > 0
        assert all(np.array_equal(r, e) for r, e in zip(again.take(np.arange(N)), rows[::-1],
                                                            strict=True))
    with h5py.File(path, "a") as f:
        f["a"][0] = np.arange(5, dtype=np.int32) + 100
    with h5py.File(path, "r") as f:
        changed = VlenRows.of(f["a"])
        assert changed.heaps is not first.heaps
        assert np.array_equal(changed.take(np.array([0]))[0], np.arange(5) + 100)
