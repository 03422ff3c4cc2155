"""Futures of Reader requests: the result of a read being done by a worker, and a FIFO of them.

A ``Request`` gives its result once (a copy, a function applied in place, or a view in a context
manager) and then frees its stage for the next request.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from typing import Any

import numpy as np

from .._engine import timeouts
from .lending import lendable
from .owner import Owner
from .readspec import ReadSpec, copy_result, result_view
from .stages import FAILED, PENDING, Stage

__all__ = ["Request", "RequestPool", "ResultProxy"]

# A waiting get() watches its stage this long before sleeping: a small request comes back in
# about the time that waking a sleeping process costs (bench/README.md, "The Reader's waits").
REQUEST_SPIN = 50e-6


class Request:
    """A future: the result of one request, being read into its stage by a worker.

    Get the result once, with one of ``get`` (an array of its own), ``get_direct(fn)``,
    ``get_unsafe()`` or ``get_proxy()``; then the stage is free for the next request. A
    worker's exception (say an ``IndexError``) is raised again by these calls, with the
    worker's traceback in its message.

    Attributes
    ----------
    spec : what it reads.
    stage : the stage it is read into, until its result is taken (then None).
    """

    def __init__(self, reader: Owner, spec: ReadSpec):
        self._reader = reader
        self.spec = spec
        self.stage: Stage | None = None  # set by the Reader once the read is dispatched
        self._error: BaseException | None = None  # found before dispatch; raised by get()
        self._result: Any = None
        self._taken = False
        # Who may take the result: the thread that asked, unless it was handed to a RequestPool
        # (whose next() another thread may call). See StagePool.take.
        self._maker = threading.get_ident()
        self._shared = False

    def fail(self, exc: BaseException) -> Request:
        """Make ``exc``, found before the read was dispatched, this request's outcome: raised
        by whichever get method is called, as for errors found by workers."""
        self._error = exc
        return self

    def held_by(self, thread: int) -> bool:
        """Whether only ``thread`` can take the result: it made this request and kept it (did
        not hand it to a RequestPool, whose ``next`` another thread may call)."""
        return self._maker == thread and not self._shared

    def done(self) -> bool:
        """True once the worker has finished (or the request failed)."""
        self._reader.check_open("the Reader that served this request")
        return self.stage is None or self.stage.memory.state.load() != PENDING

    def _wait(self) -> Any:
        """The result as it lies in the stage (the stage stays claimed)."""
        if self._taken:
            raise RuntimeError("this request's result was already taken; requests give it once")
        if self._error is not None:
            self._taken = True
            raise self._error
        self._reader.check_open("the Reader that served this request")
        if self.stage is None:
            raise RuntimeError("this request holds no stage")
        memory = self.stage.memory
        # See NOTE [ Worker shutdown logic ], step (3): wait in slices, check the workers between.
        state = memory.state  # held here: a stage closed meanwhile stays mapped for this wait
        now = state.load()
        if now == PENDING:
            start = time.monotonic()
            while not state.wait_while(PENDING, timeouts.WAIT_SLICE, REQUEST_SPIN):
                self._reader.check_serving()
            self._reader.waited(time.monotonic() - start)
            now = state.load()
        if now == FAILED:
            exc = memory.errors.exception()
            memory.errors.clear()
            self._release()
            raise exc
        return result_view(self.spec, memory)

    def _release(self) -> None:
        self._taken = True
        stage, self.stage = self.stage, None
        if stage is not None:
            stage.free()

    def get(self) -> Any:
        """Wait, then return the result as an array of its own (a copy, or for a large result
        the stage's memory itself, the stage taking other memory; see lending.py)."""
        try:
            value = self._wait()
            stage = self.stage
            if (stage is not None and isinstance(value, np.ndarray) and value.ndim
                    and value.dtype.kind != "O" and lendable(value.nbytes, stage.nbytes)):
                return self._reader.hand_over(stage, value)
            return copy_result(value)
        finally:
            self._release()

    def get_direct(self, fn):
        """Wait, call ``fn(result)`` on the data in shared memory (no copy), return its value."""
        try:
            return fn(self._wait())
        finally:
            self._release()

    @contextlib.contextmanager
    def get_unsafe(self):
        """A context manager giving the result in shared memory. Drop every reference to it
        before the block ends: the stage is reused afterwards."""
        try:
            yield self._wait()
        finally:
            self._release()

    @contextlib.contextmanager
    def get_proxy(self):
        """Like ``get_unsafe`` but yields a proxy of the result that raises ``ReferenceError`` on
        any use once the block is left."""
        proxy = None
        try:
            proxy = ResultProxy(self._wait())
            yield proxy
        finally:
            if proxy is not None:
                proxy._invalidate()
            self._release()


class ResultProxy:
    """Forwards everything to a result in shared memory until invalidated."""

    __slots__ = ("_target",)

    def __init__(self, target):
        object.__setattr__(self, "_target", target)

    def _invalidate(self) -> None:
        object.__setattr__(self, "_target", None)

    def _get(self):
        target = object.__getattribute__(self, "_target")
        if target is None:
            raise ReferenceError(
                "this result lived in a stage that was released when its get_proxy() block "
                "ended; copy what you need inside the block"
            )
        return target

    def __getattr__(self, name):
        return getattr(self._get(), name)

    def __setattr__(self, name, value):
        setattr(self._get(), name, value)

    def __getitem__(self, key):
        return self._get()[key]

    def __setitem__(self, key, value):
        self._get()[key] = value

    def __len__(self):
        return len(self._get())

    def __iter__(self):
        return iter(self._get())

    def __array__(self, dtype=None, copy=None):
        target = self._get()
        return np.asarray(target, dtype=dtype) if copy is not True else np.array(target, dtype)

    def __repr__(self):
        target = object.__getattribute__(self, "_target")
        return "<released result>" if target is None else f"ResultProxy({target!r})"

    def __eq__(self, other):
        return self._get() == other

    def __ne__(self, other):
        return self._get() != other

    __hash__ = None  # type: ignore[assignment]


def _forward(name):
    def method(self, *args):
        return getattr(self._get(), name)(*args)

    method.__name__ = name
    return method


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lt", "le", "gt", "ge", "neg", "pos", "abs", "invert", "float", "int",
              "bool", "index", "contains"):
    for _dunder in (f"__{_name}__", f"__r{_name}__"):
        if hasattr(np.ndarray, _dunder) and _dunder not in ResultProxy.__dict__:
            setattr(ResultProxy, _dunder, _forward(_dunder))


class RequestPool:
    """A FIFO of pending requests: ``add`` them as they are made, ``next`` returns the oldest,
    waiting until one is there. Thread-safe."""

    def __init__(self):
        # A deque's appends and pops are atomic: the condition is taken only to wait, and to
        # wake a waiting thread (``_waiting`` counts them, raised before they look).
        self._queue: collections.deque[Request] = collections.deque()
        self._cond = threading.Condition()
        self._waiting = 0

    def add(self, request: Request) -> None:
        request._shared = True
        self._queue.append(request)
        if self._waiting:
            with self._cond:
                self._cond.notify()

    def next(self, timeout: float | None = None) -> Request:
        """The oldest request added; waits for one (``TimeoutError`` after ``timeout`` s)."""
        try:
            return self._queue.popleft()
        except IndexError:
            pass
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while True:
                    left = None if deadline is None else deadline - time.monotonic()
                    if not self._cond.wait_for(lambda: self._queue, left):
                        raise TimeoutError(f"no request was added within {timeout} s")
                    try:
                        return self._queue.popleft()
                    except IndexError:  # another thread took it first
                        continue
            finally:
                self._waiting -= 1

    def __len__(self) -> int:
        return len(self._queue)
