"""Chunks decoded outside HDF5 equal h5py's reads byte for byte; anything unusual falls back."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multitables._hdf5 import codecs, decode, fallback, libraries
from multitables._hdf5.decode import ChunkDecoder
from multitables._hdf5.hyperslab import read_selection
from multitables._keys._indexing import translate

try:
    import hdf5plugin
except ImportError:  # pragma: no cover - the test extra installs it
    hdf5plugin = None

# Only what needs hdf5plugin's filters (Blosc, Blosc2, Zstd, LZ4, BZip2) is skipped without it.
needs_plugin = pytest.mark.skipif(hdf5plugin is None, reason="needs hdf5plugin")

COMPOUND = np.dtype([("a", "<i4"), ("b", ">f8"), ("c", "u1")])
DTYPES = [np.dtype(t) for t in ("u1", "<i2", "<f4", ">f8")] + [COMPOUND]
SHAPES = [(100,), (50, 7), (30, 4, 3)]  # lengths not a multiple of CHUNK_ROWS
CHUNK_ROWS = 8

FILTERS = {
    "gzip": dict(compression="gzip"),
    "gzip9-shuffle": dict(compression="gzip", compression_opts=9, shuffle=True),
    "gzip1-shuffle": dict(compression="gzip", compression_opts=1, shuffle=True),
    "shuffle": dict(shuffle=True),
    "lzf": dict(compression="lzf"),
    "lzf-shuffle": dict(compression="lzf", shuffle=True),
}
if hdf5plugin is not None:
    FILTERS.update({
        "blosc-lz4-shuffle": hdf5plugin.Blosc(cname="lz4", clevel=5,
                                              shuffle=hdf5plugin.Blosc.SHUFFLE),
        "blosc-zstd-bitshuffle": hdf5plugin.Blosc(cname="zstd", clevel=5,
                                                  shuffle=hdf5plugin.Blosc.BITSHUFFLE),
        "blosc-zlib-noshuffle": hdf5plugin.Blosc(cname="zlib", clevel=3,
                                                 shuffle=hdf5plugin.Blosc.NOSHUFFLE),
        "blosc2-zstd-shuffle": hdf5plugin.Blosc2(cname="zstd", clevel=5,
                                                 filters=hdf5plugin.Blosc2.SHUFFLE),
        "blosc2-lz4-bitshuffle": hdf5plugin.Blosc2(cname="lz4", clevel=5,
                                                   filters=hdf5plugin.Blosc2.BITSHUFFLE),
        "zstd": hdf5plugin.Zstd(clevel=3),
        "lz4": hdf5plugin.LZ4(nbytes=64),  # several blocks per chunk
    })


def _data(shape, dtype, seed=0):
    """Random-walk values (compressible) with some noise bytes, in any dtype."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(size=shape), axis=-1)
    if dtype.names:
        out = np.empty(shape, dtype)
        out["a"], out["b"], out["c"] = walk * 100, np.round(walk * 16) / 16, walk
        return out
    if dtype.kind == "f":
        return (np.round(walk * 16) / 16).astype(dtype)
    return (walk * 10).astype(dtype)


@pytest.fixture(scope="module")
def h5(tmp_path_factory):
    """One file holding every filter × dtype × shape combination."""
    path = tmp_path_factory.mktemp("decode") / "filters.h5"
    with h5py.File(path, "w") as f:
        for fname, opts in FILTERS.items():
            for dtype in DTYPES:
                for shape in SHAPES:
                    name = f"{fname}/{dtype.str if not dtype.names else 'compound'}/{len(shape)}d"
                    f.create_dataset(name, data=_data(shape, dtype),
                                     chunks=(CHUNK_ROWS, *shape[1:]), **opts)
    with h5py.File(path, "r") as f:
        yield f


def _names():
    return [f"{fname}/{dt.str if not dt.names else 'compound'}/{len(s)}d"
            for fname in FILTERS for dt in DTYPES for s in SHAPES]


