"""The exceptions multitables raises, each refining the builtin a caller would catch."""

from __future__ import annotations


class _QueueClosedType:
    """The sentinel returned by ``queue.get()`` once a stream has ended."""

    _instance: _QueueClosedType | None = None

    def __new__(cls) -> _QueueClosedType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "QueueClosed"

    def __reduce__(self) -> str:
        return "QueueClosed"


QueueClosed = _QueueClosedType()


class MultitablesError(Exception):
    """The base of every exception multitables defines: ``except MultitablesError`` catches
    them all, while each also refines the builtin a caller would catch."""


class QueueClosedException(MultitablesError, RuntimeError):
    """A queue, stream or reader was used after it was closed (the name of multitables 2.0.1)."""


class ClosedError(QueueClosedException, ValueError):
    """Something was used after it was closed: a queue, a Reader, a stage, a Loader.

    It is a ``QueueClosedException`` (2.0.1's name) and a ``ValueError`` (what Python's own file
    objects raise after ``close()``), so ``except`` clauses written for either keep working.
    """


class SubprocessException(MultitablesError, RuntimeError):
    """A worker process failed: it raised, or it died (signal, OOM kill)."""


class SharedMemoryError(MultitablesError, MemoryError):
    """Shared memory could not be reserved, or a result does not fit its stage."""


class StagePoolExhausted(MultitablesError, RuntimeError):
    """Every stage of a pool holds a result nobody took, and nothing else could free one."""


class ObjectChangedError(MultitablesError, OSError):
    """A file or object was replaced or truncated while it was being read (its ETag, size or
    mtime differ from those pinned when it was opened). Rows of two versions never mix, so this
    is never retried. Messages name objects by their URL without credentials."""


class SourceTimeoutError(MultitablesError, TimeoutError):
    """A server stopped answering: no byte arrived within ``timeout`` seconds, on every attempt."""


class TransferError(MultitablesError, OSError):
    """A transfer failed after every retry (5xx, resets, short bodies), or a server answered in a
    way that cannot give the bytes asked for (a broken ``Content-Range``, Range ignored on a large
    object)."""


class TransformError(MultitablesError, RuntimeError):
    """A Loader's ``transform`` or ``batch_transform`` raised in a worker. The message names the
    columns, the row (or the batch's rows) and the original exception, and carries the worker's
    traceback text, the original's included."""


def remote_exception(type_: type[BaseException], message: str, where: str, tb_text: str,
                     attrs: dict | None = None) -> BaseException:
    """Rebuild an exception raised in a worker, keeping its type so ``except IndexError`` works.

    The worker's traceback text and where it failed are appended to the message; an OSError
    keeps its ``errno`` (``attrs``). Types whose constructor does not take one string (rare) come
    back as ``SubprocessException``.
    """
    text = f"{message}\n\n{where}; the worker's traceback:\n{tb_text}"
    errno = (attrs or {}).get("errno")
    try:
        return type_(errno, text) if errno is not None else type_(text)
    except Exception:
        return SubprocessException(f"{type_.__name__}: {text}")
