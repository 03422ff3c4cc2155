"""Ranged GETs with checked responses, bounded retries and a per-process, fork-safe connection
pool (:mod:`.wire`): the network machinery under the HTTP and S3 sources."""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .._engine import hooks
from ..errors import ObjectChangedError, SourceTimeoutError, TransferError
from .base import SourceStats
from .options import redact_url
from .wire import Pool, Response, split_url

log = logging.getLogger("multitables.sources")

# A 200 (the whole object) answering a ranged GET is used when the object is at most this big:
# reading past the bytes before the range costs less than failing. A bigger object is retried
# (a proxy may drop Range now and then) and then refused: the remote read paths need ranges.
WHOLE_OBJECT_LIMIT = 16 << 20
# Bytes per read from a response: between two reads the per-request deadline is checked.
PIECE = 1 << 20
# Error bodies are read up to this size (for S3's error code), the rest is dropped.
ERROR_BODY_LIMIT = 64 << 10
BACKOFF_BASE = 0.05
BACKOFF_CAP = 5.0
REDIRECTS = (301, 302, 303, 307, 308)
# Errors of a connection that was open (the route lost, the interface down): retried, as a
# reset is. A refused or reset connection is a ConnectionError already.
NETWORK_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN,
                            errno.ENETRESET, errno.EHOSTDOWN, errno.ENOTCONN})
# Some hosts refuse requests that name no client.
USER_AGENT = "multitables"
# Sent to the first host only: a redirect elsewhere drops them (as browsers and urllib3 do).
PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

# S3 error codes of a 400 that mean "not allowed" (an expired token, a wrong region in the
# credential scope, an unsigned request to a server that needs signatures).
AUTH_CODES = frozenset({"ExpiredToken", "InvalidToken", "TokenRefreshRequired",
                        "AuthorizationHeaderMalformed", "MissingSecurityHeader",
                        "UnsupportedAlgorithm", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "AuthorizationQueryParametersError", "AccessDenied"})
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
_QUERY = re.compile(r"\?[^\s'\")]*")


class Retry(Exception):
    """One attempt failed in a way worth retrying (internal to the retry loop)."""

    def __init__(self, reason: str, retry_after: float | None = None, timeout: bool = False):
        super().__init__(reason)
        self.reason, self.retry_after, self.timeout = reason, retry_after, timeout


class Pin:
    """The version of an object pinned at open: its size, and its ETag or else Last-Modified.
    Every later response must agree; a strong ETag is also sent as ``If-Match``."""

    def __init__(self, size: int, etag: str | None, last_modified: str | None) -> None:
        self.size, self.etag, self.last_modified = size, etag, last_modified

    def version(self) -> str:
        """What names the version: the ETag, else Last-Modified."""
        return self.etag or f"last-modified:{self.last_modified}"

    def conditions(self) -> dict[str, str]:
        # If-Match compares strongly: a weak ETag (W/"...") would fail every request.
        if self.etag and not self.etag.startswith("W/"):
            return {"If-Match": self.etag}
        return {}

    def check(self, headers: Mapping[str, str], display: str, total: int | None) -> None:
        etag = headers.get("ETag")
        changed = None
        if self.etag is not None and etag is not None and etag != self.etag:
            changed = f"ETag {self.etag} at open, {etag} now"
        elif self.etag is None and self.last_modified is not None and \
                headers.get("Last-Modified") not in (None, self.last_modified):
            changed = f"Last-Modified {self.last_modified} at open, " \
                      f"{headers.get('Last-Modified')} now"
        elif total is not None and total != self.size:
            changed = f"{self.size} bytes at open, {total} now"
        if changed:
            raise ObjectChangedError(f"{display} was replaced while it was read ({changed})")

    def __reduce__(self) -> tuple:
        return (Pin, (self.size, self.etag, self.last_modified))


