"""Reading HDF5 over the network: multitables' front doors on URLs against h5py over fsspec
(``HTTPFileSystem``; ``s3fs`` on the S3 server) with default and tuned block sizes, and against
the link limit measured in the same run (a few parallel plain 8 MiB ranged GETs into memory).

Servers on 127.0.0.1, started here: our range server (``tests/servers/rangeserver.py``, in a
process of its own so its Python does not share the bench's) with a first-byte latency of 0 and
20 ms and a bandwidth cap per connection, and ``rclone serve s3`` when installed. Besides MB/s,
each scenario prints what the servers answered: requests, bytes fetched against the bytes the
readers needed, and (from an in-process fetch of the same chunks, as a worker makes it) p50/p99
request latency and retries. See bench/README.md, "Remote files".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import multiprocessing
import os
import re
import resource
import sys
import tempfile
import time
from typing import Any

import h5py
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import multitables  # noqa: E402
from multitables._hdf5.source import usable_cpus  # noqa: E402
from multitables._sources import open_source  # noqa: E402
from multitables._tools import measure as m  # noqa: E402

RAW, GZ_IMAGES, GZ_LABELS = "/raw", "/images", "/labels"
GET_SIZE = 8 << 20  # the link limit's GETs
LINK_IN_FLIGHT = 8
BATCH = 64  # rows of a Reader batch
_RANGE = re.compile(r"bytes=(\d+)-(\d+)")


# ------------------------------------------------------------------------------------ the file

def chunk_batches(cm, order: np.ndarray, per: int) -> list[list[tuple]]:
    """The chunks of ``cm`` in ``order``, ``per`` a batch, each as a fetch's (offset, size,
    destination): one body buffer that every batch reuses."""
    body = np.empty(int(cm.sizes.max()) * per, np.uint8)
    batches = []
    for a in range(0, len(order), per):
        ranges, at = [], 0
        for i in order[a:a + per]:
            size = int(cm.sizes[i])
            ranges.append((int(cm.byte_offsets[i]), size, body[at:at + size]))
            at += size
        batches.append(ranges)
    return batches

def write_file(path: str, raw_mb: float, gz_mb: float) -> dict[str, int]:
    """``/raw`` float32 (N, 1024) in chunks of 64 rows (256 KiB); ``/images`` uint8
    (M, 64, 64) gzip+shuffle in chunks of 64 images (256 KiB before compression, about a third
    after) with ``/labels`` int64; metadata at the start, as a file written for the cloud has it.
    Returns the bytes stored per dataset."""
    rng = np.random.default_rng(0)
    n = max(64, int(raw_mb * 1e6) // 4096)
    k = max(64, int(gz_mb * 1e6) // 4096)
    with h5py.File(path, "w", meta_block_size=1 << 20) as f:
        raw = f.create_dataset(RAW, (n, 1024), np.float32, chunks=(64, 1024))
        for a in range(0, n, 4096):
            raw[a:a + 4096] = rng.random((min(4096, n - a), 1024), dtype=np.float32)
        images = f.create_dataset(GZ_IMAGES, (k, 64, 64), np.uint8, chunks=(64, 64, 64),
                                  compression="gzip", shuffle=True)
        for a in range(0, k, 1024):
            b = min(1024, k - a)
            smooth = np.cumsum(rng.integers(-2, 3, (b, 64, 64)), axis=2) % 256
            images[a:a + b] = smooth.astype(np.uint8)
        f.create_dataset(GZ_LABELS, data=rng.integers(0, 10, k))
        stored = {p: f[p].id.get_storage_size() for p in (RAW, GZ_IMAGES, GZ_LABELS)}
    return stored


def write_shards(local: str, folder: str, n: int) -> list[str]:
    """The images and labels of ``local`` cut into ``n`` shard files of whole chunks, stored
    as there (gzip+shuffle in chunks of 64 images); their names in ``folder``."""
    names = []
    with h5py.File(local, "r") as f:
        images, labels = f[GZ_IMAGES], f[GZ_LABELS]
        chunk = images.chunks[0]
        per = -(-images.shape[0] // chunk // n) * chunk
        for i, a in enumerate(range(0, images.shape[0], per)):
            names.append(f"shard-{i:03d}.h5")
            with h5py.File(os.path.join(folder, names[-1]), "w", meta_block_size=1 << 20) as g:
                g.create_dataset(GZ_IMAGES, data=images[a:a + per], chunks=images.chunks,
                                 compression="gzip", shuffle=True)
                g.create_dataset(GZ_LABELS, data=labels[a:a + per])
    return names


# ------------------------------------------------------------------------------------ servers
def _serve(root: str, knobs: dict[str, Any], conn: Any) -> None:
    from servers.rangeserver import RangeServer

    srv = RangeServer(root, **knobs).start()
    conn.send(srv.port)
    while True:
        command = conn.recv()
        if command == "stop":
            srv.stop()
            conn.send(None)
            return
        if command == "cpu":  # the server's CPU seconds so far (all its threads)
            use = resource.getrusage(resource.RUSAGE_SELF)
            conn.send(use.ru_utime + use.ru_stime)
        elif command == "reset":
            with srv._lock:
                srv.counts.clear()
                srv.log.clear()
            conn.send(None)
        elif command == "counts":
            with srv._lock:
                log, counts = list(srv.log), dict(srv.counts)
            fetched = 0
            for method, _, rng, status in log:
                got = _RANGE.fullmatch(rng)
                if method == "GET" and status == 206 and got:
                    fetched += int(got[2]) - int(got[1]) + 1
            conn.send({"requests": counts.get("requests", 0), "bytes_fetched": fetched,
                       "503": counts.get("fault 503", 0), "reset": counts.get("fault reset", 0),
                       "short": counts.get("fault short", 0)})


class Server:
    """Our range server in a child process: ``url(name)``, ``counts()``, ``reset()``."""

    def __init__(self, root: str, **knobs: Any):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(root, knobs, child), daemon=True)
        self.proc.start()
        if not self.conn.poll(30):
            self.proc.kill()
            raise RuntimeError("the range server did not start")
        self.port = self.conn.recv()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def _ask(self, command: str) -> Any:
        self.conn.send(command)
        if not self.conn.poll(30):
            raise RuntimeError(f"the range server did not answer {command!r}")
        return self.conn.recv()

    def counts(self) -> dict[str, int]:
        return self._ask("counts")

    def reset(self) -> None:
        self._ask("reset")

    def cpu(self) -> float:
        return self._ask("cpu")

    def stop(self) -> None:
        try:
            self._ask("stop")
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


# ------------------------------------------------------------------------------------ readers
def link_limit(url: str, options: Any, size: int, tick: Any = None) -> int:
    """``LINK_IN_FLIGHT`` plain ranged GETs of 8 MiB at a time into memory, over ``size``."""
    src = open_source(url, options)
    bufs = [bytearray(GET_SIZE) for _ in range(LINK_IN_FLIGHT)]

    def get(i: int, at: int) -> int:
        n = min(GET_SIZE, size - at)
        src.read_into(at, memoryview(bufs[i % LINK_IN_FLIGHT])[:n])
        return n

    with concurrent.futures.ThreadPoolExecutor(LINK_IN_FLIGHT) as pool:
        total = sum(pool.map(get, range(-(-size // GET_SIZE)), range(0, size, GET_SIZE)))
    src.close()
    return total


def fsspec_open(url: str, options: Any, block_size: int | None, cache_type: str | None) -> Any:
    """A file object of fsspec (HTTPFileSystem, or s3fs for s3://) with its defaults, or the
    block size and cache asked."""
    kw: dict[str, Any] = {}
    if block_size is not None:
        kw["block_size"] = block_size
    if cache_type is not None:
        kw["cache_type"] = cache_type
    if url.startswith("s3://"):
        import s3fs

        fs = s3fs.S3FileSystem(key=options["key"], secret=options["secret"],
                               client_kwargs={"endpoint_url": options["endpoint_url"],
                                              "region_name": options["region"]})
        return fs.open(url[len("s3://"):], "rb", **kw)
    import fsspec

    # A new filesystem each time: fsspec's cached one keeps aiohttp connections that the
    # server closes when idle (10 s), and a later open waited on one of them for ever.
    return fsspec.filesystem("http", skip_instance_cache=True).open(url, "rb", **kw)


def h5py_fsspec_stream(url: str, options: Any, path: str, tune: tuple | None) -> int:
    """h5py over fsspec, ``read_direct`` of 1 MiB blocks, as a user streams a dataset."""
    with fsspec_open(url, options, *(tune or (None, None))) as f, h5py.File(f, "r") as h:
        ds = h[path]
        block = max(1, (1 << 20) // (ds.dtype.itemsize * int(np.prod(ds.shape[1:]))))
        buf = np.empty((block,) + ds.shape[1:], ds.dtype)
        total = 0
        for a in range(0, ds.shape[0], block):
            b = min(a + block, ds.shape[0])
            ds.read_direct(buf[: b - a], np.s_[a:b])
            total += (b - a) * buf[0].nbytes
    return total


def h5py_fsspec_random(url: str, options: Any, batches: list[np.ndarray], tune: tuple
                       ) -> tuple[int, list[float]]:
    lat = []
    with fsspec_open(url, options, *tune) as f, h5py.File(f, "r") as h:
        ds = h[RAW]
        total = 0
        for rows in batches:
            t0 = time.perf_counter()
            total += ds[np.unique(rows)].nbytes
            lat.append(time.perf_counter() - t0)
    return total, lat


def streamer_pass(file: str, options: Any, path: str, n_procs: int, streamer: Any = None) -> int:
    s = streamer or multitables.Streamer(file, storage_options=options)
    total = 0
    try:
        with s.get_queue(path, n_procs=n_procs, remainder=True) as q:
            for guard in q.iter():
                with guard as block:
                    total += block.nbytes
    finally:
        if streamer is None:
            s.close()
    return total


def streamer_digest(file: str, options: Any, path: str, n_procs: int) -> str:
    h = hashlib.sha256()
    with multitables.Streamer(file, storage_options=options) as s, \
            s.get_queue(path, n_procs=n_procs, remainder=True, ordered=True) as q:
        for guard in q.iter():
            with guard as block:
                h.update(block.tobytes())
    return h.hexdigest()


def loader_epoch(loader: Any) -> int:
    total = 0
    for batch in loader:
        total += batch[0].nbytes + batch[1].nbytes
    return total


def reader_batches(reader: Any, batches: list[np.ndarray], path: str = RAW
                   ) -> tuple[int, list[float]]:
    ds = reader.get_dataset(path)
    stage = ds.create_stage(BATCH)
    lat, total = [], 0
    for rows in batches:
        t0 = time.perf_counter()
        with reader.request(ds[rows], stage).get_unsafe() as got:
            total += got.nbytes
        lat.append(time.perf_counter() - t0)
    return total, lat


def fetch_stats(url: str, options: Any, path: str) -> Any:
    """The latencies and retries of the GETs a worker makes for ``path``: every chunk fetched
    once by one Fetcher, as a Streamer's worker fetches a slot's."""
    from multitables._sources.blockfile import BlockFile
    from multitables._sources.chunkmap import chunk_map

    src = open_source(url, options)
    with h5py.File(BlockFile(src), "r") as f:
        cm = chunk_map(f[path])
    opened = src.stats.snapshot()
    src.stats.latencies.clear()  # the chunks' GETs only
    with src.fetcher(max_in_flight=32) as fetcher:
        for ranges in chunk_batches(cm, np.argsort(cm.byte_offsets), 16):
            fetcher.fetch(ranges)
    src.close()
    now = src.stats.snapshot()
    return (now["requests"] - opened["requests"], now["retries"] - opened["retries"],
            src.stats.percentile(50), src.stats.percentile(99))


def decode_bound(url: str, options: Any, local: str, path: str, server: Server | None,
                 streamer: Any, n_procs: int, latency: float) -> dict[str, float]:
    """What the cores of this machine allow a Streamer of compressed ``path`` over ``url``:
    CPU seconds per decoded MB of the server (counted by the server over one Streamer pass),
    of fetching the stored chunks (this process, one Fetcher as a worker has, its connections
    and threads made by a fetch before: a worker keeps them from one job to the next) and of
    decoding them (one core, libdeflate and the unshuffle, on the same chunks in memory); the
    bound is the cores over their sum. A pass of the dataset also waits ``latency`` for its
    first bytes, with nothing to decode: ``pass_mb_s`` is the bound of one pass with that wait
    (the dataset's decoded MB over the wait plus their CPU over the cores). The consumer's own
    CPU and the job's start are left out (the bounds are generous)."""
    from multitables._hdf5.decode import inflate, unshuffle
    from multitables._sources.chunkmap import chunk_map

    with h5py.File(local, "r") as f:
        ds = f[path]
        cm = chunk_map(ds)
        nbytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
        chunks = [ds.id.read_direct_chunk(tuple(int(x) for x in o))[1]
                  for o in cm.chunk_offsets]
        decoded_mb = nbytes * len(chunks) / 1e6
    server_s = 0.0
    if server is not None:
        before = server.cpu()
        streamer_pass(url, options, path, n_procs, streamer)
        server_s = (server.cpu() - before) / decoded_mb
    src = open_source(url, options)
    body = np.empty(int(cm.sizes.sum()), np.uint8)
    ranges, at = [], 0
    for off, size in zip(cm.byte_offsets.tolist(), cm.sizes.tolist(), strict=True):
        ranges.append((off, size, body[at:at + size]))
        at += size
    with src.fetcher(max_in_flight=32, split_size=1 << 20) as fetcher:
        fetcher.fetch(ranges)  # connections and threads made, as a worker's later jobs find
        t = time.process_time()
        fetcher.fetch(ranges)
        fetch_s = (time.process_time() - t) / decoded_mb
    src.close()
    out = np.empty(nbytes, np.uint8)
    t = time.process_time()
    for raw in chunks:
        unshuffle(np.frombuffer(inflate(raw, nbytes), np.uint8), out, ds.dtype.itemsize)
    decode_s = (time.process_time() - t) / decoded_mb
    cores = usable_cpus()
    cpu_s = server_s + fetch_s + decode_s
    return {"decoded_mb": decoded_mb, "server_s_per_mb": server_s, "fetch_s_per_mb": fetch_s,
            "decode_s_per_mb": decode_s, "cores": cores, "bound_mb_s": cores / cpu_s,
            "pass_mb_s": decoded_mb / (latency + decoded_mb * cpu_s / cores)}


def get_cost(url: str, options: Any, local: str, path: str, server: Server) -> dict[str, float]:
    """CPU seconds a GET of one chunk of ``path`` costs the client (this process, one Fetcher
    as a worker has, its connections and threads made before) and the server: every chunk
    fetched once, one GET each, in a shuffled order, 64 at a time (the units a worker takes
    at once), as a shuffled Loader fetches units whose window lies scattered over the file."""
    from multitables._hdf5.remote import WORKER_GET_BYTES, WORKER_IN_FLIGHT
    from multitables._sources.chunkmap import chunk_map

    with h5py.File(local, "r") as f:
        cm = chunk_map(f[path])
    batches = chunk_batches(cm, np.random.default_rng(2).permutation(len(cm.sizes)), 64)
    src = open_source(url, options, maxsize=WORKER_IN_FLIGHT)
    with src.fetcher(max_in_flight=WORKER_IN_FLIGHT, split_size=WORKER_GET_BYTES,
                     merge_gap=0) as fetcher:
        fetcher.fetch(batches[0])  # connections and threads made
        before, t = server.cpu(), time.process_time()
        for ranges in batches:
            fetcher.fetch(ranges)
        client_s, server_s = time.process_time() - t, server.cpu() - before
    src.close()
    n = len(cm.sizes)
    return {"client_s": client_s / n, "server_s": server_s / n}


def epoch_cpu(loader: Any, server: Server) -> tuple[float, float]:
    """CPU seconds one epoch of ``loader`` costs its workers and this process together, and
    the server."""
    return cpu_of(lambda: loader_epoch(loader), server)


def cpu_of(run: Any, server: Server) -> tuple[float, float]:
    """CPU seconds ``run()`` costs this process and its children but the server, and the
    server."""
    import psutil

    def workers() -> float:
        total = 0.0
        for child in psutil.Process().children(recursive=True):
            if child.pid != server.proc.pid:
                try:
                    t = child.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += t.user + t.system
        return total

    before, served, here = workers(), server.cpu(), time.process_time()
    run()
    return workers() - before + time.process_time() - here, server.cpu() - served


# ------------------------------------------------------------------------------------ scenarios
def scenario(name: str, url: str, options: Any, local: str, stored: dict[str, int],
             args: argparse.Namespace, server: Server | None) -> dict[str, Any]:
    print(f"\n== {name}", flush=True)
    raw_bytes = stored[RAW]
    gz_bytes = stored[GZ_IMAGES] + stored[GZ_LABELS]
    n = args.n_procs
    file_size = os.path.getsize(local)
    # One Streamer per reader for all rounds, as a training loop keeps one across epochs.
    remote_streamer = multitables.Streamer(url, storage_options=options)
    local_streamer = multitables.Streamer(local)
    # A pass of each first, as the Loaders' epochs below: the rounds find the workers started
    # (the first pass of a Streamer starts them, about as long as a pass of 16 MB here).
    streamer_pass(url, options, RAW, n, remote_streamer)
    streamer_pass(local, None, GZ_IMAGES, n, local_streamer)
    readers: dict[str, Any] = {
        "link limit (8 x 8 MiB GETs)": lambda: link_limit(url, options, file_size),
        "h5py+fsspec, default": lambda: h5py_fsspec_stream(url, options, RAW, None),
        "h5py+fsspec, tuned (8 MiB blockcache)":
            lambda: h5py_fsspec_stream(url, options, RAW, (8 << 20, "blockcache")),
        f"Streamer raw (n_procs={n})":
            lambda: streamer_pass(url, options, RAW, n, remote_streamer),
    }
    report = m.run_rounds(readers, args.rounds, baseline="h5py+fsspec, tuned (8 MiB blockcache)")
    print(report.table())
    link = report.median("link limit (8 x 8 MiB GETs)")
    stream = report.median(f"Streamer raw (n_procs={n})")
    print(f"Streamer raw: {stream / link:.2f}x the link limit, "
          f"{report.median_ratio(f'Streamer raw (n_procs={n})'):.1f}x h5py+fsspec tuned")
    counted: dict[str, Any] = {}
    if server is not None:
        server.reset()
        streamer_pass(url, options, RAW, n)
        c = server.counts()
        counted["Streamer raw"] = c
        print(f"  one Streamer pass, open included: {c['requests']} requests, "
              f"{c['bytes_fetched'] / 1e6:.1f} MB fetched for {raw_bytes / 1e6:.1f} MB stored "
              f"({c['bytes_fetched'] / raw_bytes:.3f}x)")
    requests, retries, p50_get, p99_get = fetch_stats(url, options, RAW)
    print(f"  a worker's GETs of the chunks: {requests} requests, p50 {p50_get * 1e3:.1f} ms, "
          f"p99 {p99_get * 1e3:.1f} ms, {retries} retries")

    # gzip: decode-bound, against the same Streamer on the local file
    gz = {f"Streamer gzip, local (n_procs={n})":
          lambda: streamer_pass(local, None, GZ_IMAGES, n, local_streamer),
          f"Streamer gzip, URL (n_procs={n})":
          lambda: streamer_pass(url, options, GZ_IMAGES, n, remote_streamer)}
    gz_report = m.run_rounds(gz, args.rounds, baseline=f"Streamer gzip, local (n_procs={n})")
    print(gz_report.table())
    bound = decode_bound(url, options, local, GZ_IMAGES, server, remote_streamer, n,
                         args.latency)
    gz_url = gz_report.median(f"Streamer gzip, URL (n_procs={n})")
    gz_local = gz_report.median(f"Streamer gzip, local (n_procs={n})")
    print(f"  CPU per decoded MB: server {bound['server_s_per_mb'] * 1e3:.2f} ms, fetch "
          f"{bound['fetch_s_per_mb'] * 1e3:.2f} ms, decode {bound['decode_s_per_mb'] * 1e3:.2f}"
          f" ms: {bound['cores']} cores allow {bound['bound_mb_s']:.0f} MB/s; Streamer gzip "
          f"over the URL {gz_url:.0f} MB/s ({gz_url / bound['bound_mb_s']:.2f}x the bound)")
    print(f"  a pass that waits {args.latency * 1e3:g} ms for its first bytes: at most "
          f"{bound['pass_mb_s']:.0f} MB/s ({bound['pass_mb_s'] / gz_local:.2f}x the local "
          f"file's {gz_local:.0f} MB/s); the Streamer {gz_url / bound['pass_mb_s']:.2f}x of it")
    if server is not None:
        # The CPU of whole passes, as they run (the fetch threads beside the decoding): what
        # the cores allow where they are the limit.
        here_s, _ = cpu_of(lambda: streamer_pass(local, None, GZ_IMAGES, n, local_streamer),
                           server)
        there_s, server_s = cpu_of(
            lambda: streamer_pass(url, options, GZ_IMAGES, n, remote_streamer), server)
        bound.update(pass_cpu_local_s=here_s, pass_cpu_url_s=there_s,
                     pass_cpu_server_s=server_s, pass_cpu_share=here_s / (there_s + server_s))
        print(f"  CPU of a pass: the local Streamer {here_s:.2f} s; over the URL "
              f"{there_s:.2f} s and the server {server_s:.2f} s; where the cores they share "
              f"are the limit, the URL reaches {here_s / (there_s + server_s):.2f}x the local "
              f"file; it reached {gz_url / gz_local:.2f}x")
    remote_streamer.close()
    local_streamer.close()

    # Reader: batches of 64 random rows, latency per batch
    rng = np.random.default_rng(1)
    with h5py.File(local, "r") as f:
        n_rows = f[RAW].shape[0]
    batches = [rng.integers(0, n_rows, BATCH) for _ in range(args.batches)]
    with multitables.Reader(url, n_procs=n, storage_options=options) as reader:
        reader_batches(reader, batches[:2])  # workers started, stage mapped
        _, lat = reader_batches(reader, batches)
    _, base_lat = h5py_fsspec_random(url, options, batches[: max(4, args.batches // 4)],
                                     (1 << 20, "blockcache"))
    p50, base50 = float(np.median(lat)), float(np.median(base_lat))
    print(f"Reader, {BATCH} random rows: median {p50 * 1e3:.1f} ms a batch "
          f"({p50 / args.latency:.2f}x the first-byte latency)" if args.latency else
          f"Reader, {BATCH} random rows: median {p50 * 1e3:.1f} ms a batch", end="")
    print(f"; h5py+fsspec (1 MiB blockcache) {base50 * 1e3:.1f} ms: {base50 / p50:.1f}x")
    # The same of the gzip images: each row decoded from its chunk, the URL's against the file's
    with h5py.File(local, "r") as f:
        n_images = f[GZ_IMAGES].shape[0]
    gz_batches = [rng.integers(0, n_images, BATCH) for _ in range(args.batches)]
    gz_p50 = {}
    for where, opts in ((url, options), (local, None)):
        with multitables.Reader(where, n_procs=n, storage_options=opts) as reader:
            reader_batches(reader, gz_batches[:2], GZ_IMAGES)
            gz_p50[where] = float(np.median(reader_batches(reader, gz_batches, GZ_IMAGES)[1]))
    print(f"Reader, {BATCH} random gzip images: median {gz_p50[url] * 1e3:.1f} ms a batch; "
          f"the local file {gz_p50[local] * 1e3:.1f} ms ({gz_p50[local] / gz_p50[url]:.2f}x)")

    # Loader: a shuffled epoch of gzip images with labels; the second epoch from cache_dir
    cols = [GZ_IMAGES, GZ_LABELS]
    kw = dict(batch_size=256, shuffle=True, n_procs=n)
    with tempfile.TemporaryDirectory() as cache, \
            multitables.Loader(local, cols, **kw) as here, \
            multitables.Loader(url, cols, storage_options=options, **kw) as there, \
            multitables.Loader(url, cols, storage_options=options, cache_dir=cache,
                               **kw) as cached:
        loader_epoch(cached)  # fills the cache
        # An epoch of each first, as in training, where every epoch but the first finds its
        # workers started, their files open and (over a URL) their connections made.
        loader_epoch(here)
        loader_epoch(there)
        lreport = m.run_rounds({"Loader gzip, local": lambda: loader_epoch(here),
                                "Loader gzip, URL": lambda: loader_epoch(there),
                                "Loader gzip, URL, cache_dir (later epoch)":
                                    lambda: loader_epoch(cached)},
                               args.rounds, baseline="Loader gzip, local")
        print(lreport.table())
        loader_url = lreport.median("Loader gzip, URL")
        print(f"  Loader gzip over the URL {loader_url:.0f} MB/s: "
              f"{loader_url / bound['bound_mb_s']:.2f}x what the cores allow the same chunks "
              "(the gzip bound above)")
        if server is not None:
            server.reset()
            loader_epoch(there)
            c = server.counts()
            counted["Loader gzip"] = c
            print(f"  one Loader epoch: {c['requests']} requests, "
                  f"{c['bytes_fetched'] / 1e6:.1f} MB fetched for {gz_bytes / 1e6:.1f} MB "
                  f"stored ({c['bytes_fetched'] / gz_bytes:.3f}x)")
            # Where the cores are the limit: the CPU of an epoch, here and over the URL.
            cost = get_cost(url, options, local, GZ_IMAGES, server)
            here_s, _ = epoch_cpu(here, server)
            there_s, server_s = epoch_cpu(there, server)
            cpu_ratio = here_s / (there_s + server_s)
            print(f"  CPU of an epoch (workers and consumer): the local Loader {here_s:.2f} s; "
                  f"over the URL {there_s:.2f} s and the server {server_s:.2f} s (a GET of one "
                  f"chunk costs {cost['client_s'] * 1e3:.2f} ms of client and "
                  f"{cost['server_s'] * 1e3:.2f} ms of server CPU); where the cores they share "
                  f"are the limit, the URL reaches {cpu_ratio:.2f}x the local Loader; it "
                  f"reached {lreport.median_ratio('Loader gzip, URL'):.2f}x")
            counted["Loader CPU"] = {**cost, "local_s": here_s, "url_s": there_s,
                                     "server_s": server_s, "cpu_share": cpu_ratio}
        sreport = shards_scenario(url, options, local, args, kw, there) \
            if len(args.shard_names) > 1 else None
    return {"stream": report.to_dict(), "gzip": gz_report.to_dict(), "gzip_bound": bound,
            "loader": lreport.to_dict(), "shards": sreport and sreport.to_dict(),
            "reader_ms": p50 * 1e3, "reader_h5py_fsspec_ms": base50 * 1e3,
            "reader_gzip_ms": gz_p50[url] * 1e3, "reader_gzip_local_ms": gz_p50[local] * 1e3,
            "counts": counted}


def shards_scenario(url: str, options: Any, local: str, args: argparse.Namespace,
                    kw: dict[str, Any], one_url: Any) -> Any:
    """Shuffled epochs over the shards' URLs, against the same shards on disk and the one
    file's URL (``one_url``, a Loader of it kept open)."""
    names = args.shard_names
    folder, base = os.path.dirname(local), url.rsplit("/", 1)[0]
    cols = [GZ_IMAGES, GZ_LABELS]
    paths = [os.path.join(folder, name) for name in names]
    urls = [f"{base}/{name}" for name in names]
    with multitables.Loader(paths, cols, **kw) as here, \
            multitables.Loader(urls, cols, storage_options=options, **kw) as there:
        loader_epoch(here)
        loader_epoch(there)
        local_name = f"Loader gzip, {len(names)} shards, local"
        report = m.run_rounds({local_name: lambda: loader_epoch(here),
                               "Loader gzip, one file's URL": lambda: loader_epoch(one_url),
                               f"Loader gzip, {len(names)} shards' URLs":
                                   lambda: loader_epoch(there)},
                              args.rounds, baseline=local_name)
    print(report.table())
    ratio = report.median(f"Loader gzip, {len(names)} shards' URLs") / \
        report.median("Loader gzip, one file's URL")
    print(f"  the shards' URLs: {ratio:.2f}x the one file's URL")
    return report


def faults(root: str, local: str, args: argparse.Namespace) -> None:
    print("\n== faults: 2% 503, 1% resets, 0.5% short bodies", flush=True)
    clean = Server(root, latency=args.latency, bandwidth=args.bandwidth)
    faulty = Server(root, latency=args.latency, bandwidth=args.bandwidth, p503=0.02,
                    preset=0.01, pshort=0.005, seed=3)
    try:
        name = "bench.h5"
        want = streamer_digest(local, None, RAW, args.n_procs)
        got = streamer_digest(faulty.url(name), {"retries": 8}, RAW, args.n_procs)
        print(f"identical bytes: {got == want}")
        report = m.run_rounds(
            {"Streamer raw, no faults": lambda: streamer_pass(clean.url(name), None, RAW,
                                                              args.n_procs),
             "Streamer raw, faults": lambda: streamer_pass(faulty.url(name), {"retries": 8}, RAW,
                                                           args.n_procs)},
            args.rounds, baseline="Streamer raw, no faults")
        print(report.table())
        print(f"faults injected: {faulty.counts()}")
    finally:
        clean.stop()
        faulty.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--raw-mb", type=float, default=64, help="the unfiltered dataset (default 64)")
    p.add_argument("--gz-mb", type=float, default=32,
                   help="the gzip images before compression (default 32)")
    p.add_argument("--latencies", type=float, nargs="+", default=[0.0, 0.02],
                   help="first-byte latencies in seconds (default 0 0.02)")
    p.add_argument("--bandwidth", type=float, default=50e6,
                   help="bytes/s per connection (default 50e6; 0: unlimited)")
    p.add_argument("--n-procs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batches", type=int, default=20, help="Reader batches (default 20)")
    p.add_argument("--no-s3", action="store_true", help="leave rclone serve s3 out")
    p.add_argument("--no-http", action="store_true", help="leave our range server out")
    p.add_argument("--no-faults", action="store_true")
    p.add_argument("--shards", type=int, default=8,
                   help="shard files the Loader's images are also cut into (default 8; "
                        "1 leaves them out)")
    args = p.parse_args(argv)
    m.load_filter_plugins()
    with tempfile.TemporaryDirectory(prefix="mt-bench-remote-") as root:
        local = os.path.join(root, "bench.h5")
        stored = write_file(local, args.raw_mb, args.gz_mb)
        args.shard_names = write_shards(local, root, args.shards)
        print(f"file: {os.path.getsize(local) / 1e6:.1f} MB ({args.raw_mb:g} MB float32 in "
              f"256 KiB chunks; {stored[GZ_IMAGES] / 1e6:.1f} MB of gzip images); "
              f"{args.bandwidth / 1e6:g} MB/s per connection; n_procs {args.n_procs}; "
              f"{usable_cpus()} cores; "
              "MB = 1e6 bytes; ratios are medians of per-round ratios")
        results = {}
        for latency in [] if args.no_http else args.latencies:
            args.latency = latency
            srv = Server(root, latency=latency, bandwidth=args.bandwidth)
            try:
                results[f"http {latency * 1e3:g} ms"] = scenario(
                    f"our range server, {latency * 1e3:g} ms first-byte latency",
                    srv.url("bench.h5"), None, local, stored, args, srv)
            finally:
                srv.stop()
        if not (args.no_faults or args.no_http):
            args.latency = args.latencies[-1]
            faults(root, local, args)
        if not args.no_s3:
            from servers.rclone import RcloneS3, rclone_binary

            if rclone_binary() is None:
                print("\n(rclone not installed: no S3 scenario)")
            else:
                s3root = os.path.join(root, "s3")
                os.makedirs(os.path.join(s3root, "bkt"))
                for name in ["bench.h5", *args.shard_names]:
                    os.link(os.path.join(root, name), os.path.join(s3root, "bkt", name))
                args.latency = 0.0
                with RcloneS3(s3root, dir_cache_time="10m") as s3:
                    results["s3"] = scenario("rclone serve s3 (no latency added)",
                                             "s3://bkt/bench.h5", s3.options(), local, stored,
                                             args, None)
    out = m.dump_json(os.path.join(HERE, "results",
                                   f"remote-{time.strftime('%Y%m%d-%H%M%S')}.json"),
                      {"script": "bench_remote", "args": vars(args), "results": results})
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
