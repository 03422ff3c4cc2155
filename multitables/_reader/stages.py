"""Stages: areas of shared memory that hold the result of one Reader request at a time.

A stage is one ``SharedArena``: a header (a state word that workers publish to, a few int64 of
result metadata, an ``ErrorBox``, the request being served, as bytes) and then the data. Workers
receive the stage's descriptor the first time they serve a request on it, so stages can be made
at any time.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from .._engine import timeouts
from .._engine._ringbuf import Counter, Word
from .._engine.errbox import ErrorBox
from .._engine.shm import PAGE, SharedArena, round_up
from ..errors import ClosedError, SharedMemoryError, StagePoolExhausted

# Stage states: the Reader moves IDLE to PENDING, a worker PENDING to DONE or FAILED, the
# consumer DONE or FAILED back to IDLE. See NOTE [ Worker shutdown logic ], step (3).
IDLE, PENDING, DONE, FAILED = 0, 1, 2, 3

_META = 64  # int64 result metadata (row counts of variable-size results) at this offset
_N_META = 8
# A request split into parts, each read by another worker: the parts finished, and the failed
# ones (the first records its error); the last part to finish publishes the state.
_PARTS_DONE = 128
_PARTS_FAILED = 192
_ERRORS = 256
_ERROR_BYTES = 16 << 10
# The request (readspec.put_wire) behind its length: most fit (a 64-row batch takes ~1.1 KB); a
# larger one travels down the worker's channel instead. The parts of a split request share the area.
_REQUEST = _ERRORS + _ERROR_BYTES
_REQUEST_BYTES = 48 << 10
MAX_PARTS = 16
_LENGTH = struct.Struct("<Q")
_DATA = round_up(_REQUEST + _REQUEST_BYTES, PAGE)


def _request_area(part: int, parts: int) -> tuple[int, int]:
    """Where part ``part`` of a request in ``parts`` parts lies in the header, and its room."""
    room = _REQUEST_BYTES // parts
    return _REQUEST + part * room, room


def check_fits(capacity: int, nbytes: int, shape, dtype) -> None:
    """``SharedMemoryError`` naming both sizes when a result does not fit a stage."""
    if nbytes > capacity:
        raise SharedMemoryError(
            f"stage holds {capacity} bytes but the result needs {nbytes} "
            f"(shape {tuple(shape)}, {np.dtype(dtype)}); make a larger stage"
        )


class StageMemory:
    """The mapped parts of a stage, in the consumer or in a worker."""

    def __init__(self, arena: SharedArena):
        self.arena = arena
        self.id = -1  # the Reader's number for it, as its workers know it
        self.sent_to: set[int] = set()  # workers that have mapped it
        # Set by the Reader: frees it here and in the workers that mapped it (a finalizer).
        self.forget: Callable[[], Any] | None = None
        self.capacity = arena.nbytes - _DATA
        self.state = Word(arena.buffer, 0)
        self.meta = arena.ndarray((_N_META,), np.int64, _META)
        self.header = arena.ndarray((_DATA,), np.uint8)  # where requests are written in place
        self.raw = arena.ndarray((self.capacity,), np.uint8, _DATA)  # the data area's bytes
        self.parts_done = Counter(arena.buffer, _PARTS_DONE)
        self.parts_failed = Counter(arena.buffer, _PARTS_FAILED)
        self.errors = ErrorBox(arena.buffer, _ERRORS, _ERROR_BYTES)

    @classmethod
    def create(cls, capacity: int) -> StageMemory:
        return cls(SharedArena(_DATA + capacity, name="multitables-stage"))

    def data(self, shape, dtype, at: int = 0) -> np.ndarray:
        """A view of the data area, from byte ``at``, as ``shape`` and ``dtype``; the caller
        checked that it fits."""
        return self.arena.ndarray(shape, dtype, _DATA + at)

    def request_area(self, part: int = 0, parts: int = 1) -> tuple[int, int]:
        """Where part ``part`` of a request in ``parts`` parts lies in ``header``, and its room
        (its length, then its bytes: see ``put_request``)."""
        return _request_area(part, parts)

    def put_request(self, message: bytes, part: int = 0, parts: int = 1) -> bool:
        """Write a request's bytes (or part ``part`` of ``parts``) for a worker to take; False
        when it does not fit its share of the area."""
        start, room = _request_area(part, parts)
        if _LENGTH.size + len(message) > room:
            return False
        _LENGTH.pack_into(self.arena.buffer, start, len(message))
        start += _LENGTH.size
        self.arena.buffer[start : start + len(message)] = message
        return True

    def request(self, part: int = 0, parts: int = 1) -> bytes:
        """The request's bytes that ``put_request`` wrote (in the worker)."""
        start, _ = _request_area(part, parts)
        (size,) = _LENGTH.unpack_from(self.arena.buffer, start)
        start += _LENGTH.size
        return self.arena.buffer[start : start + size]

    def close(self) -> None:
        """Drop the descriptor and this object's views; the pages go with the last object using
        them (a waiter in another thread keeps them mapped: it holds the state word)."""
        self.meta = self.raw = self.header = None  # type: ignore[assignment]
        self.arena.close()

    def discard(self) -> None:
        """Free it here, and in the workers that mapped it. Idempotent."""
        if self.forget is not None:
            self.forget()
        else:
            self.close()


