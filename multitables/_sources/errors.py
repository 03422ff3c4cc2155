"""The exceptions the byte sources raise, each refining the builtin a caller would catch."""

from __future__ import annotations


class SourceError(Exception):
    """Base of the sources' own exceptions (to be re-parented to the package's base error).

    Each subclass also derives from the builtin it refines (``OSError``, ``TimeoutError``...), so
    ``except OSError`` keeps working. Messages name the object by its redacted URL only: never a
    key, a token, a signature or a presigned query string.
    """


class ObjectChangedError(SourceError, OSError):
    """The object was replaced or truncated while it was being read (ETag, size or mtime differ).

    Rows from two versions of a file must never mix, so this is never retried.
    """


class SourceTimeoutError(SourceError, TimeoutError):
    """A server stopped answering: no byte arrived within ``timeout`` seconds, on every attempt."""


class TransferError(SourceError, OSError):
    """A transfer failed after every retry (5xx, resets, short bodies), or a server answered in a
    way that cannot give the bytes asked for (a broken ``Content-Range``, Range ignored on a large
    object)."""
