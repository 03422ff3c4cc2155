"""An HTTP(S) URL as a byte source: ranged GETs with ``If-Match`` on the ETag pinned at open."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence

from .base import RemoteSource
from .options import Location, StorageOptions, parse_location, storage_options
from .transport import Pin, Transport

# The storage_options of S3 only.
S3_ONLY = ("endpoint_url", "key", "secret", "token", "region", "anon")


class HTTPSource(RemoteSource):
    """An object behind an HTTP(S) URL. One GET of its first byte at open pins its size and
    ETag (or Last-Modified); every later GET asks ``If-Match`` and checks the answer, so a
    replaced object raises ``ObjectChangedError`` naming the URL.

    ``storage_options``: ``headers`` (sent with every request), ``timeout``, ``retries``;
    user:password in the URL becomes Basic authentication. Redirects are followed (up to 5).
    """


    def __init__(self, location: Location | str, options: StorageOptions | dict | None = None,
                 *, pin: Pin | None = None, maxsize: int = 10) -> None:
        super().__init__()
        if not isinstance(location, Location):
            location = parse_location(location)
        if location.scheme not in ("http", "https"):
            raise ValueError(f"HTTPSource needs an http(s) URL, not {location.display!r}")
        self.location, self.options = location, storage_options(options)
        self.url = location.display
        s3_only = [name for name in S3_ONLY if getattr(self.options, name)]
        if s3_only:  # they would be dropped, and the server asked without them
            raise ValueError(f"storage_options {', '.join(map(repr, s3_only))} "
                             f"{'is' if len(s3_only) == 1 else 'are'} for s3:// URLs only; "
                             f"{self.url!r} takes headers (Authorization, say), timeout and "
                             "retries")
        self.transport = Transport(self.options.timeout, self.options.retries, self.stats,
                                   maxsize=maxsize)
        headers = dict(self.options.headers)
        if location.basic_auth:
            token = base64.b64encode(location.basic_auth.encode("utf-8")).decode("ascii")
            headers["Authorization"] = f"Basic {token}"
        self._headers = headers
        if pin is None:
            pin = self.transport.probe(location.url, headers, self.url)
        self.pin_to(pin)

    def read_segments(self, offset: int, segments: Sequence[memoryview],
                      landed: Callable[[int], None] | None = None) -> None:
        self.transport.get_range(self.location.url, offset, segments, self.pin, self.url,
                                 headers=self._headers, landed=landed)

    def close(self) -> None:
        self.transport.close()

    def __reduce__(self) -> tuple:
        # The pin travels, not the connections: the worker's first GET checks the version.
        return (_pinned, (self.location, self.options, self.pin, self.transport.maxsize))


def _pinned(location: Location, options: StorageOptions, pin: Pin, maxsize: int) -> HTTPSource:
    return HTTPSource(location, options, pin=pin, maxsize=maxsize)