def _read(decoder, ds, start, stop):
    """Rows start:stop through the decoder, or through h5py where it refuses them."""
    out = np.zeros((stop - start, *ds.shape[1:]), ds.dtype)
    if not decoder.read_rows(start, stop, out):
        # Only chunks HDF5 stored with a filter skipped (tiny chunks that did not compress),
        # or a partial last chunk stored at its raw size (see _stored_raw), are refused.
        assert any(_refusable(ds, k) for k in range(start // CHUNK_ROWS,
                                                    (stop - 1) // CHUNK_ROWS + 1))
        ds.read_direct(out, np.s_[start:stop])
    return out


def _refusable(ds, k):
    info = ds.id.get_chunk_info_by_coord((k * CHUNK_ROWS,) + (0,) * (ds.ndim - 1))
    last_partial = (k + 1) * CHUNK_ROWS > ds.shape[0]
    raw_size = CHUNK_ROWS * ds.dtype.itemsize * int(np.prod(ds.shape[1:]))
    return info.filter_mask != 0 or (last_partial and info.size == raw_size)


@pytest.mark.parametrize("name", _names())
def test_equals_h5py(h5, name):
    ds = h5[name]
    decoder = ChunkDecoder.of(ds)
    assert decoder is not None
    n = ds.shape[0]
    ranges = [(0, n), (0, 2 * CHUNK_ROWS), (CHUNK_ROWS, 3 * CHUNK_ROWS), (3, 21), (5, 6),
              (n - 1, n), (n - n % CHUNK_ROWS, n), (n - 11, n), (7, 9), (4, 4)]
    for start, stop in ranges:
        got = _read(decoder, ds, start, stop)
        want = ds[start:stop]
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes(), (name, start, stop)


def test_cached_per_dataset(h5):
    ds = h5["gzip/<f4/2d"]
    assert ChunkDecoder.of(ds) is ChunkDecoder.of(ds)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_range(h5, data):
    name = data.draw(st.sampled_from(_names()))
    ds = h5[name]
    n = ds.shape[0]
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    assert _read(ChunkDecoder.of(ds), ds, start, stop).tobytes() == ds[start:stop].tobytes()


def test_bad_arguments(h5):
    ds = h5["gzip/<f4/2d"]
    decoder = ChunkDecoder.of(ds)
    with pytest.raises(IndexError, match="out of bounds for axis 0 with size 50"):
        decoder.read_rows(40, 51, np.empty((11, 7), "f4"))
    with pytest.raises(ValueError, match="C-contiguous array of 56 bytes"):
        decoder.read_rows(0, 2, np.empty((2, 8), "f4"))
    with pytest.raises(ValueError, match="contiguous: False"):
        decoder.read_rows(0, 2, np.empty((2, 14), "f4")[:, ::2])


@pytest.fixture
def writable(tmp_path):
    with h5py.File(tmp_path / "fallback.h5", "w") as f:
        yield f


DATA = _data((40, 16), np.dtype("<f4"))


@pytest.mark.parametrize("opts", [
    dict(compression="gzip", fletcher32=True),
    dict(fletcher32=True),
    dict(scaleoffset=4),
    dict(compression="gzip", scaleoffset=4),
    dict(),  # no filters: rawread's business
    pytest.param("bzip2", marks=needs_plugin),
], ids=["gzip-fletcher32", "fletcher32", "scaleoffset", "scaleoffset-gzip", "none", "bzip2"])
def test_unsupported_filters(writable, opts):
    if opts == "bzip2":
        opts = hdf5plugin.BZip2()
    fallback.fallbacks.clear()
    ds = writable.create_dataset("d", data=DATA, chunks=(8, 16), **opts)
    assert ChunkDecoder.of(ds) is None
    # Declined, and said so, unless there is nothing to decode.
    reasons = list(fallback.fallbacks)
    assert reasons == [] if not opts else (len(reasons) == 1
                                           and reasons[0].startswith("declined: dataset")), reasons


def _twenty_bit_ints(f):
    """Integers of 20 bits in 4 bytes: HDF5 converts them to numpy's int32 as it reads."""
    tid = h5py.h5t.STD_I32LE.copy()
    tid.set_precision(20)
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((8, 16))
    dcpl.set_deflate(4)
    h5py.h5d.create(f.id, b"twenty", tid, h5py.h5s.create_simple((40, 16)), dcpl=dcpl)
    f["twenty"][...] = np.arange(640).reshape(40, 16)
    return f["twenty"]


def test_unsupported_layouts(writable):
    cases = [
        writable.create_dataset("rows", data=DATA, chunks=(8, 8), compression="gzip"),
        writable.create_dataset("contiguous", data=DATA),
        writable.create_dataset("scalar", data=1.0),
        _twenty_bit_ints(writable),
        writable.create_dataset("strings", data=["a", "bc"] * 8, chunks=(4,),
                                compression="gzip"),
    ]
    for ds in cases:
        assert ChunkDecoder.of(ds) is None, ds.name


def test_chunk_with_skipped_filter_falls_back(writable):
    ds = writable.create_dataset("d", data=DATA, chunks=(8, 16), compression="gzip",
                                 shuffle=True)
    # Chunk 2 stored shuffled but not compressed: bit 1 (deflate, the second filter) is set.
    shuffled = DATA[16:24].view(np.uint8).reshape(-1, 4).T.copy()
    ds.id.write_direct_chunk((16, 0), shuffled.tobytes(), filter_mask=0b10)
    assert ds.id.get_chunk_info_by_coord((16, 0)).filter_mask != 0
    decoder = ChunkDecoder.of(ds)
    out = np.zeros((40, 16), "f4")
    assert decoder.read_rows(0, 16, out[:16])
    assert decoder.read_rows(24, 40, out[24:])
    assert out[:16].tobytes() == DATA[:16].tobytes()
    sentinel = np.full((10, 16), 7, "f4")
    assert not decoder.read_rows(10, 20, sentinel)
    assert (sentinel == 7).all()  # checked before anything is written


def test_unallocated_chunks_fall_back(writable):
    ds = writable.create_dataset("d", shape=(40, 16), dtype="f4", chunks=(8, 16),
                                 compression="gzip", fillvalue=3.0)
    ds[0:8] = DATA[0:8]
    ds[24:32] = DATA[24:32]
    decoder = ChunkDecoder.of(ds)
    out = np.zeros((8, 16), "f4")
    assert decoder.read_rows(24, 32, out)
    assert out.tobytes() == DATA[24:32].tobytes()
    assert not decoder.read_rows(4, 12, np.zeros((8, 16), "f4"))
    assert not decoder.read_rows(32, 40, np.zeros((8, 16), "f4"))


def test_corrupt_chunk_falls_back(writable):
    ds = writable.create_dataset("d", data=DATA, chunks=(8, 16), compression="gzip")
    ds.id.write_direct_chunk((8, 0), b"not deflate data")
    decoder = ChunkDecoder.of(ds)
    assert decoder.read_rows(0, 8, np.zeros((8, 16), "f4"))
    assert not decoder.read_rows(0, 16, np.zeros((16, 16), "f4"))
    with pytest.raises(OSError):  # HDF5's own error, from the fallback
        ds[0:16]


def test_incompressible_chunks(writable):
    """Random bytes: LZ4 stores blocks as they are, deflate may store the chunk unfiltered."""
    noise = np.random.default_rng(1).integers(0, 256, (40, 64), dtype=np.uint8)
    cases = [("lzf", dict(compression="lzf")), ("gzip", dict(compression="gzip"))]
    if hdf5plugin is not None:
        cases.append(("lz4", hdf5plugin.LZ4(nbytes=100)))
    for name, opts in cases:
        ds = writable.create_dataset(name, data=noise, chunks=(8, 64), **opts)
        decoder = ChunkDecoder.of(ds)
        out = np.zeros((40, 64), np.uint8)
        if decoder.read_rows(0, 40, out):
            assert out.tobytes() == noise.tobytes(), name
        else:
            assert not decoder.ok.all(), name  # only chunks HDF5 stored unfiltered refuse


def test_partial_edge_chunk_stored_unfiltered(writable):
    """The last chunk of a file made with H5D_CHUNK_DONT_FILTER_PARTIAL_CHUNKS is raw."""
    data = DATA[:36]
    ds = writable.create_dataset("d", data=data, chunks=(8, 16), shuffle=True)
    padded = np.zeros((8, 16), "f4")
    padded[:4] = data[32:]
    ds.id.write_direct_chunk((32, 0), padded.tobytes())  # unshuffled, mask 0
    decoder = ChunkDecoder.of(ds)
    assert decoder.read_rows(0, 32, np.zeros((32, 16), "f4"))
    assert not decoder.read_rows(30, 36, np.zeros((6, 16), "f4"))


@needs_plugin
def test_blosc2_blocks_tiling_rows(writable):
    """Blosc2 blocks that cut rows in pieces (b2nd) are put back in row-major order."""
    import blosc2

    data = _data((300, 2048), np.dtype("<f4"))
    ds = writable.create_dataset("d", data=data, chunks=(128, 2048),
                                 **hdf5plugin.Blosc2(cname="lz4", clevel=5))
    raw = ds.id.read_direct_chunk((0, 0))[1]
    blocks = blosc2.schunk_from_cframe(raw, copy=False).meta["b2nd"][4]
    assert blocks[1] < 2048  # the layout under test
    decoder = ChunkDecoder.of(ds)
    for start, stop in [(0, 300), (5, 250), (256, 300)]:
        assert _read(decoder, ds, start, stop).tobytes() == data[start:stop].tobytes()



@needs_plugin
def test_blosc2_blocks_padding_the_chunk(writable):
    """Blosc2 blocks of whole rows that do not divide the chunk's rows pad it (b2nd): the
    padding rows are dropped. hdf5plugin picks blocks that divide; other writers may not."""
    import blosc2

    data = _data((300, 16), np.dtype("<f4"))
    ds = writable.create_dataset("d", shape=data.shape, dtype=data.dtype, chunks=(100, 16),
                                 **hdf5plugin.Blosc2(cname="lz4"))
    for k in range(3):
        rows = blosc2.asarray(data[k * 100 : (k + 1) * 100], chunks=(100, 16), blocks=(32, 16))
        ds.id.write_direct_chunk((k * 100, 0), rows.to_cframe())
    assert ds[:].tobytes() == data.tobytes()  # HDF5's filter reads the chunks so
    decoder = ChunkDecoder.of(ds)
    out = np.zeros_like(data)
    assert decoder.read_rows(0, 300, out)  # decoded here, not left to HDF5
    assert out.tobytes() == data.tobytes()



@needs_plugin
@pytest.mark.parametrize("params", [
    dict(codec="ZFP_PREC", codec_meta=20, filters=["NOFILTER"], filters_meta=[0]),
    dict(codec="ZSTD", filters=["NDMEAN"], filters_meta=[4]),
    dict(codec="ZSTD", filters=["NDCELL"], filters_meta=[4]),
], ids=["zfp", "ndmean", "ndcell"])
def test_blosc2_frames_whose_codecs_read_their_metadata(writable, params):
    """Codecs and filters that need the frame around their chunk (its b2nd shape) are decoded
    here too, as HDF5's filter decodes them (ZFP and NDMEAN are lossy: h5py is the truth)."""
    import blosc2

    cparams = dict(params, codec=blosc2.Codec[params["codec"]],
                   filters=[blosc2.Filter[f] for f in params["filters"]])
    data = _data((300, 16), np.dtype("<f4"))
    ds = writable.create_dataset("d", shape=data.shape, dtype=data.dtype, chunks=(100, 16),
                                 **hdf5plugin.Blosc2(cname="zstd"))
    for k in range(3):
        rows = blosc2.asarray(data[k * 100 : (k + 1) * 100], chunks=(100, 16), blocks=(20, 16),
                              cparams=cparams)
        ds.id.write_direct_chunk((k * 100, 0), rows.to_cframe())
    truth = ds[:]
    out = np.zeros_like(data)
    assert ChunkDecoder.of(ds).read_rows(0, 300, out)  # decoded here, not left to HDF5
    assert out.tobytes() == truth.tobytes()


def test_cache_does_not_keep_datasets(writable):
    import gc

    from multitables._hdf5 import decode

    ds = writable.create_dataset("d", data=DATA, chunks=(8, 16), compression="gzip")
    assert ChunkDecoder.of(ds) is not None
    before = len(decode._decoder.cache)
    del ds
    gc.collect()
    assert len(decode._decoder.cache) == before - 1



@pytest.mark.parametrize("fname", [f for f in FILTERS if f.startswith("blosc")])
@pytest.mark.parametrize("library", ["shipped", "absent"])
def test_blosc_with_and_without_the_shipped_library(writable, monkeypatch, fname, library):
    """Blosc chunks decode the same through the C library python-blosc2 ships (one context per
    decoder) and, where a wheel has none, through a context made per chunk."""
    if library == "absent":
        monkeypatch.setattr(libraries, "_c_blosc2", None)
    else:
        assert libraries._c_blosc2 is not None  # the wheels this project installs ship it
    data = _data((300, 2048), np.dtype("<f4"))
    ds = writable.create_dataset("d", data=data, chunks=(128, 2048), **FILTERS[fname])
    decoder = ChunkDecoder.of(ds)
    for start, stop in [(0, 300), (5, 250), (256, 300)]:
        assert _read(decoder, ds, start, stop).tobytes() == data[start:stop].tobytes()


_THREADED_PARENT = """
import sys

import blosc2
import h5py
import hdf5plugin
import numpy as np

import multitables

path = sys.argv[1]
with h5py.File(path, "w") as f:
    # 1 MiB chunks: Blosc splits them in blocks that its threads would share
    data = np.arange(512 * 1024, dtype="<f4").reshape(512, 1024)
    f.create_dataset("blosc", data=data, chunks=(256, 1024), **hdf5plugin.Blosc(cname="zstd"))
    f.create_dataset("blosc2", data=data, chunks=(256, 1024), **hdf5plugin.Blosc2(cname="zstd"))
blosc2.set_nthreads(2)  # starts c-blosc2's thread pool in this process, which workers fork
with multitables.Streamer(path) as s:
    for name in ("blosc", "blosc2"):
        blocks = []
        for guard in s.get_queue(name, n_procs=2, ordered=True).iter():
            with guard as block:
                blocks.append(block.copy())
        assert np.array_equal(np.concatenate(blocks), data), name
        assert np.array_equal(np.array(list(s.get_generator(name, n_procs=2, ordered=True))),
                              data), name
reader = multitables.Reader(path)
try:
    for name in ("blosc", "blosc2"):
        ds = reader.get_dataset(name)
        got = reader.request(ds[300:303], ds.create_stage(3)).get()
        assert np.array_equal(got, data[300:303]), name
finally:
    reader.close()
print("ok")
"""


@needs_plugin
def test_workers_of_a_process_with_blosc_threads(tmp_path):
    """Workers forked from a process that runs c-blosc2's thread pool (blosc2.set_nthreads(2)
    started it) decode Blosc chunks with contexts of their own: the pool's threads do not exist
    in a forked child, and its global context would wait for them for ever."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    # A session of its own: a worker stuck in a decode is killed with the child.
    proc = subprocess.Popen([sys.executable, "-c", _THREADED_PARENT, str(tmp_path / "b.h5")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        out, err = "", "timed out: a worker hangs in c-blosc2"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # and any worker left behind
        proc.wait(10)
    assert proc.returncode == 0 and out.strip() == "ok", err


@pytest.mark.parametrize("opts", [dict(compression="gzip"),
                                  dict(compression="gzip", shuffle=True)], ids=["gzip", "shuffle"])
def test_the_fast_path_runs_for_gzip(writable, opts):
    """A gzip read through read_selection, in this process: decoded here, nothing left to HDF5."""
    if libraries._deflate_lib is None:
        pytest.skip("no faster deflate library than HDF5's zlib: HDF5 decodes")
    ds = writable.create_dataset("d", data=DATA, chunks=(8, 16), **opts)
    fallback.fallbacks.clear()
    fallback.decoded.clear()
    out = np.empty((30, 16), "f4")
    read_selection(ds, translate((slice(3, 33),), ds.shape), out)
    assert out.tobytes() == DATA[3:33].tobytes()
    assert fallback.decoded == {"deflate": 5}  # rows 3:33 touch chunks 0-4, each decoded once
    assert not fallback.fallbacks


def test_fallbacks_are_counted_by_reason_and_logged_once(writable, caplog):
    ds = writable.create_dataset("d", data=DATA, chunks=(8, 16), compression="gzip")
    ds.id.write_direct_chunk((8, 0), b"not deflate data")  # chunk 1 corrupt: a failure
    ds.id.write_direct_chunk((24, 0), DATA[24:32].tobytes(), filter_mask=1)  # declined
    decoder = ChunkDecoder.of(ds)
    fallback.fallbacks.clear()
    caplog.set_level("DEBUG", logger="multitables")
    for _ in range(2):
        assert not decoder.read_rows(8, 16, np.zeros((8, 16), "f4"))
        assert not decoder.read_rows(24, 32, np.zeros((8, 16), "f4"))
    failed = [r for r in fallback.fallbacks if r.startswith("failed:")]
    declined = [r for r in fallback.fallbacks if r.startswith("declined:")]
    assert len(failed) == 1 and len(declined) == 1, fallback.fallbacks
    assert fallback.fallbacks[failed[0]] == fallback.fallbacks[declined[0]] == 2
    logged = [r.getMessage() for r in caplog.records if r.name == "multitables"]
    assert len(logged) == 2 and any(failed[0] in m for m in logged), logged


def test_counts_start_afresh_in_a_forked_worker():
    import os

    fallback.fallbacks["declined: from the parent"] += 1
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        os._exit(0 if not fallback.fallbacks and not fallback.decoded else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _installed_deflate():
    import importlib

    found = []
    for name, module in libraries._DEFLATE_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        found.append(name)
    return found


WIDE = np.dtype([("a", "<i8"), ("b", "<f8"), ("c", "u1", (8,))])  # 24 bytes: past 16 in shuffle


def _use(monkeypatch, backend):
    """Decode deflate with ``backend``; ``libdeflate-buffer`` is libdeflate through the package's
    Python function (a new buffer per chunk), as where its C API cannot be loaded."""
    if backend == "libdeflate-buffer":
        monkeypatch.setattr(libraries, "_c_libdeflate", None)
        backend = "libdeflate"
    elif backend == "libdeflate":
        assert libraries._c_libdeflate is not None  # the wheels this project installs export it
    monkeypatch.setattr(libraries, "_deflate_name", backend)


def _backends():
    found = _installed_deflate()
    return found + (["libdeflate-buffer"] if "libdeflate" in found else [])


@pytest.mark.parametrize("backend", _backends() + ["zlib"])
def test_every_deflate_decoder_gives_hdf5s_bytes(writable, monkeypatch, backend):
    _use(monkeypatch, backend)
    fallback.decoded.clear()
    fallback.fallbacks.clear()
    cases = {
        "f4": _data((100, 33), np.dtype("<f4")),
        "u1": _data((100, 64), np.dtype("u1")),
        "wide": _data((100,), np.dtype(COMPOUND)).astype(WIDE),
    }
    for name, data in cases.items():
        for level, shuffle in [(1, False), (4, True), (9, True)]:
            ds = writable.create_dataset(f"{name}-{level}-{shuffle}", data=data,
                                         chunks=(16, *data.shape[1:]), compression="gzip",
                                         compression_opts=level, shuffle=shuffle)
            decoder = ChunkDecoder.of(ds)
            out = np.zeros_like(data)
            assert decoder.read_rows(0, 100, out)
            assert out.tobytes() == ds[()].tobytes(), (backend, name, level, shuffle)
    assert fallback.decoded["deflate"] == 9 * 7  # 7 chunks per dataset, all decoded here
    assert not fallback.fallbacks


@pytest.mark.parametrize("backend", _backends())
def test_every_deflate_decoder_refuses_bad_streams(writable, monkeypatch, backend):
    _use(monkeypatch, backend)
    ds = writable.create_dataset("d", data=DATA, chunks=(8, 16), compression="gzip")
    ds.id.write_direct_chunk((8, 0), b"not deflate data")
    # A stream that decodes to more than a chunk: rows of another dataset's chunk of 16 rows.
    import zlib

    ds.id.write_direct_chunk((16, 0), zlib.compress(np.zeros((16, 16), "f4").tobytes()))
    # And one that decodes to fewer: half a chunk.
    ds.id.write_direct_chunk((24, 0), zlib.compress(np.zeros((4, 16), "f4").tobytes()))
    decoder = ChunkDecoder.of(ds)
    fallback.fallbacks.clear()
    assert decoder.read_rows(0, 8, np.zeros((8, 16), "f4"))
    for start in (8, 16, 24):
        assert not decoder.read_rows(start, start + 8, np.zeros((8, 16), "f4"))
    assert decoder.read_rows(32, 40, np.zeros((8, 16), "f4"))
    assert sum(fallback.fallbacks.values()) == 3
    assert all(r.startswith("failed:") for r in fallback.fallbacks), fallback.fallbacks


def test_inflate_is_the_decoder_in_use():
    import zlib

    raw = zlib.compress(DATA.tobytes(), 4)
    assert bytes(decode.inflate(raw, DATA.nbytes)) == DATA.tobytes()
    with pytest.raises(ValueError):
        decode.inflate(raw, DATA.nbytes - 1)


@pytest.mark.parametrize("value, expected", [("isal", "isal"), ("zlib", "None"),
                                             ("libdeflate", "libdeflate")])
def test_multitables_deflate_picks_the_decoder(value, expected):
    import os
    import subprocess
    import sys

    if value != "zlib" and value not in _installed_deflate():
        pytest.skip(f"{value} is not installed")
    out = subprocess.run([sys.executable, "-c", "from multitables._hdf5 import libraries; "
                          "print(libraries._deflate_name)"], capture_output=True, text=True,
                         env=dict(os.environ, MULTITABLES_DEFLATE=value), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


def test_an_unknown_multitables_deflate_is_refused():
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import multitables"], capture_output=True,
                         text=True, env=dict(os.environ, MULTITABLES_DEFLATE="gzip"), timeout=60)
    assert out.returncode != 0
    assert "MULTITABLES_DEFLATE='gzip': expected one of" in out.stderr


def test_libdeflate_declines_a_destination_of_another_size():
    """libdeflate's C call writes a whole chunk at the destination's address: a smaller or
    strided destination is declined (HDF5 then reads the chunk), never written past."""
    if libraries._c_libdeflate is None:
        pytest.skip("libdeflate's C library is not installed")  # the `fast` extra brings it
    import zlib

    chunk = np.arange(256, dtype="<i4")
    raw = zlib.compress(chunk.tobytes())
    into_place = codecs.deflate_codec(chunk.nbytes, "libdeflate")
    np.testing.assert_array_equal(into_place(raw, np.empty(chunk.nbytes, np.uint8)).view("<i4"),
                                  chunk)
    for into in (np.zeros(chunk.nbytes // 2, np.uint8), np.zeros(2 * chunk.nbytes, np.uint8)[::2]):
        with pytest.raises(fallback.Undecodable):
            into_place(raw, into)
        assert not into.any()
