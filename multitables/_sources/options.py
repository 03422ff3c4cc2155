"""Where an object lives (a local path, ``s3://bucket/key`` or an HTTP(S) URL) and how to reach it
(``storage_options``), parsed and checked once, picklable, and never showing a secret."""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 4

# The keys ``storage_options`` accepts (the list; the names s3fs and fsspec use).
KNOWN_KEYS = ("endpoint_url", "key", "secret", "token", "region", "anon", "headers", "timeout",
              "retries")


@dataclasses.dataclass(frozen=True)
class Location:
    """A parsed location: ``scheme`` is ``"file"``, ``"http"``, ``"https"`` or ``"s3"``.

    ``url`` is what to request (for HTTP, with the query string a presigned URL needs, but
    without user:password, which becomes ``basic_auth``); ``display`` is safe to print.
    """

    scheme: str
    url: str
    display: str
    path: str = ""       # file: the local path
    bucket: str = ""     # s3
    key: str = ""        # s3
    basic_auth: str = dataclasses.field(default="", repr=False)

    def __repr__(self) -> str:
        return f"Location({self.display!r})"

    @property
    def remote(self) -> bool:
        return self.scheme != "file"


def redact_url(url: str) -> str:
    """``url`` without user:password and without its query string, which may hold a presigned
    URL's signature or a token: ``http://host/a.h5?<redacted>``.

    >>> redact_url("https://u:pw@host:8443/d/a.h5?X-Amz-Signature=abc")
    'https://host:8443/d/a.h5?<redacted>'
    """
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:  # an IPv6 literal
        netloc = f"[{netloc}]"
    if parts.port is not None:
        netloc += f":{parts.port}"
    query = "?<redacted>" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


