"""The HTTP/1.1 client under the remote sources, against scripted servers: the framings a server
may answer with (length, chunked, up to the close, interim 100s), kept-alive connections the
server closed, redirects, and broken answers retried then refused. Every server here answers a
bounded number of connections and stops by itself."""

from __future__ import annotations

import errno
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable

import pytest

from multitables._sources.base import SourceStats
from multitables._sources.transport import Transport
from multitables._sources.wire import Headers, Pool, ProtocolError, split_url
from multitables.errors import TransferError

Answer = Callable[[bytes], bytes | None]  # request head -> bytes to send (None: close)


class Scripted:
    """A server on 127.0.0.1 that answers each request of each connection with
    ``answer(head)``; ``keep`` says whether a connection is kept for the next request. At most
    ``limit`` requests in all, each connection idle for at most 5 s."""

    def __init__(self, answer: Answer, keep: bool = True, limit: int = 50,
                 tls: ssl.SSLContext | None = None, head_end: bytes = b"\r\n\r\n") -> None:
        self.answer, self.keep, self.limit, self.tls = answer, keep, limit, tls
        self.head_end = head_end  # b"": any bytes are a request (a TLS hello, say)
        self.requests: list[bytes] = []
        self.connections = 0
        self.current: socket.socket | None = None  # the connection being answered
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self, path: str = "/x") -> str:
        # The certificate names localhost; the redirect tests need a second host name.
        host = "localhost" if self.tls else "127.0.0.1"
        return f"http{'s' if self.tls else ''}://{host}:{self.port}{path}"

    def _serve(self) -> None:
        while len(self.requests) < self.limit:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.tls is not None:
                try:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError):
                    conn.close()  # the client refused our certificate
                    continue
            self.current = conn
            with conn:
                conn.settimeout(5)
                while len(self.requests) < self.limit:
                    head = b""
                    try:
                        while True:
                            piece = conn.recv(4096)
                            if not piece:
                                break
                            head += piece
                            if self.head_end in head:
                                break
                    except OSError:
                        break
                    if not head:
                        break
                    self.requests.append(head)
                    out = self.answer(head)
                    if out is None:
                        break
                    conn.sendall(out)
                    if not self.keep:
                        break

    def close(self) -> None:
        # shutdown, not close, wakes a thread blocked in accept or recv on Linux.
        for sock in (self.sock, self.current):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def scripted():
    servers: list[Scripted] = []

    def start(answer: Answer, **kw) -> Scripted:
        servers.append(Scripted(answer, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def fixed(body: bytes, status: str = "200 OK", extra: str = "") -> Answer:
    return lambda head: (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                         .encode() + body)


def get(url: str, pool: Pool | None = None, **headers: str) -> tuple[int, Headers, bytes]:
    pool = pool or Pool(4)
    resp = pool.request("GET", url, headers, 5)
    body = resp.read()
    resp.release_conn()
    return resp.status, resp.headers, body


def test_length_framed_answers_reuse_one_connection(scripted):
    srv = scripted(fixed(b"hello", extra="ETag: \"e1\"\r\nX-Twice: a\r\nx-twice: b\r\n"))
    pool = Pool(4)
    for _ in range(3):
        status, headers, body = get(srv.url(), pool)
        assert (status, body) == (200, b"hello")
        assert headers["etag"] == headers.get("ETag") == '"e1"' and "Etag" in headers
        assert headers["X-Twice"] == "a, b"
    assert srv.connections == 1 and len(srv.requests) == 3
    assert srv.requests[0].startswith(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:")
    pool.clear()


def test_chunked_and_close_delimited_bodies(scripted):
    chunked = scripted(lambda head: b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nTrailer: t\r\n\r\n")
    status, _, body = get(chunked.url())
    assert (status, body) == (404, b"hello, world")
    until_close = scripted(lambda head: b"HTTP/1.0 200 OK\r\n\r\nto the end", keep=False)
    assert get(until_close.url())[2] == b"to the end"


def test_interim_answers_are_skipped(scripted):
    srv = scripted(lambda head: b"HTTP/1.1 100 Continue\r\n\r\n" +
                   fixed(b"real")(head))  # type: ignore[operator]
    assert get(srv.url())[:3:2] == (200, b"real")


def test_a_kept_connection_the_server_closed_is_replaced_without_a_retry(scripted):
    # The server answers, then closes the connection while it sits idle in the pool.
    srv = scripted(fixed(b"abc"), keep=False)
    pool = Pool(4)
    for _ in range(3):
        assert get(srv.url(), pool)[2] == b"abc"
    assert srv.connections == 3


def test_a_server_that_closes_without_answering_is_a_connection_error(scripted):
    srv = scripted(lambda head: None)
    with pytest.raises(ProtocolError, match="closed the connection before answering"):
        get(srv.url())


@pytest.mark.parametrize("answer, match", [
    (b"SPDY/3 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "a bad header line"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (70 << 10) + b"\r\n\r\n", "head over"),
])
def test_broken_answers_are_retried_then_refused(scripted, answer, match):
    srv = scripted(lambda head: answer, limit=10)
    transport = Transport(timeout=5, retries=2, stats=SourceStats())

    def attempt(timeout: float) -> None:
        transport.send("GET", srv.url(), {}, timeout).close()

    with pytest.raises(TransferError, match=f"after 3 attempts: ProtocolError: .*{match}"):
        transport.with_retries("http://scripted/x", attempt)
    assert len(srv.requests) == 3
    transport.close()


def redirector(target_port: int) -> Answer:
    def answer(head: bytes) -> bytes:
        path = head.split(b" ")[1]
        if path.startswith(b"/loop"):
            return b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n"
        if path == b"/away":
            where = f"http://localhost:{target_port}/there"
            return f"HTTP/1.1 307 Moved\r\nLocation: {where}\r\nContent-Length: 0\r\n\r\n"\
                .encode()
        if path == b"/here":
            return b"HTTP/1.1 301 Moved\r\nLocation: /x?q=1\r\nContent-Length: 0\r\n\r\n"
        return fixed(b"landed " + path)(head)  # type: ignore[return-value, operator]
    return answer


def test_redirects_are_followed_and_credentials_stay_with_their_host(scripted):
    other = scripted(fixed(b"elsewhere"))
    srv = scripted(redirector(other.port))
    transport = Transport(timeout=5, retries=0, stats=SourceStats())
    auth = {"Authorization": "Basic c2VjcmV0", "X-Keep": "1"}
    resp = transport.send("GET", srv.url("/here"), auth, 5)
    assert (resp.status, resp.read()) == (200, b"landed /x?q=1")
    resp.release_conn()
    assert b"Authorization: Basic" in srv.requests[-1]  # the same host keeps them
    resp = transport.send("GET", srv.url("/away"), auth, 5)
    assert (resp.status, resp.read()) == (200, b"elsewhere")
    resp.release_conn()
    assert b"Authorization" not in other.requests[-1] and b"X-Keep: 1" in other.requests[-1]
    with pytest.raises(OSError, match="Too many redirects") as e:
        transport.send("GET", srv.url("/loop") + "?sig=hunter2", {}, 5)
    assert e.value.errno == errno.EIO and e.value.filename.endswith("/loop?<redacted>")
    # Signed requests are not redirected (a new URL needs a new signature): the 3xx is theirs.
    resp = transport.send("GET", srv.url("/here"), {}, 5, redirect=False)
    assert resp.status == 301
    resp.close()
    transport.close()


def test_kept_connections_past_descriptor_1023(scripted):
    """select() cannot watch a descriptor past 1023: each such connection was taken for
    dropped, and every request made a new one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip(f"this process may open only {hard} descriptors")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    held = [socket.socket() for _ in range(1030)]  # the next descriptors are past 1023
    try:
        srv = scripted(fixed(b"abc"))
        pool = Pool(4)
        for _ in range(3):
            assert get(srv.url(), pool)[2] == b"abc"
        assert srv.connections == 1
        pool.clear()
    finally:
        for s in held:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_an_ipv6_host_is_bracketed_in_the_host_header(scripted):
    try:
        probe = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    port = probe.getsockname()[1]
    seen = []

    def serve() -> None:
        conn, _ = probe.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            seen.append(head)
            conn.sendall(fixed(b"six")(head))  # type: ignore[arg-type, operator]

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert get(f"http://[::1]:{port}/x")[2] == b"six"
    finally:
        thread.join(10)
        probe.close()
    assert f"Host: [::1]:{port}\r\n".encode() in seen[0]


def test_network_errors_of_an_open_connection_are_retried_and_ours_are_not():
    transport = Transport(timeout=5, retries=2, stats=SourceStats())
    calls = []

    def attempt(timeout: float) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.ENETUNREACH, "Network is unreachable")
        return "done"

    assert transport.with_retries("http://h/x", attempt) == "done" and len(calls) == 3

    def missing(timeout: float) -> None:
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "No such object", "http://h/x")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        transport.with_retries("http://h/x", missing)
    assert len(calls) == 1


def test_requests_name_their_client(scripted):
    srv = scripted(fixed(b"x"))
    transport = Transport(timeout=5, retries=0, stats=SourceStats())
    transport.small("GET", srv.url(), {}, "http://scripted/x")
    assert b"\r\nUser-Agent: multitables\r\n" in srv.requests[-1]
    transport.small("GET", srv.url(), {"User-Agent": "mine"}, "http://scripted/x")
    assert b"\r\nUser-Agent: mine\r\n" in srv.requests[-1]
    transport.close()


def test_split_url():
    assert split_url("http://h/a/b?x=1") == ("http", "h", 80, "/a/b?x=1")
    # Encoded as browsers send it; what is encoded already (a signature) is left as it is.
    assert split_url("http://h/my file/é.h5?X-Amz-Signature=a%2Fb&q=c d")[3] == \
        "/my%20file/%C3%A9.h5?X-Amz-Signature=a%2Fb&q=c%20d"
    assert split_url("https://h:8443") == ("https", "h", 8443, "/")
    with pytest.raises(ValueError, match="not an http"):
        split_url("ftp://h/x")


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for localhost: (certificate file, key file)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    return cert, key


def test_tls(scripted, certificate):
    cert, key = certificate
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    srv = scripted(fixed(b"over tls"), tls=server_side)
    transport = Transport(timeout=5, retries=3, stats=SourceStats())

    def attempt(timeout: float) -> bytes:
        resp = transport.send("GET", srv.url(), {}, timeout)
        body = resp.read()
        resp.release_conn()
        return body

    # An unknown certificate is refused at once, not retried.
    with pytest.raises(OSError, match="TLS certificate check failed") as e:
        transport.with_retries(srv.url(), attempt)
    assert e.value.filename == srv.url() and transport.stats.retries == 0
    # Trusted, its answers are read, over one kept connection.
    transport.pool()._tls = ssl.create_default_context(cafile=str(cert))
    assert [transport.with_retries(srv.url(), attempt) for _ in range(3)] == [b"over tls"] * 3
    assert srv.connections == 2  # the refused one, then one for the three
    transport.close()


def test_https_to_a_plain_http_server_says_so(scripted):
    # A plain server answers the TLS hello with an HTTP error, as web servers do.
    srv = scripted(lambda head: b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
                   keep=False, limit=5, head_end=b"")
    transport = Transport(timeout=5, retries=1, stats=SourceStats())

    def attempt(timeout: float) -> None:
        transport.send("GET", srv.url().replace("http://", "https://"), {}, timeout).close()

    with pytest.raises(TransferError, match=r"after 2 attempts: .*does the server speak plain"):
        transport.with_retries("https://scripted/x", attempt)
    transport.close()
