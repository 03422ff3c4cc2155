"""An HTTP/1.1 server of a directory's files on 127.0.0.1 that honours Range and If-Match, with
knobs for first-byte latency, bandwidth per connection and seeded faults (503s, resets, short
bodies, Range ignored, an object replaced), and counters of what it answered.

It answers as ``http.server``'s ``BaseHTTPRequestHandler`` did (the same status lines, headers
and error pages, byte for byte), but reads and writes its raw sockets itself: a thread per
connection, the request head read by ``recv`` into a buffer and split here, the answer's head
sent by one write (with the body, when that is small). Through ``http.server`` (headers parsed by
``email.feedparser``, a selector per sendfile) a 128 KiB ranged GET cost this server 0.11-0.14 ms
of CPU, taken from the two cores a client's benchmark shares with it; 0.05-0.065 ms here."""

from __future__ import annotations

import dataclasses
import os
import random
import re
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from collections import Counter
from http import HTTPStatus
from pathlib import Path

# Bounds, so that a client gone wrong cannot keep the server (or a test) busy for long.
MAX_REQUESTS = 100_000
IDLE_TIMEOUT = 10.0       # a keep-alive connection idle this long is closed
STALL_LIMIT = 30.0        # a stalled answer gives up after this long even if never stopped
SEND_PIECE = 64 << 10  # bytes sent between two checks of the bandwidth knob

MAX_LINE = 65536          # a longer request line is answered 414, a longer header line 431
MAX_HEADERS = 100         # more header lines than this, the empty one ending them included: 431
RECV_SIZE = 64 << 10

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# A header line as email's parser takes it; the first other line ends the headers for it.
_HEADER_NAME = re.compile(r"[\041-\071\073-\176]*")
# What http.server's BaseHTTPRequestHandler wrote (that module imports email and more: the
# tests and the benchmark's server process start faster without it): its Server header, reason
# phrases and error page.
_SERVER = "BaseHTTP/0.6 Python/" + sys.version.split()[0]
_REASONS = {s.value: (s.phrase, s.description) for s in HTTPStatus}
_ERROR_PAGE = """\
<!DOCTYPE HTML>
<html lang="en">
    <head>
        <meta charset="utf-8">
        <title>Error response</title>
    </head>
    <body>
        <h1>Error response</h1>
        <p>Error code: %(code)d</p>
        <p>Message: %(message)s.</p>
        <p>Error code explanation: %(code)s - %(explain)s.</p>
    </body>
</html>
"""
_ERROR_TYPE = "text/html;charset=utf-8"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

_date: tuple[int, str] = (-1, "")


def _http_date() -> str:
    """The Date header, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        t = time.gmtime(now)  # as email.utils.formatdate(now, usegmt=True), in any locale
        _date = (now, f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} "
                      f"{t.tm_year:04d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")
    return _date[1]


def _escape(text: str) -> str:
    """As html.escape(text, quote=False)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
        self._listener: socket.socket | None = None
        self._port = 0
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> RangeServer:
        # A backlog of 128: a short one drops the SYNs of a client opening dozens of
        # connections at once, which then wait a second for the kernel's retransmit.
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        # Bounds each accept even if stop()'s shutdown did not wake it.
        listener.settimeout(0.5)
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, args=(listener,),
                                        name="rangeserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
            except OSError:
                pass
            if self._thread is not None:
                self._thread.join(5)
            listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wake connection threads blocked on an idle keep-alive connection
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while self._conns and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> RangeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return self._port

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{urllib.parse.quote(name)}"

    def _accept(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)  # e.g. out of file descriptors: no busy loop
                continue
            with self._lock:  # registered here, so that stop() sees every connection
                self._conns.add(conn)
                self.counts["connections"] += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        peer: object = None
        handler = _Connection(self, conn)
        try:
            peer = conn.getpeername()
            # No send or receive blocks longer than IDLE_TIMEOUT: the kernel's own timeouts (a
            # blocking socket sends a body by one sendfile call, not one a poll), which end in
            # EAGAIN (BlockingIOError).
            timeval = struct.pack("ll", int(IDLE_TIMEOUT), int(IDLE_TIMEOUT % 1 * 1e6))
            conn.settimeout(None)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            # A large body goes out by sendfile after its head's write: with Nagle's algorithm
            # it would wait for the client's delayed ACK of the head (40 ms a request).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler.handle()
        except (ConnectionError, TimeoutError, BlockingIOError):
            # A client that closes mid-body (it took its slice of a 200, or timed out) is
            # normal here, as is one idle past the kernel's timeouts (EAGAIN).
            pass
        except Exception:
            print("-" * 40, file=sys.stderr)
            print("Exception occurred during processing of request from", peer,
                  file=sys.stderr)
            traceback.print_exc()
            print("-" * 40, file=sys.stderr)
        finally:
            try:
                if handler.abort:
                    # SO_LINGER with a zero timeout: close() sends RST instead of FIN.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                else:
                    conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            conn.close()
            with self._lock:
                self._conns.discard(conn)

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


