"""ByteCache: hits return the bytes put, the limit holds with least recently used out first, it
deletes only its own files, cleans its stale temporary files, and two processes can fill it."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import pytest

from multitables._sources.cache import MARKER, ByteCache

ID = ("http://127.0.0.1/x.h5", 1000, '"etag"')


def payload(i: int, n: int = 1024) -> bytes:
    return bytes([i % 251]) * n


def test_put_and_get(tmp_path):
    cache = ByteCache(tmp_path, 1 << 20)
    cache.put(ID, 0, payload(1, 100))
    out = bytearray(100)
    assert cache.get_into(ID, 0, memoryview(out)) and out == payload(1, 100)
    assert not cache.get_into(ID, 1, memoryview(out))  # another offset
    assert not cache.get_into(ID, 0, memoryview(bytearray(99)))  # another size
    assert not cache.get_into((ID[0], ID[1], '"other"'), 0, memoryview(out))  # another version
    assert (cache.hits, cache.misses) == (1, 3)
    cache.put(ID, 5, b"")  # nothing to keep
    cache.put(ID, 6, bytes(2 << 20))  # larger than the limit: not kept
    assert len(cache.entries()) == 1


def test_least_recently_used_go_first(tmp_path):
    cache = ByteCache(tmp_path, 10 * 1024, trim_every=1024)
    for i in range(9):
        cache.put(ID, i, payload(i))
        time.sleep(0.005)  # distinct mtimes on coarse clocks
    time.sleep(0.01)
    for i in (0, 1, 2):  # used again: the most recent now
        assert cache.get_into(ID, i, memoryview(bytearray(1024)))
    time.sleep(0.01)
    for i in range(9, 14):
        cache.put(ID, i, payload(i))
        time.sleep(0.005)
        assert cache.usage() <= cache.limit
    kept = [i for i in range(14) if cache.get_into(ID, i, memoryview(bytearray(1024)))]
    assert kept[:3] == [0, 1, 2] and 3 not in kept and 13 in kept
    assert cache.evicted >= 4


def test_never_deletes_what_it_did_not_write(tmp_path):
    foreign_top = tmp_path / "user-data.bin"
    foreign_top.write_bytes(b"x" * 5000)
    cache = ByteCache(tmp_path, 4096, trim_every=1024)
    foreign_inside = cache.dir / "notes.txt"
    foreign_inside.write_bytes(b"y" * 5000)
    lookalike = cache.dir / ("a" * 39 + ".mtb")  # one hex digit short of our pattern
    lookalike.write_bytes(b"z")
    for i in range(20):
        cache.put(ID, i, payload(i))
    cache.trim()
    assert foreign_top.exists() and foreign_inside.exists() and lookalike.exists()
    assert (cache.dir / MARKER).exists()
    assert cache.usage() <= 4096


def test_refuses_a_folder_that_is_not_a_cache(tmp_path):
    (tmp_path / f"multitables-{os.getuid()}").mkdir()
    (tmp_path / f"multitables-{os.getuid()}" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="Not a multitables cache"):
        ByteCache(tmp_path, 1 << 20)


def test_a_marker_on_its_way_in_is_not_a_stranger(tmp_path):
    # Workers starting together: one finds the folder holding only another's temporary marker.
    folder = tmp_path / f"multitables-{os.getuid()}"
    folder.mkdir()
    (folder / f"{MARKER}.123.abcd").write_text("")
    ByteCache(tmp_path, 1 << 20).put(("u", 1, "e"), 0, b"abc")


def test_cleans_its_stale_temporary_files(tmp_path):
    cache = ByteCache(tmp_path, 1 << 20)
    host = socket.gethostname().replace("-", "_").replace("/", "_")
    dead = subprocess_pid_that_exited()
    stale = cache.dir / f".tmp-{host}-{dead}-{'0' * 16}.mtb"
    live = cache.dir / f".tmp-{host}-{os.getpid()}-{'1' * 16}.mtb"
    old = cache.dir / f".tmp-otherhost-1-{'2' * 16}.mtb"
    recent = cache.dir / f".tmp-otherhost-1-{'3' * 16}.mtb"
    for p in (stale, live, old, recent):
        p.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    ByteCache(tmp_path, 1 << 20)
    assert not stale.exists() and not old.exists()
    assert live.exists() and recent.exists()


def subprocess_pid_that_exited() -> int:
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=os._exit, args=(0,))
    p.start()
    p.join(10)
    return p.pid


def _fill(cache_dir, limit, worker, n, conn):
    cache = ByteCache(cache_dir, limit, trim_every=8 * 1024)
    bad = 0
    for i in range(n):
        key = (worker * 1000 + i) % 150  # both workers write some of the same keys
        cache.put(ID, key, payload(key, 4096))
        for probe in (key, (key * 7) % 150):
            out = bytearray(4096)
            if cache.get_into(ID, probe, memoryview(out)) and out != payload(probe, 4096):
                bad += 1
    conn.send(bad)
    conn.close()


def test_two_processes_fill_it(tmp_path):
    limit = 64 * 1024
    ctx = multiprocessing.get_context("fork")
    pipes = [ctx.Pipe() for _ in range(2)]
    procs = [ctx.Process(target=_fill, args=(tmp_path, limit, w, 300, pipes[w][1]))
             for w in range(2)]
    for p in procs:
        p.start()
    results = []
    for here, _ in pipes:
        assert here.poll(30), "a cache filler did not finish"
        results.append(here.recv())
    for p in procs:
        p.join(10)
        assert p.exitcode == 0
    for here, there in pipes:
        here.close(), there.close()
    assert results == [0, 0]  # every hit gave the bytes that were put
    folder = tmp_path / f"multitables-{os.getuid()}"
    ours = [e for e in os.scandir(folder) if e.name.endswith(".mtb")]
    # Each trims to limit - trim_every: with two writers, at most one trim_every over.
    assert sum(e.stat().st_size for e in ours) <= limit + 8 * 1024
    cache = ByteCache(tmp_path, limit, trim_every=8 * 1024)
    assert cache.usage() <= limit - 8 * 1024
    assert not [e for e in os.listdir(cache.dir) if e.startswith(".tmp-")]
    assert {size for _, size, _ in cache.entries()} == {4096}
