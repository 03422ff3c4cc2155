"""An S3 object as a byte source: ranged GETs signed with SigV4 by botocore's signer, over the
same transport as HTTP, plus a bounded prefix listing (ListObjectsV2) for globs."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .base import RemoteSource, SourceStats
from .options import (
    Location,
    S3Settings,
    StorageOptions,
    parse_location,
    resolve_s3,
    storage_options,
)
from .transport import Pin, Transport

log = logging.getLogger("multitables.sources")

# A listing stops with an error past this many keys, rather than paging for ever.
MAX_LIST_KEYS = 1_000_000
NO_CREDENTIALS_HINT = ("no AWS credentials were found: pass storage_options={'key': ..., "
                       "'secret': ...}, set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                       "pass anon=True for a public bucket")


class S3Client:
    """Addressing and signing for one endpoint and set of credentials. Path-style URLs
    (``endpoint/bucket/key``) for a custom endpoint; virtual-hosted ones on AWS, except for
    bucket names with dots (which a wildcard TLS certificate does not cover)."""

    def __init__(self, settings: S3Settings, options: StorageOptions, stats: SourceStats,
                 maxsize: int = 10) -> None:
        self.settings, self.options = settings, options
        self.transport = Transport(options.timeout, options.retries, stats, maxsize=maxsize,
                                   redirects=0)
        self._auth: Any = _signer(settings)
        self._lock = threading.Lock()
        self._tried = 0.0  # when credentials were last resolved again (monotonic)
        self.transport.renew = self._renew

    def _fresh(self) -> Any:
        """The signer, with the environment's credentials resolved again first when they
        expire within ``REFRESH_BEFORE`` s (at most once every ``REFRESH_EVERY`` s)."""
        expires = self.settings.expires
        if expires is None or time.time() < expires - REFRESH_BEFORE:
            return self._auth
        with self._lock:
            expires = self.settings.expires  # another thread's refresh may have moved it on
            if expires is not None and time.time() >= expires - REFRESH_BEFORE and \
                    time.monotonic() - self._tried >= REFRESH_EVERY:
                self._tried = time.monotonic()
                found = resolve_s3(self.options)
                if found.signed:
                    self.settings = dataclasses.replace(
                        self.settings, access_key=found.access_key,
                        secret_key=found.secret_key, session_token=found.session_token,
                        expires=found.expires)
                    self._auth = _signer(self.settings)
                    log.debug("%s: AWS credentials resolved again before they expire",
                              self.settings.endpoint_url)
            return self._auth

    def _renew(self) -> bool:
        """A request was refused for its credentials: resolve the environment's again (keys
        rotated in a credentials file, a token expired without a known expiry), at most once
        every ``REFRESH_EVERY`` s. True when they differ from those refused. Keys given in
        ``storage_options`` are the caller's: never replaced."""
        if self.options.key or self.options.anon or self._auth is None:
            return False
        with self._lock:
            if time.monotonic() - self._tried < REFRESH_EVERY:
                return False
            self._tried = time.monotonic()
            found = resolve_s3(self.options)
            old = self.settings
            if not found.signed or (found.access_key, found.secret_key, found.session_token) \
                    == (old.access_key, old.secret_key, old.session_token):
                return False
            self.settings = dataclasses.replace(
                old, access_key=found.access_key, secret_key=found.secret_key,
                session_token=found.session_token, expires=found.expires)
            self._auth = _signer(self.settings)
            log.debug("%s: AWS credentials refused, resolved again", old.endpoint_url)
            return True

    def url(self, bucket: str, key: str = "", query: Mapping[str, str] | None = None) -> str:
        parts = urllib.parse.urlsplit(self.settings.endpoint_url)
        path = urllib.parse.quote(key, safe="/~")
        if self.settings.path_style or "." in bucket:
            url = f"{self.settings.endpoint_url}/{bucket}/{path}"
        else:
            url = f"{parts.scheme}://{bucket}.{parts.netloc}{parts.path}/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(sorted(query.items()),
                                                quote_via=urllib.parse.quote)
        return url

    def sign(self, method: str, url: str, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` plus SigV4's (Authorization, X-Amz-Date, X-Amz-Content-SHA256, and
        X-Amz-Security-Token with a session token); unchanged when anonymous."""
        auth = self._fresh()
        if auth is None:
            return headers
        from botocore.awsrequest import AWSRequest
        request = AWSRequest(method=method, url=url, headers=headers)
        auth.add_auth(request)
        return dict(request.headers.items())

    @property
    def hint(self) -> str:
        return "" if self._auth is not None or self.options.anon else NO_CREDENTIALS_HINT

    def probe(self, bucket: str, key: str, display: str) -> Pin:
        try:
            return self.transport.probe(self.url(bucket, key), dict(self.options.headers),
                                        display, sign=self.sign)
        except PermissionError as e:
            if self.hint:
                e.strerror = f"{e.strerror}; {self.hint}"
            raise

    def list_prefix(self, bucket: str, prefix: str = "",
                    max_keys: int = MAX_LIST_KEYS) -> list[tuple[str, int, str | None]]:
        """(key, size, ETag) of every object under ``prefix`` in ``bucket``, in key order, by
        ListObjectsV2 pages of 1000; more than ``max_keys`` raises ``ValueError``."""
        found: list[tuple[str, int, str | None]] = []
        token: str | None = None
        display = f"s3://{bucket}/{prefix}"
        for _ in range(max_keys // 1000 + 2):
            query = {"list-type": "2", "prefix": prefix, "max-keys": "1000"}
            if token is not None:
                query["continuation-token"] = token
            _, body = self.transport.small("GET", self.url(bucket, "", query),
                                           dict(self.options.headers), display, sign=self.sign)
            page, token = _parse_listing(body)
            found.extend(page)
            if len(found) > max_keys:
                raise ValueError(f"more than {max_keys} objects under {display}")
            if token is None:
                return found
        raise ValueError(f"more than {max_keys} objects under {display}")

    def close(self) -> None:
        self.transport.close()


# Temporary credentials from the environment are resolved again this long before they expire
# (boto3 refreshes its own 10-15 minutes before), and at most this often if that fails.
REFRESH_BEFORE = 10 * 60.0
REFRESH_EVERY = 30.0


def _signer(settings: S3Settings) -> Any:
    """SigV4 with ``settings``' credentials; None without credentials (anonymous)."""
    if not settings.signed:
        return None
    from botocore.auth import S3SigV4Auth
    from botocore.credentials import Credentials
    return S3SigV4Auth(Credentials(settings.access_key, settings.secret_key,
                                   settings.session_token), "s3", settings.region)


def _parse_listing(body: bytes) -> tuple[list[tuple[str, int, str | None]], str | None]:
    root = ET.fromstring(body)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    page = []
    for item in root.iter(f"{ns}Contents"):
        key = item.findtext(f"{ns}Key")
        size = item.findtext(f"{ns}Size")
        if key is None or size is None:
            raise ValueError("an S3 listing entry without Key or Size")
        page.append((key, int(size), item.findtext(f"{ns}ETag")))
    truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
    token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    if truncated and not token:
        raise ValueError("an S3 listing says it is truncated but gives no continuation token")
    return page, token


class S3Source(RemoteSource):
    """``s3://bucket/key``: settings resolved at open (``storage_options``, then the AWS
    environment and config files, see :func:`~multitables._sources.options.resolve_s3`), one
    signed GET of the first byte pins size and ETag, later GETs send ``If-Match``.

    Wrong keys raise ``PermissionError``, a missing bucket or key ``FileNotFoundError``, each
    naming ``s3://bucket/key`` and S3's error code (never the keys or the signature).
    """


    def __init__(self, location: Location | str, options: StorageOptions | dict | None = None,
                 *, settings: S3Settings | None = None, pin: Pin | None = None,
                 maxsize: int = 10) -> None:
        super().__init__()
        if not isinstance(location, Location):
            location = parse_location(location)
        if location.scheme != "s3" or not location.key:
            raise ValueError(f"S3Source needs s3://bucket/key, not {location.display!r}")
        self.location, self.options = location, storage_options(options)
        self.url = location.display
        self.settings = settings if settings is not None else resolve_s3(self.options)
        self.client = S3Client(self.settings, self.options, self.stats, maxsize=maxsize)
        self._object_url = self.client.url(location.bucket, location.key)
        if pin is None:
            pin = self.client.probe(location.bucket, location.key, self.url)
        self.pin_to(pin)

    def read_segments(self, offset: int, segments: Sequence[memoryview],
                      landed: Callable[[int], None] | None = None) -> None:
        self.client.transport.get_range(self._object_url, offset, segments, self.pin, self.url,
                                        sign=self.client.sign,
                                        headers=dict(self.options.headers), landed=landed)

    def close(self) -> None:
        self.client.close()

    def __reduce__(self) -> tuple:
        # Settings travel resolved, so a worker reads no AWS config and makes no request.
        return (_pinned, (self.location, self.options, self.settings, self.pin,
                          self.client.transport.maxsize))


def _pinned(location: Location, options: StorageOptions, settings: S3Settings, pin: Pin,
            maxsize: int) -> S3Source:
    return S3Source(location, options, settings=settings, pin=pin, maxsize=maxsize)


def list_prefix(bucket: str, prefix: str = "",
                storage_options: Mapping[str, Any] | StorageOptions | None = None,
                max_keys: int = MAX_LIST_KEYS) -> list[tuple[str, int, str | None]]:
    """(key, size, ETag) of every object under ``s3://bucket/prefix``, in key order."""
    from . import options as _options
    opts = _options.storage_options(storage_options)
    client = S3Client(resolve_s3(opts), opts, SourceStats())
    try:
        return client.list_prefix(bucket, prefix, max_keys)
    finally:
        client.close()
