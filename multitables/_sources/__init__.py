"""Byte sources: the bytes of one object, by ``pread`` on a local file or by ranged GETs over
HTTP(S) and S3, pinned to one version, with a parallel range fetcher, a block-cached file object
for h5py, chunk maps and a local disk cache (internal)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .base import Source, SourceStats
from .local import LocalSource
from .options import Location, StorageOptions, parse_location, storage_options

__all__ = ["Source", "SourceStats", "LocalSource", "open_source", "parse_location",
           "storage_options", "Location", "StorageOptions"]


def open_source(location: str | os.PathLike,
                storage_options: Mapping[str, Any] | StorageOptions | None = None,
                **kwargs: Any) -> Source:
    """The :class:`Source` for a local path, ``s3://bucket/key`` or an ``http(s)://`` URL,
    pinned to the object's current version (one request for a remote object).

    ``storage_options`` is checked for every kind of location (an unknown key raises
    ``TypeError``), though a local file uses none of it. A missing object raises
    ``FileNotFoundError``, a refused one ``PermissionError``, both naming the location.
    """
    from . import options as _options  # the parameter shadows the module function's name

    loc = parse_location(location)
    opts = _options.storage_options(storage_options)
    if loc.scheme == "file":
        return LocalSource(loc.path)
    require_remote(loc.display)
    if loc.scheme == "s3":
        from .s3 import S3Source
        return S3Source(loc, opts, **kwargs)
    from .http import HTTPSource
    return HTTPSource(loc, opts, **kwargs)


# What an s3:// URL needs beyond the standard library (SigV4 signing); http(s) needs nothing.
REMOTE_MODULES = ("botocore",)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # an import hook that refuses it
        return False


def require_remote(display: str) -> None:
    """Say which extra a URL needs, rather than which module failed to import deep inside."""
    if not display.lower().startswith("s3://"):
        return
    missing = [name for name in REMOTE_MODULES if not _importable(name)]
    if missing:
        raise ImportError(f"reading {display} needs {' and '.join(missing)}: "
                          "pip install 'multitables[remote]'")