class Claimant(Protocol):
    """What a stage knows of the request it serves."""

    def held_by(self, thread: int) -> bool:
        """Whether only ``thread`` can take the result (and so free the stage)."""


class Stage:
    """Shared memory for the result of one request at a time; made by ``create_stage``.

    Its ``memory`` changes when ``get()`` hands a large result over with it (see lending.py).

    Attributes
    ----------
    shape, dtype : the layout it was made for; ``nbytes`` is what any result must fit in.
    """

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, label: str):
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self.nbytes = math.prod(shape) * self.dtype.itemsize
        self.label = label
        self.memory = StageMemory.create(self.nbytes)
        self.owner: Claimant | None = None  # the request it serves, while it serves one
        self.closed = False
        self.id = -1  # the Reader's number for it
        self.pool: StagePool | None = None  # the pool it belongs to, if any

    def check_fits(self, nbytes: int, shape, dtype) -> None:
        check_fits(self.nbytes, nbytes, shape, dtype)

    def claim(self, request: Claimant) -> None:
        if self.closed:
            raise ClosedError(f"{self.label} is closed")
        if self.owner is not None:
            raise RuntimeError(
                f"{self.label} is still serving an earlier request; call get() (or one of the "
                "get_* methods) on that request first, or use a stage pool"
            )
        self.owner = request

    def free(self) -> None:
        """Ready for the next request: its result was taken. See NOTE [ Worker shutdown logic ],
        step (3)."""
        if not self.closed:
            # Before the stage is offered: a request that claims it next sets PENDING, which an
            # IDLE stored after that would overwrite (its get() would not wait for the worker).
            self.memory.state.set(IDLE)
        self.owner = None
        if self.pool is not None:
            self.pool.notify()  # a request may be waiting for a stage of the pool

    def close(self) -> None:
        """Free this stage's shared memory, here and in the workers. Idempotent."""
        if not self.closed:
            self.closed = True
            self.memory.discard()
            if self.pool is not None:
                self.pool.notify()

    def __repr__(self) -> str:
        return f"<Stage {self.shape} {self.dtype}, {self.nbytes} bytes>"

    def __reduce__(self):
        raise TypeError(
            f"{self.label} is shared memory of this process's Reader and does not pickle (a "
            "Reader does, as its arguments): make stages where they are used, e.g. in a "
            "DataLoader worker (worker_init_fn, or on first use in the Dataset)")


# How long a pool waits for another thread to take a result when only requests this thread made
# and kept hold its stages (see StagePool.take).
LONE_WAIT = 5.0