class _Connection:
    """One client connection: requests read and answered in turn until one closes it."""

    def __init__(self, owner: RangeServer, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock
        self.buf = b""            # bytes received and not yet read
        self.pos = 0
        self.close = True         # close the connection after this request
        self.abort = False        # close it with a reset
        self.command = ""
        self.version = ""
        self.path = ""
        self.headers: dict[str, str] = {}

    def handle(self) -> None:
        self.close = True
        self.handle_one()
        while not self.close:
            self.handle_one()

    def readline(self, limit: int) -> bytes:
        """A line with its end, at most ``limit`` bytes, or what is left at the end of the
        stream (as a file's readline)."""
        while True:
            end = self.buf.find(b"\n", self.pos, self.pos + limit)
            if end >= 0:
                line = self.buf[self.pos:end + 1]
                self.pos = end + 1
                return line
            if len(self.buf) - self.pos >= limit:
                line = self.buf[self.pos:self.pos + limit]
                self.pos += limit
                return line
            data = self.sock.recv(RECV_SIZE)
            if not data:
                line = self.buf[self.pos:]
                self.buf, self.pos = b"", 0
                return line
            self.buf = self.buf[self.pos:] + data
            self.pos = 0

    # -- the request -------------------------------------------------------------------------
    def handle_one(self) -> None:
        line = self.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            self.command = self.version = ""
            self.error(414)
            return
        if not line:
            self.close = True
            return
        if not self.parse(line):
            return
        if self.command not in ("GET", "HEAD"):
            self.error(501, f"Unsupported method ({self.command!r})")
            return
        self.answer(head=self.command == "HEAD")

    def parse(self, raw: bytes) -> bool:
        """The request line and headers, as ``BaseHTTPRequestHandler.parse_request`` took them;
        False after an error answered (or none, for an empty line)."""
        self.command = ""
        self.version = version = "HTTP/0.9"
        self.close = True
        requestline = str(raw, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:
            version = words[-1]
            numbers = version[5:].split(".") if version.startswith("HTTP/") else []
            if (len(numbers) != 2 or not all(n.isdigit() and len(n) <= 10 for n in numbers)
                    or not all(n.isascii() for n in numbers)):
                self.error(400, f"Bad request version ({version!r})")
                return False
            number = int(numbers[0]), int(numbers[1])
            if number >= (1, 1):
                self.close = False
            if number >= (2, 0):
                self.error(505, f"Invalid HTTP version ({version[5:]})")
                return False
            self.version = version
        if not 2 <= len(words) <= 3:
            self.error(400, f"Bad request syntax ({requestline!r})")
            return False
        command, self.path = words[:2]
        if len(words) == 2:
            self.close = True
            if command != "GET":
                self.error(400, f"Bad HTTP/0.9 request type ({command!r})")
                return False
        self.command = command
        if self.path.startswith("//"):
            self.path = "/" + self.path.lstrip("/")
        if not self.read_headers():
            return False
        conntype = self.headers.get("connection", "").lower()
        if conntype == "close":
            self.close = True
        elif conntype == "keep-alive":
            self.close = False
        if (self.headers.get("expect", "").lower() == "100-continue"
                and self.version >= "HTTP/1.1"):
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def read_headers(self) -> bool:
        """``headers``: lower-cased name to the first value given, as email's parser reads
        them (a line of neither a name nor a continuation ends them); False after a 431."""
        lines: list[str] = []
        buf, pos = self.buf, self.pos
        end = buf.find(b"\r\n\r\n", pos)
        if buf.startswith(b"\r\n", pos):  # no header at all
            self.pos = pos + 2
        elif (0 <= end - pos <= MAX_LINE
              and buf.count(b"\n", pos, end) == buf.count(b"\r\n", pos, end)):
            # The usual case, read at once: all of them here, no line too long, all ended by
            # CRLF (a bare LF ends a line too: such heads are read line by line below).
            lines = str(buf[pos:end], "iso-8859-1").split("\r\n")
            self.pos = end + 4
        else:
            while True:
                line = self.readline(MAX_LINE + 1)
                if len(line) > MAX_LINE:
                    self.error(431, "Line too long",
                               f"got more than {MAX_LINE} bytes when reading header line")
                    return False
                if len(lines) >= MAX_HEADERS:
                    break
                if line in (b"\r\n", b"\n", b""):
                    break
                lines.append(str(line, "iso-8859-1"))
        if len(lines) >= MAX_HEADERS:  # (http.client counted the empty line too)
            self.error(431, "Too many headers", f"got more than {MAX_HEADERS} headers")
            return False
        headers: dict[str, str] = {}
        key = None
        for text in lines:
            if text[0] in " \t":  # a continuation of the previous header
                if key is not None:
                    headers[key] += "\r\n" + text.rstrip("\r\n")
                continue
            name, colon, value = text.partition(":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                break
            value = value.lstrip(" \t").rstrip("\r\n")
            key = name.lower()
            if key not in headers:
                headers[key] = value
            else:
                key = None
        self.headers = headers
        return True

    # -- the answer --------------------------------------------------------------------------
    def answer(self, head: bool) -> None:
        srv, knobs = self.owner, self.owner.knobs
        srv.count("requests", self.command)
        if srv.counts["requests"] > MAX_REQUESTS:
            self.close = True
            return
        if knobs.stall:
            srv.count("stalled")
            srv._stopping.wait(STALL_LIMIT)
            self.close = True
            return
        if knobs.latency and srv._stopping.wait(knobs.latency):
            self.close = True
            return
        name = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path.lstrip("/"))
        rng = self.headers.get("range", "")
        status = self.respond(name, os.path.join(srv.root, name), rng, head)
        with srv._lock:
            if len(srv.log) < MAX_REQUESTS:
                srv.log.append((self.command, name, rng, status))
            srv.counts[f"status {status}"] += 1

    def respond(self, name: str, path: str, rng: str, head: bool) -> int:
        srv, knobs = self.owner, self.owner.knobs
        if knobs.auth and self.headers.get("authorization") != knobs.auth:
            return self.plain(401, b"unauthorized")
        if name in srv.forbidden:
            return self.plain(403, b"forbidden")
        # (Path's parts of a name hold ".." exactly when its "/"-separated pieces do.)
        if ".." in name.split("/") or not os.path.isfile(path):
            return self.plain(404, b"not found")
        if not head and srv.draw(knobs.p503):
            srv.count("fault 503")
            return self.plain(503, b"<Error><Code>SlowDown</Code></Error>", {"Retry-After": "0"})
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:  # one open: a replacement between stat and read is moot
            st = os.fstat(fd)
            size = st.st_size
            etag = f'"{size:x}-{st.st_mtime_ns:x}"'
            status, start, n = self.body(size, rng, head)
            if status == 416:
                return self.plain(416, b"", {"Content-Range": f"bytes */{size}"})
            if_match = self.headers.get("if-match")
            if if_match is not None and if_match != "*" and etag not in [
                    t.strip() for t in if_match.split(",")]:
                return self.plain(412, b"precondition failed")
            headers = {"ETag": etag, "Accept-Ranges": "bytes"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{start + n - 1}/{size}"
            headers["Content-Length"] = str(n)
            response = self.response_head(status, headers)
            if head:
                self.sock.sendall(response)
                return status
            if srv.draw(knobs.preset):
                srv.count("fault reset")
                self.send_body(response, fd, start, n // 2)
                self.abort = True  # see RangeServer._serve
                self.close = True
                return status
            if srv.draw(knobs.pshort):
                srv.count("fault short")
                self.send_body(response, fd, start, n // 2)
                self.close = True
                return status
            self.send_body(response, fd, start, n)
        finally:
            os.close(fd)
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

    def response_head(self, status: int, headers: dict[str, str],
                      reason: str | None = None) -> bytes:
        """Status line, Server, Date, then ``headers``; nothing to an HTTP/0.9 request."""
        if self.version == "HTTP/0.9":
            return b""
        if reason is None:
            reason = _REASONS[status][0] if status in _REASONS else ""
        text = f"HTTP/1.1 {status} {reason}\r\nServer: {_SERVER}\r\nDate: {_http_date()}\r\n"
        text += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        return (text + "\r\n").encode("latin-1")

    def plain(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> int:
        head = self.response_head(status, {**(headers or {}), "Content-Length": str(len(body))})
        self.sock.sendall(head if self.command == "HEAD" else head + body)
        return status

    def error(self, status: int, message: str | None = None, explain: str | None = None) -> None:
        """An error page, as ``BaseHTTPRequestHandler.send_error`` wrote it; closes."""
        short, long = _REASONS.get(status, ("???", "???"))
        message = short if message is None else message
        explain = long if explain is None else explain
        page = _ERROR_PAGE % {"code": status, "message": _escape(message),
                              "explain": _escape(explain)}
        body = page.encode("utf-8", "replace")
        head = self.response_head(status, {"Connection": "close", "Content-Type": _ERROR_TYPE,
                                           "Content-Length": str(len(body))}, message)
        self.close = True
        self.sock.sendall(head if self.command == "HEAD" else head + body)

    def send_body(self, head: bytes, fd: int, start: int, n: int) -> None:
        """``head``, then bytes ``start:start + n`` of file ``fd``, paced to the bandwidth knob a
        piece at a time: by ``sendfile`` (the kernel copies them from the page cache: this
        server's CPU is not what a client's figures measure), or with the head in one write
        when they fit in a piece (a sendfile call costs more than a small body's copy)."""
        srv = self.owner
        rate = srv.knobs.bandwidth
        piece = SEND_PIECE if rate else max(n, 1)
        sent = 0
        try:
            if not n:
                self.sock.sendall(head)
            t0 = time.monotonic()
            while sent < n:
                size = min(piece, n - sent)
                if n <= SEND_PIECE:
                    data = os.pread(fd, size, start + sent)
                    self.sock.sendall(head + data)
                    got = len(data)
                else:
                    if head:
                        # Not corked to leave with the body (MSG_MORE): that cost the server
                        # and its client more CPU than the separate segment.
                        self.sock.sendall(head)
                    got = self.sendfile(fd, start + sent, size)
                head = b""
                if not got:  # the file was cut short under us: a short body
                    self.close = True
                    return
                sent += got
                if rate:
                    ahead = sent / rate - (time.monotonic() - t0)
                    if ahead > 0 and srv._stopping.wait(ahead):
                        self.close = True
                        return
        finally:
            with srv._lock:
                srv.counts["bytes sent"] += sent

    def sendfile(self, fd: int, offset: int, count: int) -> int:
        """Up to ``count`` bytes of ``fd`` from ``offset`` (fewer at its end), as many
        sendfile calls as the socket's blocking writes take."""
        out = self.sock.fileno()
        sent = 0
        while sent < count:
            got = os.sendfile(out, fd, offset + sent, count - sent)
            if not got:
                break
            sent += got
        return sent
