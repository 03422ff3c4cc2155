"""An HTTP/1.1 server of a directory's files on 127.0.0.1 that honours Range and If-Match, with
knobs for first-byte latency, bandwidth per connection and seeded faults (503s, resets, short
bodies, Range ignored, an object replaced), and counters of what it answered."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Bounds, so that a client gone wrong cannot keep the server (or a test) busy for long.
MAX_REQUESTS = 100_000
IDLE_TIMEOUT = 10.0       # a keep-alive connection idle this long is closed
STALL_LIMIT = 30.0        # a stalled answer gives up after this long even if never stopped
SEND_PIECE = 64 << 10  # bytes sent between two checks of the bandwidth knob

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclasses.dataclass
class Knobs:
    """What the server does to each request. Probabilities are per GET, drawn from one RNG
    seeded with ``seed``, in this order: 503, reset, short body, Range ignored."""

    latency: float = 0.0          # seconds before the first byte of every answer
    bandwidth: float = 0.0        # bytes per second per connection (0: unlimited)
    p503: float = 0.0             # 503 SlowDown with a Retry-After of 0
    preset: float = 0.0           # a TCP reset, half way through the body
    pshort: float = 0.0           # the full Content-Length, half the body, then a clean close
    pignore_range: float = 0.0    # 200 with the whole object although Range was asked
    stall: bool = False           # read the request, never answer (until stop or STALL_LIMIT)
    auth: str = ""                # if set, the Authorization header every request must carry
    seed: int = 0


class RangeServer:
    """``with RangeServer(root) as srv: srv.url("a.h5")``. ``forbidden`` holds names answered
    403; ``counts`` counts connections, requests, GETs, statuses and injected faults; ``log``
    keeps (method, path, Range, status) of each request."""

    def __init__(self, root: str | os.PathLike, **knobs) -> None:
        self.root = Path(root)
        self.knobs = Knobs(**knobs)
        self.forbidden: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.log: list[tuple[str, str, str, int]] = []
        self._rng = random.Random(self.knobs.seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> RangeServer:
        server = self

        class Handler(_Handler):
            owner = server

        httpd = _Server(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="rangeserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wake handler threads blocked on an idle keep-alive connection
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        deadline = time.monotonic() + 5
        while self._conns and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{urllib.parse.quote(name)}"

    # -- the objects -------------------------------------------------------------------------
    def replace(self, name: str, data: bytes) -> None:
        """Replace an object atomically; its ETag changes (the mtime is moved on explicitly,
        since two writes within a clock tick would keep it)."""
        path = self.root / name
        old = path.stat().st_mtime_ns if path.exists() else 0
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.utime(tmp, ns=(old + 1_000_000, old + 1_000_000))
        os.replace(tmp, path)

    def etag(self, name: str) -> str:
        st = (self.root / name).stat()
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'

    def draw(self, p: float) -> bool:
        if p <= 0:
            return False
        with self._lock:
            return self._rng.random() < p

    def count(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self.counts[k] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog of 5 drops the SYNs of a client opening dozens of
    # connections at once, which then wait a second for the kernel's retransmit.
    request_queue_size = 128

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that closes mid-body (it took its slice of a 200, or timed out) is normal
        # here; anything else is printed as usual.
        import sys
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: RangeServer
    timeout = IDLE_TIMEOUT

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: with Nagle's algorithm a small body waits
        # for the client's delayed ACK of the headers (40 ms a request), as no real server does.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.owner._lock:
            self.owner._conns.add(self.connection)
            self.owner.counts["connections"] += 1

    abort = False

    def finish(self) -> None:
        try:
            if self.abort:
                # SO_LINGER with a zero timeout: close() sends RST instead of FIN. Closed here,
                # before socketserver's shutdown(SHUT_WR) would send a FIN first.
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
                self.wfile.close()
                self.rfile.close()
                self.connection.close()
            else:
                super().finish()
        finally:
            with self.owner._lock:
                self.owner._conns.discard(self.connection)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self.answer(head=True)

    def do_GET(self) -> None:
        self.answer(head=False)

    def answer(self, head: bool) -> None:
        srv, knobs = self.owner, self.owner.knobs
        srv.count("requests", self.command)
        if srv.counts["requests"] > MAX_REQUESTS:
            self.close_connection = True
            return
        if knobs.stall:
            srv.count("stalled")
            srv._stopping.wait(STALL_LIMIT)
            self.close_connection = True
            return
        if knobs.latency and srv._stopping.wait(knobs.latency):
            self.close_connection = True
            return
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
        path = srv.root / name
        rng = self.headers.get("Range", "")
        status = self.respond(name, path, rng, head)
        with srv._lock:
            if len(srv.log) < MAX_REQUESTS:
                srv.log.append((self.command, name, rng, status))
        srv.count(f"status {status}")

    def respond(self, name: str, path: Path, rng: str, head: bool) -> int:
        srv, knobs = self.owner, self.owner.knobs
        if knobs.auth and self.headers.get("Authorization") != knobs.auth:
            return self.plain(401, b"unauthorized")
        if name in srv.forbidden:
            return self.plain(403, b"forbidden")
        if ".." in Path(name).parts or not path.is_file():
            return self.plain(404, b"not found")
        if not head and srv.draw(knobs.p503):
            srv.count("fault 503")
            return self.plain(503, b"<Error><Code>SlowDown</Code></Error>", {"Retry-After": "0"})
        with open(path, "rb") as f:  # one open: a replacement between stat and read is moot
            st = os.fstat(f.fileno())
            size = st.st_size
            etag = f'"{size:x}-{st.st_mtime_ns:x}"'
            status, start, n = self.body(size, rng, head)
            if status == 416:
                return self.plain(416, b"", {"Content-Range": f"bytes */{size}"})
            if_match = self.headers.get("If-Match")
            if if_match is not None and if_match != "*" and etag not in [
                    t.strip() for t in if_match.split(",")]:
                return self.plain(412, b"precondition failed")
            headers = {"ETag": etag, "Accept-Ranges": "bytes"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{start + n - 1}/{size}"
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            if head:
                return status
            if srv.draw(knobs.preset):
                srv.count("fault reset")
                self.send_body(f, start, n // 2)
                self.abort = True  # see finish()
                self.close_connection = True
                return status
            if srv.draw(knobs.pshort):
                srv.count("fault short")
                self.send_body(f, start, n // 2)
                self.close_connection = True
                return status
            self.send_body(f, start, n)
        return status

    def body(self, size: int, rng: str, head: bool) -> tuple[int, int, int]:
        """(status, first byte, length) of the body for the Range asked (206), or of the whole
        object (200) when none is asked or the fault knob ignores it; 416 for a range past the
        end."""
        srv, knobs = self.owner, self.owner.knobs
        m = _RANGE.fullmatch(rng.strip())
        if m and not (not head and srv.draw(knobs.pignore_range)):
            first, last = m[1], m[2]
            if first == "":
                start, stop = max(size - int(last or 0), 0), size
            else:
                start, stop = int(first), min(int(last) + 1 if last else size, size)
            if start >= size or start >= stop:
                return 416, 0, 0
            return 206, start, stop - start
        if m:
            srv.count("fault ignore range")
        return 200, 0, size

    def plain(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> int:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        return status

    def send_body(self, f: Any, start: int, n: int) -> None:
        """Bytes ``start:start + n`` of file ``f``, paced to the bandwidth knob a piece at a
        time: by ``sendfile`` (the kernel copies them from the page cache: this server's CPU is
        not what a client's figures measure), or by one write when they fit in a piece (a
        socket's ``sendfile`` costs a selector and a stat a call: more than a small body's copy)."""
        rate = self.owner.knobs.bandwidth
        piece = SEND_PIECE if rate else max(n, 1)
        t0 = time.monotonic()
        sent = 0
        try:
            while sent < n:
                size = min(piece, n - sent)
                if n <= SEND_PIECE:
                    data = os.pread(f.fileno(), size, start + sent)
                    self.wfile.write(data)
                    got = len(data)
                else:
                    got = self.connection.sendfile(f, start + sent, size)
                if not got:  # the file was cut short under us: a short body
                    self.close_connection = True
                    return
                sent += got
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0 and self.owner._stopping.wait(ahead):
                        self.close_connection = True
                        return
        finally:
            with self.owner._lock:
                self.owner.counts["bytes sent"] += sent
