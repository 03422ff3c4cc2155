"""A lean HTTP/1.1 client: kept-alive connections, one request at a time each, whose bodies are
read from the socket straight into the caller's buffers.

The remote sources send many ranged GETs of a chunk or two each (a shuffled Loader: one a unit,
about a thousand an epoch). urllib3 and http.client spent 0.4-0.5 ms of CPU on each (header
objects through the email parser, pool keys, URL parsing), more than the bytes cost; this spends
under 0.1. It speaks what object stores and web servers answer a GET: ``Content-Length`` bodies,
``chunked`` ones (error pages) and bodies up to the close; TLS through :mod:`ssl` with the
system's certificates."""

from __future__ import annotations

import errno
import select
import socket
import ssl
import threading
import urllib.parse
import weakref
from collections.abc import Mapping
from functools import lru_cache

# A response's status line and headers must fit: a server sending more is broken or hostile.
HEAD_LIMIT = 64 << 10
# Bytes a recv of the head asks for: the body's first bytes ride along and are copied once more,
# so few; the rest of the body goes from the socket to its destination.
HEAD_RECV = 4096
# Bytes a ``read`` (error pages, listings) takes at a time.
RECV_SIZE = 64 << 10


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 as spoken here (a bad status line, a head over
    ``HEAD_LIMIT``, a broken chunk): the connection is dropped and the request retried."""


class NoAnswer(ProtocolError):
    """The connection closed before a byte of the answer: on a kept connection, the server
    closed it idle as the request went."""


class Headers(dict):
    """A response's headers, by name in any case (stored lower-cased; repeats joined by
    ``", "``)."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def get(self, name: str, default=None):  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


_SAFE = "/%:@!$&'()*+,;=~-._"


@lru_cache(maxsize=256)
def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an http(s) URL, parsed once per URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {parts.scheme}://{parts.hostname or ''}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # Percent-encoded as browsers send it (a space, a non-ASCII name); what is encoded already
    # (a presigned URL, an S3 key) is left as it is: the target of a signature.
    target = urllib.parse.quote(parts.path or "/", safe=_SAFE) + (
        f"?{urllib.parse.quote(parts.query, safe=_SAFE + '?')}" if parts.query else "")
    return parts.scheme, parts.hostname, port, target


class Connection:
    """One socket to ``host:port`` (TLS for https), reused for request after request as long as
    each answer was read to its end."""

    def __init__(self, scheme: str, host: str, port: int, timeout: float,
                 tls: ssl.SSLContext | None) -> None:
        self.key = (scheme, host, port)
        try:
            sock = socket.create_connection((host, port), timeout)
        except socket.gaierror as e:
            raise ConnectionError(errno.EHOSTUNREACH, f"cannot resolve {host}: {e}") from None
        except (ConnectionError, TimeoutError):
            raise
        except OSError as e:  # no route, network down: worth retrying, as a refusal is
            raise ConnectionError(e.errno, f"cannot connect to {host}:{port}: {e.strerror}") \
                from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                assert tls is not None
                sock = tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        name = f"[{host}]" if ":" in host else host  # an IPv6 address is bracketed
        self.host_header = name if port == (443 if scheme == "https" else 80) else \
            f"{name}:{port}"
        self._spare = bytearray(HEAD_LIMIT)

    def dropped(self) -> bool:
        """Whether the server closed this idle connection (it is readable: EOF or junk)."""
        if self.sock is None:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:  # poll, not select: descriptors past 1023 are common in a busy process
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def request(self, method: str, target: str, headers: Mapping[str, str],
                timeout: float) -> Response:
        sock = self.sock
        if sock is None:
            raise ConnectionError(errno.ENOTCONN, "connection closed")
        lines = [f"{method} {target} HTTP/1.1"]
        if not any(k.lower() == "host" for k in headers):
            lines.append(f"Host: {self.host_header}")
        lines.extend(f"{k}: {v}" for k, v in headers.items())
        lines.append("\r\n")
        sock.settimeout(timeout)
        sock.sendall("\r\n".join(lines).encode("latin-1"))
        return self._response(method)

    def _response(self, method: str) -> Response:
        buf = self._spare
        view = memoryview(buf)
        got = seen = 0  # bytes in; bytes searched for the head's end
        while True:
            end = buf.find(b"\r\n\r\n", max(seen - 3, 0), got)
            seen = got
            if end >= 0:
                head = bytes(view[:end]).decode("latin-1")
                status, reason, version, fields = _parse_head(head)
                if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
                    rest = got - end - 4
                    view[:rest] = view[end + 4:got]
                    got, seen = rest, 0
                    continue
                return Response(self, method, status, reason, version, fields,
                                bytes(view[end + 4:got]))
            if got >= HEAD_LIMIT:
                raise ProtocolError(f"an answer's head over {HEAD_LIMIT} bytes")
            n = self.sock.recv_into(view[got:got + HEAD_RECV]) if self.sock is not None else 0
            if not n:
                if not got:
                    raise NoAnswer("the server closed the connection before answering")
                raise ProtocolError("the connection closed mid-head")
            got += n

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