def parse_location(location: str | os.PathLike) -> Location:
    """Split ``location`` into a :class:`Location`; a bad URL raises ``ValueError`` naming it.

    >>> parse_location("s3://bucket/dir/a.h5")
    Location('s3://bucket/dir/a.h5')
    >>> parse_location("/data/a.h5").scheme
    'file'
    """
    if isinstance(location, os.PathLike):
        location = os.fspath(location)
    if not isinstance(location, str):
        raise TypeError(f"a location is a path or a URL (str), not {type(location).__name__}")
    scheme = location.split("://", 1)[0].lower() if "://" in location else ""
    if scheme in ("", "file"):
        path = location[len("file://"):] if scheme else location
        return Location("file", path, path, path=path)
    if scheme == "s3":
        rest = location[len("s3://"):]
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"{location!r} names no bucket: expected s3://bucket/key")
        return Location("s3", location, f"s3://{bucket}/{key}", bucket=bucket, key=key)
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(location)
        if not parts.hostname:
            raise ValueError(f"{redact_url(location)!r} names no host")
        auth = ""
        if parts.username is not None:
            auth = urllib.parse.unquote(parts.username) + ":" + urllib.parse.unquote(
                parts.password or "")
            netloc = parts.netloc.rsplit("@", 1)[1]
            location = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        return Location(scheme, location, redact_url(location), basic_auth=auth)
    raise ValueError(f"unsupported location scheme {scheme!r} in {redact_url(location)!r}: "
                     "expected a local path, s3://, http:// or https://")


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """``storage_options`` after checking: every field has its type and a default.

    ``repr`` shows which secrets are set, never their values, nor header values (they often
    carry tokens).
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    region: str | None = None
    anon: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES

    def __repr__(self) -> str:
        shown = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("key", "secret", "token"):
                if value is not None:
                    shown.append(f"{f.name}=<set>")
            elif f.name == "headers":
                if value:
                    shown.append(f"headers=<{', '.join(k for k, _ in value)}>")
            elif value != f.default:
                shown.append(f"{f.name}={value!r}")
        return f"StorageOptions({', '.join(shown)})"

    __str__ = __repr__


def storage_options(options: Mapping[str, Any] | StorageOptions | None) -> StorageOptions:
    """Check a ``storage_options`` dict: an unknown key raises ``TypeError`` naming it; a bad
    value raises ``TypeError`` or ``ValueError`` naming the key (never the value of a secret).

    >>> storage_options({"timeout": 5, "anon": True})
    StorageOptions(anon=True, timeout=5.0)
    >>> storage_options({"secret_key": "x"})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: storage_options got an unexpected key 'secret_key'; known keys: endpoint_url, ...
    """
    if options is None:
        return StorageOptions()
    if isinstance(options, StorageOptions):
        return options
    if not isinstance(options, Mapping):
        raise TypeError(f"storage_options must be a dict, not {type(options).__name__}")
    for name in options:
        if name not in KNOWN_KEYS:
            raise TypeError(f"storage_options got an unexpected key {name!r}; known keys: "
                            f"{', '.join(KNOWN_KEYS)}")
    kw: dict[str, Any] = {}
    for name in ("endpoint_url", "key", "secret", "token", "region"):
        value = options.get(name)
        if value is not None and not isinstance(value, str):
            raise TypeError(f"storage_options[{name!r}] must be a str, not "
                            f"{type(value).__name__}")
        kw[name] = value or None
    if kw["endpoint_url"] is not None and not kw["endpoint_url"].startswith(
            ("http://", "https://")):
        raise ValueError(f"storage_options['endpoint_url'] must start with http:// or https://, "
                         f"got {redact_url(kw['endpoint_url'])!r}")
    anon = options.get("anon", False)
    if not isinstance(anon, bool):
        raise TypeError(f"storage_options['anon'] must be a bool, not {type(anon).__name__}")
    headers = options.get("headers") or {}
    if not isinstance(headers, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise TypeError("storage_options['headers'] must be a dict of str to str")
    timeout = options.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"storage_options['timeout'] must be a number of seconds, not "
                        f"{type(timeout).__name__}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"storage_options['timeout'] must be > 0 seconds, got {timeout}")
    retries = options.get("retries", DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"storage_options['retries'] must be an int, not "
                        f"{type(retries).__name__}")
    if retries < 0:
        raise ValueError(f"storage_options['retries'] must be >= 0, got {retries}")
    return StorageOptions(anon=anon, headers=tuple(sorted(headers.items())),
                          timeout=float(timeout), retries=retries, **kw)


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """How to reach and sign for S3, resolved once in the parent from ``storage_options`` and the
    AWS environment and config files, then pickled to the workers (which read no config)."""

    endpoint_url: str
    region: str
    path_style: bool
    access_key: str | None = dataclasses.field(default=None, repr=False)
    secret_key: str | None = dataclasses.field(default=None, repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)
    # Credentials from the AWS environment that expire (a session's, a role's, SSO's, the
    # instance's): when, in seconds since the epoch; the signer resolves them again before.
    expires: float | None = None

    @property
    def signed(self) -> bool:
        return self.access_key is not None and self.secret_key is not None

    def __repr__(self) -> str:
        return (f"S3Settings(endpoint_url={redact_url(self.endpoint_url)!r}, "
                f"region={self.region!r}, path_style={self.path_style}, "
                f"credentials={'<set>' if self.signed else None})")

    __str__ = __repr__


def resolve_s3(options: StorageOptions) -> S3Settings:
    """Fill what ``options`` leaves open the way boto3 would: ``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``, the shared config and credentials files (and,
    as boto3 does, the container and instance-metadata providers when nothing else gives keys).

    Credentials are frozen here, with their expiry when the environment's expire (``expires``):
    the signer resolves them again shortly before (``s3.S3Client.sign``), in whichever process
    signs, as boto3 refreshes its own.
    """
    session = None

    def botocore_session() -> Any:
        nonlocal session
        if session is None:
            import botocore.session
            session = botocore.session.Session()
        return session

    region = options.region or os.environ.get("AWS_REGION") or \
        botocore_session().get_config_variable("region") or "us-east-1"
    endpoint = options.endpoint_url
    if endpoint is None:
        from botocore.configprovider import ConfiguredEndpointProvider
        s = botocore_session()
        if not s.get_config_variable("ignore_configured_endpoint_urls"):
            endpoint = ConfiguredEndpointProvider(
                s.full_config, s.get_scoped_config(), "s3", environ=os.environ).provide()
    # A custom endpoint (MinIO, rclone, Ceph...) rarely has a wildcard DNS name per bucket, so
    # it gets path-style URLs; AWS itself gets virtual-hosted ones (path-style is deprecated).
    path_style = endpoint is not None
    if endpoint is None:
        endpoint = f"https://s3.{region}.amazonaws.com"
    key = secret = token = None
    expires: float | None = None
    if not options.anon:
        if options.key is not None or options.secret is not None:
            if options.key is None or options.secret is None:
                raise ValueError("storage_options gives only one of 'key' and 'secret'; "
                                 "S3 needs both (or neither, to use the AWS environment)")
            key, secret, token = options.key, options.secret, options.token
        else:
            credentials = botocore_session().get_credentials()
            if credentials is not None:
                frozen = credentials.get_frozen_credentials()
                key, secret, token = frozen.access_key, frozen.secret_key, frozen.token
                expiry = getattr(credentials, "_expiry_time", None)  # RefreshableCredentials
                if expiry is not None:
                    expires = expiry.timestamp()
    return S3Settings(endpoint.rstrip("/"), region, path_style, key, secret, token, expires)