def content_range(headers: Mapping[str, str]) -> tuple[int, int, int | None] | None:
    """``Content-Range: bytes a-b/total`` as (a, b, total or None); ``bytes */total`` (a 416)
    as (-1, -1, total); None if absent or malformed."""
    m = _CONTENT_RANGE.fullmatch(headers.get("Content-Range", "").strip())
    if m is None:
        return None
    total = None if m[3] == "*" else int(m[3])
    return (-1, -1, total) if m[1] is None else (int(m[1]), int(m[2]), total)


def scrub(text: str) -> str:
    """``text`` without query strings (a library's message may quote a presigned URL)."""
    return _QUERY.sub("?<redacted>", text)


def s3_error_code(body: bytes) -> str:
    """``<Code>`` and ``<Message>`` of an S3 error body, and nothing else: the rest of it may
    echo the string to sign or the access key id."""
    code = re.search(rb"<Code>([^<]{1,100})</Code>", body)
    message = re.search(rb"<Message>([^<]{1,300})</Message>", body)
    parts = [m[1].decode("utf-8", "replace") for m in (code, message) if m]
    return ": ".join(parts)


def raise_for_status(status: int, headers: Mapping[str, str], body: bytes, display: str,
                     hint: str = "") -> None:
    """Map a non-success HTTP status to the exception a caller expects, or ``Retry``."""
    detail = s3_error_code(body)
    code = detail.partition(":")[0]
    why = f"HTTP {status}" + (f", {detail}" if detail else "") + (f"; {hint}" if hint else "")
    if status in (404, 410):
        raise FileNotFoundError(errno.ENOENT, f"No such object ({why})", display)
    if status in (401, 403) or (status == 400 and code in AUTH_CODES):
        raise PermissionError(errno.EACCES, f"Access denied ({why})", display)
    if status in (412, 416):
        raise ObjectChangedError(f"{display} was replaced while it was read ({why})")
    if status in (408, 429) or status >= 500:
        after = headers.get("Retry-After", "")
        raise Retry(why, float(after) if after.isdigit() else None)
    raise OSError(errno.EIO, f"Unexpected answer ({why})", display)


