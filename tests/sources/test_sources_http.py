"""HTTPSource against our range server: the right bytes, faults retried, typed errors at once,
never a hang, and no secret in any message."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import random
import threading
import time

import pytest
from conftest import BLOB_NAME

from multitables._sources import open_source
from multitables._sources import transport as transport_module
from multitables._sources.http import HTTPSource
from multitables.errors import ObjectChangedError, SourceTimeoutError, TransferError

SECRET = "hunter2-never-shown"


def ranges(size, n, seed=0, longest=200_000):
    rng = random.Random(seed)
    for _ in range(n):
        length = rng.randint(1, longest)
        offset = rng.randint(0, size - length)
        yield offset, length


def test_reads_equal_the_bytes(http, blob):
    with open_source(http.url(BLOB_NAME)) as src:
        assert isinstance(src, HTTPSource)
        assert (src.size, src.etag) == (len(blob), http.etag(BLOB_NAME))
        assert src.stats.requests == 1  # the open: one GET of the first byte
        for offset, length in ranges(len(blob), 20):
            assert src.read(offset, length) == blob[offset:offset + length]
        assert src.stats.requests == 21 and src.stats.retries == 0
        assert all(m == "GET" and r.startswith("bytes=") for m, _, r, _ in http.log)


def test_pickle_makes_no_request_and_pins(http, blob):
    src = open_source(http.url(BLOB_NAME))
    clone = pickle.loads(pickle.dumps(src))
    assert http.counts["requests"] == 1
    assert clone.read(10, 5) == blob[10:15] and clone.etag == src.etag
    assert http.counts["requests"] == 2
    src.close(), clone.close()


def test_faults_give_identical_bytes(http_factory, blob):
    srv = http_factory(p503=0.1, preset=0.05, pshort=0.05, pignore_range=0.05, seed=3)
    with open_source(srv.url(BLOB_NAME), {"retries": 12, "timeout": 5}) as src:
        for offset, length in ranges(len(blob), 60, seed=1):
            assert src.read(offset, length) == blob[offset:offset + length]
        assert src.stats.retries > 0
    for fault in ("fault 503", "fault reset", "fault short", "fault ignore range"):
        assert srv.counts[fault] > 0, (fault, srv.counts)


def test_404_and_403_at_once(http):
    with pytest.raises(FileNotFoundError, match=r"HTTP 404.*/missing\.h5") as e:
        open_source(http.url("missing.h5"), {"retries": 5})
    assert e.value.filename == http.url("missing.h5")
    http.forbidden.add(BLOB_NAME)
    with pytest.raises(PermissionError, match=r"HTTP 403.*blob\.bin"):
        open_source(http.url(BLOB_NAME), {"retries": 5})
    assert http.counts["requests"] == 2  # no retries


def test_403_after_open_at_once(http):
    src = open_source(http.url(BLOB_NAME), {"retries": 5})
    http.forbidden.add(BLOB_NAME)
    with pytest.raises(PermissionError):
        src.read(0, 10)
    assert http.counts["requests"] == 2
    src.close()


@pytest.mark.parametrize("when", ["open", "read"])
def test_stalled_server_raises_within_the_timeout(http_factory, when):
    srv = http_factory(stall=when == "open")
    options = {"timeout": 0.3, "retries": 2}
    t0 = time.monotonic()
    with pytest.raises(SourceTimeoutError, match=r"No answer within 0\.3 s \(3 attempts") as e:
        src = open_source(srv.url(BLOB_NAME), options)
        srv.knobs.stall = True
        t0 = time.monotonic()
        try:
            src.read(0, 1000)
        finally:
            src.close()
    elapsed = time.monotonic() - t0
    assert isinstance(e.value, TimeoutError)
    assert 0.3 * 3 * 0.9 <= elapsed < 0.3 * 3 + 1.0, elapsed


def test_trickling_server_raises(http_factory, monkeypatch):
    monkeypatch.setattr(transport_module, "PIECE", 1 << 10)
    srv = http_factory(bandwidth=20_000)  # 100 KB take 5 s; each 1 KiB piece has 0.05 s
    with open_source(srv.url(BLOB_NAME), {"timeout": 0.02, "retries": 1}) as src:
        t0 = time.monotonic()
        with pytest.raises(SourceTimeoutError):
            src.read(0, 100_000)
        assert time.monotonic() - t0 < 3


def test_dead_server_raises_after_retries(http):
    url = http.url(BLOB_NAME)
    src = open_source(url, {"timeout": 1, "retries": 2})
    http.stop()
    t0 = time.monotonic()
    with pytest.raises(TransferError, match=r"after 3 attempts: .*(Connection|refused)"):
        src.read(0, 10)
    assert time.monotonic() - t0 < 3
    src.close()


def test_replaced_object_raises(http, blob):
    src = open_source(http.url(BLOB_NAME))
    assert src.read(0, 10) == blob[:10]
    http.replace(BLOB_NAME, blob[::-1])
    with pytest.raises(ObjectChangedError, match=r"blob\.bin was replaced .*HTTP 412"):
        src.read(0, 10)
    src.close()


def test_replaced_object_without_if_match_raises(http, blob):
    src = open_source(http.url(BLOB_NAME))
    src.pin.etag = "W/" + src.pin.etag  # a weak ETag is compared, not sent as If-Match
    http.replace(BLOB_NAME, blob[::-1])
    with pytest.raises(ObjectChangedError, match="ETag W/.* at open"):
        src.read(0, 10)
    src.close()


def test_range_ignored_on_a_big_object(http_factory, monkeypatch, blob, caplog):
    srv = http_factory(pignore_range=1.0)
    with open_source(srv.url(BLOB_NAME), {"retries": 1}) as src:
        assert src.read(len(blob) - 5, 5) == blob[-5:]  # small enough: the slice is taken
        assert src.read(3, 5) == blob[3:8]
        # Said once, as a warning: every read costs the whole object.
        warned = [r for r in caplog.records if "ignores Range" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelname == "WARNING"
        assert f"whole object ({len(blob)} bytes)" in warned[0].getMessage()
        monkeypatch.setattr(transport_module, "WHOLE_OBJECT_LIMIT", 1 << 20)
        with pytest.raises(TransferError, match="the server ignored Range"):
            src.read(0, 5)


def test_latency_and_bandwidth_knobs(http_factory, blob):
    srv = http_factory(latency=0.05, bandwidth=2_000_000)
    with open_source(srv.url(BLOB_NAME)) as src:
        t0 = time.monotonic()
        assert src.read(0, 200_000) == blob[:200_000]
        assert time.monotonic() - t0 >= 0.05 + 0.1 * 0.9
        assert src.stats.percentile(50) >= 0.05


def test_no_secret_in_errors_or_reprs(http):
    base = http.url("missing.h5").replace("http://", f"http://user:{SECRET}@")
    url = f"{base}?X-Amz-Signature={SECRET}"
    options = {"headers": {"Authorization": f"Bearer {SECRET}"}, "retries": 0}
    with pytest.raises(FileNotFoundError) as e:
        open_source(url, options)
    http.stop()
    with pytest.raises(TransferError) as e2:
        open_source(url, options)
    for text in (str(e.value), repr(e.value), str(e2.value), repr(e2.value),
                 repr(e2.value.__cause__), repr(e2.value.__context__)):
        assert SECRET not in text and "user" not in text, text


def _child_reads(src, conn):
    inherited = src.transport._pool
    conn.send((src.read(1000, 100), src.transport.pool() is not inherited,
               src.transport._pid))
    src.close()


def _child_after_the_fork(conn):
    conn.send("alive")


def test_a_fork_while_a_thread_holds_the_pool_lock_does_not_hang_the_child(http, blob):
    """The child dropped the parent's pool, whose finalizer took its lock: held by a parent
    thread at the fork, the child waited for ever in the fork hook."""
    src = open_source(http.url(BLOB_NAME))
    assert src.read(0, 10) == blob[:10]  # a kept connection in the pool
    lock = src.transport.pool()._lock  # the pool itself is the transport's only
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    holding.wait(5)
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_child_after_the_fork, args=(there,))
    try:
        p.start()
        assert here.poll(10) and here.recv() == "alive", "the child hung after the fork"
    finally:
        release.set()
        holder.join(10)
        p.join(10)
        if p.is_alive():
            p.kill()
        here.close(), there.close()
    assert src.read(5, 5) == blob[5:10]  # the parent's connection was not closed
    src.close()


def test_names_with_spaces_and_accents_are_percent_encoded(http_factory, source_dir, blob):
    import shutil

    """They were sent raw: a space broke the request line (400), an accent went as latin-1."""
    srv = http_factory()
    shutil.copy(source_dir[0] / BLOB_NAME, srv.root / "my blob é.bin")
    with open_source(f"http://127.0.0.1:{srv.port}/my blob é.bin") as src:
        assert src.read(7, 5) == blob[7:12]
    assert srv.log[-1][1] == "my blob é.bin"


def test_fork_makes_its_own_connections(http, blob):
    import os
    src = open_source(http.url(BLOB_NAME))
    assert src.read(0, 10) == blob[:10]
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()
    p = ctx.Process(target=_child_reads, args=(src, there))
    p.start()
    assert here.poll(10), "the child did not answer"
    data, fresh, pid = here.recv()
    p.join(10)
    here.close(), there.close()
    assert data == blob[1000:1100] and fresh and pid == p.pid != os.getpid()
    assert src.read(5, 5) == blob[5:10]  # the parent's pool still works
    src.close()


def test_basic_auth_from_the_url_and_headers(http_factory, blob):
    import base64
    srv = http_factory(auth="Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode())
    url = srv.url(BLOB_NAME).replace("http://", f"http://user:{SECRET}@")
    with open_source(url) as src:
        assert src.read(3, 3) == blob[3:6]
        assert SECRET not in repr(src) and SECRET not in src.url
    with pytest.raises(PermissionError, match="HTTP 401"):
        open_source(srv.url(BLOB_NAME))
    srv.knobs.auth = f"Bearer {SECRET}"
    with open_source(srv.url(BLOB_NAME), {"headers": {"Authorization": f"Bearer {SECRET}"}}) \
            as src:
        assert src.read(0, 3) == blob[:3]


def test_no_secret_in_log_lines(http_factory, blob, caplog):
    srv = http_factory(p503=0.3, preset=0.2, seed=2)
    url = srv.url(BLOB_NAME).replace("http://", f"http://user:{SECRET}@") + \
        f"?X-Amz-Signature={SECRET}"
    with caplog.at_level(logging.DEBUG):
        with open_source(url, {"retries": 20}) as src:
            for offset, length in ranges(len(blob), 10):
                assert src.read(offset, length) == blob[offset:offset + length]
    assert "retry" in caplog.text and "GET /blob.bin?<redacted>" in caplog.text
    assert SECRET not in caplog.text


def test_s3_options_on_an_http_url_are_refused(http):
    """They were dropped: the server was asked without the credentials the caller gave."""
    with pytest.raises(ValueError, match=r"'key', 'secret' are for s3:// URLs only; "
                                         r"'http://.*blob\.bin' takes headers") as e:
        open_source(http.url(BLOB_NAME), {"key": "AKIA", "secret": SECRET})
    assert SECRET not in str(e.value)
    with pytest.raises(ValueError, match=r"'anon' is for s3:// URLs only"):
        open_source(http.url(BLOB_NAME), {"anon": True})
