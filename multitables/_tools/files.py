"""The file a command names: a path, or a URL reached with ``--storage-options`` (internal)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._hdf5.remote import RemoteFile, file_of
from .._hdf5.source import FileRef


def file_arg(args: argparse.Namespace) -> FileRef:
    """``args.file`` as the read paths take it: the path, or a URL's ``RemoteFile`` reached
    with ``--storage-options`` (S3 settings not given there come from the AWS environment)."""
    options = None
    if getattr(args, "storage_options", None):
        try:
            options = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"error: --storage-options is not JSON: {exc}") from None
    try:
        return file_of(args.file, options)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None


def h5py_file(file: FileRef) -> Any:
    """What plain h5py opens for ``file``: the path, or a new block-cached file object over
    the object (a fresh cache each time, as a new ``h5py.File`` over fsspec would have)."""
    if isinstance(file, RemoteFile):
        from multitables._sources.blockfile import BlockFile
        return BlockFile(file.source)
    return file