class Transport:
    """A connection pool for one source, made lazily in the process that uses it (after a fork
    the child makes its own: sockets and TLS state are never shared with the parent), plus the
    retry loop: jittered exponential backoff on 5xx, 408/429, resets, timeouts and short bodies, all
    within ``timeout * (retries + 1)`` seconds."""

    def __init__(self, timeout: float, retries: int, stats: SourceStats,
                 maxsize: int = 10, redirects: int = 5) -> None:
        self.timeout, self.retries, self.stats = timeout, retries, stats
        self.maxsize, self.redirects = maxsize, redirects
        self._lock = threading.Lock()
        self._pool: Pool | None = None
        self._pid = 0
        # Called once a request is refused for its credentials: True when it found other ones,
        # and the request is worth sending again (S3Client: keys rotated in the environment).
        self.renew: Callable[[], bool] | None = None
        self.warned_whole = False  # that the server ignores Range (once: it costs every read)
        _live.add(self)

    def pool(self) -> Pool:
        p = self._pool
        if p is not None and self._pid == os.getpid():
            return p
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                # An inherited pool is the parent's: a child drops its copies of the sockets
                # (``_after_fork_in_child``) and makes its own connections.
                self._pool = Pool(self.maxsize)
                self._pid = os.getpid()
            return self._pool

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # another thread may have held it at the fork
        if self._pool is not None:
            self._pool.forget_in_child()
        self._pool = None

    def close(self) -> None:
        with self._lock:
            p, self._pool = self._pool, None
            if p is not None and self._pid == os.getpid():
                p.clear()

    def send(self, method: str, url: str, headers: dict[str, str], timeout: float,
             redirect: bool = True) -> Response:
        """One request, its redirects followed (up to ``redirects``) when ``redirect``; the
        body is left unread."""
        hops, asked = (self.redirects if redirect else 0), url
        for _ in range(hops + 1):
            resp = self.pool().request(method, url, headers, timeout)
            if log.isEnabledFor(logging.DEBUG):
                _, host, port, target = split_url(url)
                log.debug("%s:%d: %s %s -> %d", host, port, method, scrub(target), resp.status)
            location = resp.headers.get("Location")
            if not hops or resp.status not in REDIRECTS or not location:
                return resp
            resp.close()
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target)[:2] != urllib.parse.urlsplit(url)[:2]:
                headers = {k: v for k, v in headers.items()
                           if k.lower() not in PRIVATE_HEADERS}
            if resp.status == 303:
                method = "GET" if method != "HEAD" else method
            url = target
        raise OSError(errno.EIO, f"Too many redirects (over {hops})", redact_url(asked))

    def with_retries(self, display: str, attempt: Callable[[float], Any]) -> Any:
        """Call ``attempt(timeout)`` until it returns, retrying on ``Retry`` and on transport
        errors; raise ``SourceTimeoutError`` or ``TransferError`` naming ``display`` when the
        attempts or the time run out. Other exceptions pass at once."""
        deadline = time.monotonic() + self.timeout * (self.retries + 1)
        n = 0
        renewed = False
        while True:
            n += 1
            remaining = deadline - time.monotonic()
            t0 = time.monotonic()
            try:
                return attempt(max(min(self.timeout, remaining), 0.01))
            except Retry as e:
                failure = e
            except PermissionError:
                if renewed or self.renew is None or not self.renew():
                    raise
                renewed = True  # once: keys that are refused again are refused
                continue
            except ssl.SSLCertVerificationError as e:
                raise OSError(errno.EIO, scrub(f"TLS certificate check failed ({e})"),
                              display) from None
            except (ConnectionError, TimeoutError, ssl.SSLError) as e:
                failure = transport_failure(e)
            except OSError as e:
                if e.errno not in NETWORK_ERRNOS:
                    raise  # ours (FileNotFoundError, ObjectChangedError...) or not the network's
                failure = transport_failure(e)
            finally:
                self.stats.add(latency=time.monotonic() - t0)
            remaining = deadline - time.monotonic()
            if n > self.retries or remaining <= 0:
                if failure.timeout:
                    raise SourceTimeoutError(
                        errno.ETIMEDOUT, f"No answer within {self.timeout:g} s "
                        f"({_attempts(n)}, retries={self.retries})", display) from None
                raise TransferError(errno.EIO, f"Transfer failed after {_attempts(n)}: "
                                    f"{failure.reason}", display) from None
            pause = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (n - 1)))
            if failure.retry_after is not None:
                pause = max(pause, failure.retry_after)
            pause = min(pause, max(remaining - 0.01, 0))
            log.debug("%s: retry %d in %.3f s after %s", display, n, pause, failure.reason)
            self.stats.add(retries=1)
            time.sleep(pause)

    def _ranged_get(self, url: str, byte_range: str, headers: Mapping[str, str],
                    conditions: Mapping[str, str],
                    sign: Callable[[str, str, dict], dict] | None, timeout: float) -> Any:
        """One GET of ``bytes=byte_range``, signed when ``sign`` is given (then not redirected:
        a redirect would need a new signature)."""
        h = {"User-Agent": USER_AGENT, **headers, "Range": f"bytes={byte_range}",
             "Accept-Encoding": "identity", **conditions}
        if sign is not None:
            h = sign("GET", url, h)
        resp = self.send("GET", url, h, timeout, redirect=sign is None)
        self.stats.add(requests=1)
        return resp

    def probe(self, url: str, headers: Mapping[str, str], display: str,
              sign: Callable[[str, str, dict], dict] | None = None) -> Pin:
        """Size and version of an object, from a GET of its first byte (one request: unlike a
        HEAD, its error body says which of bucket or key is missing, and it shows whether the
        server honours Range). An empty object answers 416 with ``bytes */0``."""
        def attempt(timeout: float) -> Pin:
            resp = self._ranged_get(url, "0-0", headers, {}, sign, timeout)
            reuse = False
            try:
                # Some servers (rclone serve s3) answer a range with 200 and a Content-Range.
                if resp.status in (206, 416) or (resp.status == 200 and "Content-Range" in
                                                 resp.headers):
                    cr = content_range(resp.headers)
                    if cr is None or cr[2] is None:
                        raise TransferError(errno.EIO, "No object size in Content-Range "
                                            f"{resp.headers.get('Content-Range')!r}", display)
                    size = cr[2]
                    if resp.status != 416:
                        self._expect_length(resp, min(size, 1))
                        self._read(resp, [memoryview(bytearray(min(size, 1)))], min(size, 1),
                                   deadline_of(timeout, 1))
                        reuse = True
                elif resp.status == 200:
                    length = resp.headers.get("Content-Length", "")
                    if not length.isdigit():
                        raise TransferError(errno.EIO, "The server gives neither "
                                            "Content-Range nor Content-Length: the object's "
                                            "size is unknown", display)
                    size = int(length)
                else:
                    body = resp.read(ERROR_BODY_LIMIT)
                    self.stats.add(fetched=len(body))
                    raise_for_status(resp.status, resp.headers, body, display)
                return Pin(size, resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
            finally:
                if not reuse:
                    resp.close()
                resp.release_conn()
        return self.with_retries(display, attempt)

    def small(self, method: str, url: str, headers: dict[str, str], display: str,
              sign: Callable[[str, str, dict], dict] | None = None,
              limit: int = 16 << 20) -> tuple[Any, bytes]:
        """A request whose answer is small (a listing page): (headers, body) of a 200, else the
        mapped exception. Bodies over ``limit`` bytes are refused."""
        def attempt(timeout: float) -> tuple[Any, bytes]:
            h = {"User-Agent": USER_AGENT, **headers}
            h = sign(method, url, h) if sign is not None else h
            resp = self.send(method, url, h, timeout, redirect=sign is None)
            self.stats.add(requests=1)
            try:
                body = resp.read(limit + 1)
                self.stats.add(fetched=len(body))
                if resp.status != 200:
                    raise_for_status(resp.status, resp.headers, body[:ERROR_BODY_LIMIT],
                                     display)
                if len(body) > limit:
                    raise OSError(errno.EFBIG, f"Answer over {limit} bytes", display)
                length = resp.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != len(body):
                    raise Retry(f"short body: {len(body)} of {length} bytes")
                return resp.headers, body
            finally:
                resp.close()
                resp.release_conn()
        return self.with_retries(display, attempt)

    def get_range(self, url: str, offset: int, segments: Sequence[memoryview], pin: Pin,
                  display: str, sign: Callable[[str, str, dict], dict] | None = None,
                  headers: Mapping[str, str] | None = None,
                  landed: Callable[[int], None] | None = None) -> None:
        """Fill ``segments`` with the bytes from ``offset`` on by one ranged GET (retried),
        checking the status, ``Content-Range``, ``Content-Length`` and the pinned version;
        ``landed(k)`` once segment ``k`` is in (``Source.read_segments``)."""
        length = sum(s.nbytes for s in segments)
        end = offset + length - 1
        reported = 0  # segments handed to ``landed``: a retry writes them no more

        def land(k: int) -> None:
            nonlocal reported
            if k >= reported and landed is not None:
                reported = k + 1
                landed(k)

        def attempt(timeout: float) -> None:
            into = segments if not reported else _spared(segments, reported)
            resp = self._ranged_get(url, f"{offset}-{end}", headers or {}, pin.conditions(),
                                    sign, timeout)
            done = False
            try:
                # Some servers (rclone serve s3) answer a range with 200 and a Content-Range.
                if resp.status == 206 or (resp.status == 200 and "Content-Range" in
                                          resp.headers):
                    cr = content_range(resp.headers)
                    if cr is None or cr[0] != offset or cr[1] != end:
                        raise TransferError(errno.EIO, f"Bad Content-Range "
                                            f"{resp.headers.get('Content-Range')!r} for bytes "
                                            f"{offset}-{end}", display)
                    pin.check(resp.headers, display, cr[2])
                    self._expect_length(resp, length)
                    self._read(resp, into, length, deadline_of(timeout, length), land)
                elif resp.status == 200:
                    pin.check(resp.headers, display, None)
                    self._expect_length(resp, pin.size)
                    if not self.warned_whole:
                        self.warned_whole = True
                        log.warning("%s: the server ignores Range; each read fetches the "
                                    "whole object (%d bytes)", display, pin.size)
                    if pin.size > WHOLE_OBJECT_LIMIT:
                        raise Retry(f"the server ignored Range (HTTP 200 with all {pin.size} "
                                    "bytes); ranged GETs are needed for objects over "
                                    f"{WHOLE_OBJECT_LIMIT} bytes")
                    skip = memoryview(bytearray(min(offset, PIECE)))
                    pos = 0
                    while pos < offset:
                        n = min(offset - pos, skip.nbytes)
                        self._read(resp, [skip[:n]], n, deadline_of(timeout, n))
                        pos += n
                    self._read(resp, into, length, deadline_of(timeout, length), land)
                    # The rest of the object is not wanted: the connection is closed below.
                    return
                else:
                    body = resp.read(ERROR_BODY_LIMIT)
                    raise_for_status(resp.status, resp.headers, body, display)
                done = True
            finally:
                if not done:
                    resp.close()  # mid-body: this connection cannot be reused
                resp.release_conn()
        self.with_retries(display, attempt)

    @staticmethod
    def _expect_length(resp: Response, length: int) -> None:
        got = resp.headers.get("Content-Length")
        if got is not None and (not got.isdigit() or int(got) != length):
            raise Retry(f"Content-Length {got!r} where {length} bytes were asked")
        if resp.headers.get("Content-Encoding", "identity") != "identity":
            raise Retry(f"Content-Encoding {resp.headers['Content-Encoding']!r} though "
                        "identity was asked")

    def _read(self, resp: Response, segments: Sequence[memoryview], length: int,
              deadline: float, landed: Callable[[int], None] | None = None) -> None:
        readinto = resp.readinto
        got = 0
        try:
            for k, seg in enumerate(segments):
                pos = 0
                while pos < seg.nbytes:
                    if time.monotonic() > deadline:
                        raise Retry(f"too slow: {got} of {length} bytes in time", timeout=True)
                    n = readinto(seg[pos:pos + PIECE])
                    if not n:
                        raise Retry(f"short body: {got} of {length} bytes")
                    pos += n
                    got += n
                if landed is not None:
                    landed(k)
        finally:
            self.stats.add(fetched=got)


def _spared(segments: Sequence[memoryview], upto: int) -> list[memoryview]:
    """``segments`` with the first ``upto`` (already handed over) replaced by a scratch buffer
    of their sizes: a retried GET reads their bytes again and drops them."""
    scratch = memoryview(bytearray(max(s.nbytes for s in segments[:upto])))
    return [scratch[:s.nbytes] if k < upto else s for k, s in enumerate(segments)]


def deadline_of(timeout: float, nbytes: int) -> float:
    """When a body of ``nbytes`` must have arrived: each read of a piece may stall ``timeout``
    (the socket's limit), and the whole may take a piece's stall per piece. This bounds a
    server that trickles bytes, which a per-read timeout alone would not."""
    return time.monotonic() + timeout * (1 + nbytes // PIECE)


def transport_failure(e: BaseException) -> Retry:
    timeout = isinstance(e, TimeoutError)
    reason = "timed out" if timeout else scrub(f"{type(e).__name__}: {e}")
    if isinstance(e, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(e):
        reason += " (does the server speak plain http?)"
    return Retry(reason, timeout=timeout)


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


_live: weakref.WeakSet[Transport] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for t in list(_live):
        t._after_fork_in_child()


hooks.on_fork("connections", after_in_child=_after_fork_in_child)