def _parse_head(head: str) -> tuple[int, str, str, Headers]:
    status_line, _, rest = head.partition("\r\n")
    version, _, tail = status_line.partition(" ")
    code, _, reason = tail.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
    fields = Headers()
    for line in rest.split("\r\n") if rest else ():
        name, colon, value = line.partition(":")
        if not colon or not name or name[0] in " \t":
            raise ProtocolError(f"a bad header line: {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        seen = dict.get(fields, name)
        dict.__setitem__(fields, name, value if seen is None else f"{seen}, {value}")
    return int(code), reason, version, fields


class Response:
    """A status, its headers and a body to read: ``readinto``/``read`` stop at the body's end
    (0 bytes / ``b""`` then; also when the server closed early, for the caller to compare
    with the length it expected). ``release_conn`` gives the connection back to its pool
    once the body was read whole; ``close`` drops it."""

    def __init__(self, conn: Connection, method: str, status: int, reason: str, version: str,
                 headers: Headers, early: bytes) -> None:
        self.status, self.reason, self.headers = status, reason, headers
        self._conn: Connection | None = conn
        self._early = memoryview(early)  # body bytes that came with the head
        self._chunked = False
        self._chunk_left = 0
        length = headers.get("content-length")
        if method == "HEAD" or status in (204, 304):
            self._left: int | None = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._left, self._chunked = None, True
        elif length is not None:
            if not length.isdigit():
                raise ProtocolError(f"Content-Length {length[:40]!r}")
            self._left = int(length)
        else:
            self._left = None  # up to the close
        self.reusable = version == "HTTP/1.1" and self._left is not None and \
            "close" not in headers.get("connection", "").lower()
        self.pool: Pool | None = None

    # -- the raw bytes, early ones first
    def _recv_into(self, view: memoryview) -> int:
        if self._early.nbytes:
            n = min(view.nbytes, self._early.nbytes)
            view[:n] = self._early[:n]
            self._early = self._early[n:]
            return n
        if self._conn is None or self._conn.sock is None:
            return 0
        return self._conn.sock.recv_into(view)

    def _line(self) -> bytes:
        out = bytearray()
        one = memoryview(bytearray(1))
        while not out.endswith(b"\r\n"):
            if len(out) > 1024 or not self._recv_into(one):
                raise ProtocolError("a broken chunked body")
            out += one
        return bytes(out[:-2])

    def readinto(self, view: memoryview) -> int:
        if self._chunked:
            return self._chunk_into(view)
        want = view.nbytes if self._left is None else min(view.nbytes, self._left)
        if not want:
            return 0
        n = self._recv_into(view[:want])
        if self._left is not None:
            self._left -= n
            if n == 0:
                self.reusable = False  # closed early: a short body
        return n

    def _chunk_into(self, view: memoryview) -> int:
        if self._left == 0:
            return 0
        if not self._chunk_left:
            size = self._line().split(b";", 1)[0].strip()
            try:
                self._chunk_left = int(size, 16)
            except ValueError:
                raise ProtocolError(f"a bad chunk size {size[:20]!r}") from None
            if not self._chunk_left:
                while self._line():  # trailers, up to the empty line
                    pass
                self._left = 0
                return 0
        n = self._recv_into(view[:min(view.nbytes, self._chunk_left)])
        if not n:
            self.reusable = False
            return 0
        self._chunk_left -= n
        if not self._chunk_left and self._line():
            raise ProtocolError("a chunk longer than its size")
        return n

    def read(self, limit: int = -1) -> bytes:
        """Up to ``limit`` bytes of the body (all of it when negative)."""
        out = bytearray()
        piece = memoryview(bytearray(RECV_SIZE))
        while limit < 0 or len(out) < limit:
            want = piece.nbytes if limit < 0 else min(piece.nbytes, limit - len(out))
            n = self.readinto(piece[:want])
            if not n:
                break
            out += piece[:n]
        return bytes(out)

    @property
    def done(self) -> bool:
        return self._left == 0 and not self._early.nbytes

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def release_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self.reusable and self.done and self.pool is not None:
            self.pool.put(conn)
        else:
            conn.close()


class Pool:
    """Idle connections by (scheme, host, port), at most ``maxsize`` kept a host (more are
    closed when given back: the callers bound how many requests run at once). Made in the
    process that uses it; a forked child makes its own."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._idle: dict[tuple, list[Connection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        # A pool dropped without ``clear`` (its source never closed) closes its sockets.
        self._finalizer = weakref.finalize(self, _close_idle, self._idle, self._lock)

    def forget_in_child(self) -> None:
        """In a forked child: drop this (the parent's) pool's copies of its sockets, without
        its lock, which a parent thread may have held at the fork, and without a finalizer
        that would wait for it."""
        self._finalizer.detach()
        for conns in list(self._idle.values()):
            for conn in conns:
                conn.close()
        self._idle.clear()

    def request(self, method: str, url: str, headers: Mapping[str, str],
                timeout: float) -> Response:
        """Send one request, on an idle connection when one is left; again on another (idle or
        new) when the server turns out to have closed it before answering."""
        scheme, host, port, target = split_url(url)
        key = (scheme, host, port)
        while True:
            conn, reused = self._take(key), True
            if conn is None:
                conn, reused = Connection(scheme, host, port, timeout, self._context(scheme)), \
                    False
            try:
                resp = conn.request(method, target, headers, timeout)
            except (ConnectionError, ssl.SSLEOFError) as e:
                conn.close()
                # An idle connection the server closed as the request went: GETs and HEADs
                # are safe to send again. Each pass uses up an idle connection or is the last.
                if reused and (not isinstance(e, ProtocolError) or isinstance(e, NoAnswer)):
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            resp.pool = self
            return resp

    def _take(self, key: tuple) -> Connection | None:
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if not conn.dropped():
                    return conn
                conn.close()
        return None

    def put(self, conn: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) < self.maxsize:
                idle.append(conn)
                return
        conn.close()

    def _context(self, scheme: str) -> ssl.SSLContext | None:
        if scheme != "https":
            return None
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def clear(self) -> None:
        _close_idle(self._idle, self._lock)


def _close_idle(idle: dict[tuple, list[Connection]], lock: threading.Lock) -> None:
    with lock:
        conns = [c for cs in idle.values() for c in cs]
        idle.clear()
    for conn in conns:
        conn.close()
