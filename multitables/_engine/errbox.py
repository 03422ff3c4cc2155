"""A fixed area of shared memory that carries one exception from a worker to the consumer."""

from __future__ import annotations

import pickle
import struct
import traceback
from typing import Any

from ..errors import SubprocessException, remote_exception
from ._ringbuf import Word


class ErrorBox:
    """A fixed area of shared memory that carries one exception from a worker to the consumer.

    Layout: uint32 state (0 empty, 1 being written, 2 full), uint32 length, then the pickled
    (type, message, where, traceback text, attributes). The first writer wins; later errors are
    dropped.
    """

    HEADER = 8

    def __init__(self, buffer: Any, offset: int, nbytes: int):
        self.state = Word(buffer, offset)
        self.buffer = buffer
        self.offset = offset
        self.nbytes = nbytes

    def put(self, exc: BaseException, where: str) -> bool:
        """Store the exception; False if another one got there first. Returns only once the box
        is full, so a caller that then stops the stream cannot let the consumer see it empty."""
        if not self.state.compare_exchange(0, 1):
            self.state.wait_while(1, 5.0)
            return False
        tb = "".join(traceback.format_exception(exc))
        payload = _pickle_error(exc, where, tb, self.nbytes - self.HEADER)
        start = self.offset + self.HEADER
        self.buffer[start : start + len(payload)] = payload
        struct.pack_into("I", self.buffer, self.offset + 4, len(payload))
        self.state.store(2)
        return True

    def full(self) -> bool:
        return self.state.load() == 2

    def clear(self) -> None:
        self.state.store(0)

    def exception(self) -> BaseException:
        """The stored exception, rebuilt with its type (see ``errors.remote_exception``)."""
        (length,) = struct.unpack_from("I", self.buffer, self.offset + 4)
        start = self.offset + self.HEADER
        type_, message, where, tb, attrs = pickle.loads(self.buffer[start : start + length])
        return remote_exception(type_, message, where, tb, attrs)


def _pickle_error(exc: BaseException, where: str, tb: str, room: int) -> bytes:
    type_: type[BaseException] = type(exc)
    try:
        pickle.loads(pickle.dumps(type_))
    except Exception:
        type_ = SubprocessException
    message = str(exc) if type_ is type(exc) else f"{type(exc).__name__}: {exc}"
    # What callers test on an OSError besides its type.
    attrs = {}
    if isinstance(exc, OSError) and exc.errno is not None:
        attrs = {"errno": exc.errno}
        message = (exc.strerror or "") + (f": {exc.filename!r}" if exc.filename else "")
    while True:
        payload = pickle.dumps((type_, message, where, tb, attrs))
        if len(payload) <= room:
            return payload
        if not tb and len(message) <= 64:
            return pickle.dumps((type_, message, where[:200], "", attrs))
        # Keep the end of the traceback: it names the line that raised.
        tb = "...\n" + tb[len(tb) // 2 :] if len(tb) > 64 else ""
        message = message[: max(64, len(message) // 2)]