class StagePool:
    """``n`` stages used in turn: a request takes the next free one, waiting if all are busy."""

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self._turn = 0
        # Taken as it is where no wait follows (a free stage); reentrant, as the condition's
        # default lock is: a check failing in a wait closes the Reader, whose stages notify.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._waiting = 0  # threads in take() (raised before they look): free() wakes them
        for stage in stages:
            stage.pool = self

    def take(self, request: Claimant, check: Callable[[], None] | None = None) -> Stage:
        """Claim a free stage for ``request``, waiting until another thread frees one.

        The wait ends at once when a stage is freed or closed (``free``/``close`` notify); every
        CHECK_INTERVAL s it calls ``check`` (which raises if the Reader can no longer serve) and
        raises if no other thread runs (nothing could free a stage, whoever holds the requests),
        or after LONE_WAIT s without a stage freed if only this thread could free one (every
        busy one serves a request it made and kept, ``_only_this_thread_can_free``). See NOTE
        [ Worker shutdown logic ], step (3).
        """
        with self._lock:
            stage = self._next_free()
            if stage is not None:  # the commonest: no wait
                stage.claim(request)
                return stage
            self._waiting += 1  # before looking again: a stage freed after that look wakes the wait
            try:
                return self._claim_or_wait(request, check)
            finally:
                self._waiting -= 1

    def _next_free(self) -> Stage | None:
        """The next free stage in turn (None if none is), the turn moved past it; under the
        lock."""
        stages = self.stages
        n, turn = len(stages), self._turn
        for i in range(turn, turn + n):
            stage = stages[i % n]
            if stage.owner is None and not stage.closed:
                self._turn = (i + 1) % n
                return stage
        return None

    def _claim_or_wait(self, request: Claimant, check: Callable[[], None] | None) -> Stage:
        lone_since: float | None = None
        while True:
            stage = self._next_free()
            if stage is not None:
                stage.claim(request)
                return stage
            if all(stage.closed for stage in self.stages):
                raise ClosedError("the stage pool is closed")
            if check is not None:
                check()  # the Reader closed, a worker died: no stage will be freed
            if threading.active_count() == 1:
                raise self._exhausted(
                    "no other thread runs that could take one: call get() on a pending "
                    "request (RequestPool.next().get()) before making another, or make a larger "
                    "pool")
            if self._only_this_thread_can_free():
                # Only this thread could take a result: the wait cannot end, unless this
                # thread handed a request to another by hand (no RequestPool); give that
                # one LONE_WAIT s.
                now = time.monotonic()
                lone_since = now if lone_since is None else lone_since
                if now - lone_since > LONE_WAIT:
                    raise self._exhausted(
                        "call get() on a pending request first, make a larger pool, or hand "
                        "requests to other threads through a RequestPool")
            else:
                lone_since = None
            # free() and close() notify; the timeout only bounds the time between checks.
            self._cond.wait(timeouts.CHECK_INTERVAL)

    def _exhausted(self, advice: str) -> StagePoolExhausted:
        return StagePoolExhausted(f"all {len(self.stages)} stages of the pool hold results that "
                                  f"were not collected; {advice}")

    def _only_this_thread_can_free(self) -> bool:
        """Whether every busy stage serves a request this thread made and kept to itself (not
        handed to a RequestPool): then only this thread, which is about to wait, could take a
        result and free a stage, and the wait would never end."""
        me = threading.get_ident()
        return all(stage.owner is not None and stage.owner.held_by(me)
                   for stage in self.stages if not stage.closed)

    def notify(self) -> None:
        if self._waiting:
            with self._cond:
                self._cond.notify_all()

    def close(self) -> None:
        for stage in self.stages:
            stage.close()

    def __reduce__(self):
        return self.stages[0].__reduce__()  # says why it does not pickle

    @property
    def nbytes(self) -> int:
        return self.stages[0].nbytes

