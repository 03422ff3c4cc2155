"""The process's hooks in one ordered registry (internal): the live objects closed at interpreter
exit, and what a fork does in the parent and in the child.

Modules register when they are imported, in whatever order that happens; the hooks run in the
orders stated here. See NOTE [ Worker shutdown logic ] in :mod:`multitables._engine.pool`,
steps (6) and (7).
"""

from __future__ import annotations

import atexit
import multiprocessing.util  # noqa: F401 - imported first: its exit hook must run after ours
import os
import weakref
from collections.abc import Callable

# At exit, the front doors first (they stop or kill the workers of their jobs), then dask's
# files, then the pools, which end the idle workers.
EXIT_ORDER = ("queues", "readers", "loaders", "dask files", "pools")
# Before a fork, in the parent: lent memory goes copy-on-write, so each process keeps its writes.
FORK_BEFORE_ORDER = ("lent memory",)
# In a forked child: first close the copies of the parent's channel ends (a worker must see EOF
# once its parent is gone), then forget the parent's workers, then the rest of its state: files,
# network connections and fetch threads (never shared with the parent), counters.
FORK_CHILD_ORDER = ("channels", "pools", "readers", "dask files", "connections", "fetchers",
                    "decode counts")

_live: dict[str, weakref.WeakSet] = {kind: weakref.WeakSet() for kind in EXIT_ORDER}
_exit: dict[str, Callable[[], None]] = {}
_before: dict[str, Callable[[], None]] = {}
_child: dict[str, Callable[[], None]] = {}


def track(kind: str, obj: object) -> None:
    """Close ``obj`` at exit (with ``close()``, unless ``kind`` has its own exit hook) while it
    is alive."""
    _live[kind].add(obj)


def untrack(kind: str, obj: object) -> None:
    _live[kind].discard(obj)


def tracked(kind: str) -> list:
    """The live objects of ``kind``, as a list that later changes do not disturb."""
    return list(_live[kind])


def on_exit(kind: str, hook: Callable[[], None]) -> None:
    """Run ``hook`` at exit in ``kind``'s place, instead of closing its tracked objects."""
    _register(_exit, EXIT_ORDER, kind, hook)


def on_fork(kind: str, *, before: Callable[[], None] | None = None,
            after_in_child: Callable[[], None] | None = None) -> None:
    """Run ``before`` in the parent before a fork and ``after_in_child`` in the child, each in
    ``kind``'s place in the stated order."""
    if before is not None:
        _register(_before, FORK_BEFORE_ORDER, kind, before)
    if after_in_child is not None:
        _register(_child, FORK_CHILD_ORDER, kind, after_in_child)


def _register(hooks: dict, order: tuple[str, ...], kind: str, hook: Callable[[], None]) -> None:
    if kind not in order:
        raise ValueError(f"no place for {kind!r} among the hooks {order}")
    if kind in hooks:
        raise ValueError(f"a hook for {kind!r} is registered already")
    hooks[kind] = hook


def close_at_exit(kind: str) -> None:
    """What the exit hook does for ``kind``: its own hook, or close each of its live objects."""
    if kind in _exit:
        _exit[kind]()
    else:
        for obj in tracked(kind):
            obj.close()


def _run_exit_hooks() -> None:
    for kind in EXIT_ORDER:
        close_at_exit(kind)


def _run(hooks: dict, order: tuple[str, ...]) -> Callable[[], None]:
    def run() -> None:
        for kind in order:
            if kind in hooks:
                hooks[kind]()
    return run


atexit.register(_run_exit_hooks)
os.register_at_fork(before=_run(_before, FORK_BEFORE_ORDER),
                    after_in_child=_run(_child, FORK_CHILD_ORDER))
