"""The fast decode path's counters: reads left to HDF5's filters by reason, chunks decoded by codec.

Internal module (``multitables.decode`` is the public door to ``fallbacks``). Going to HDF5 is
visible: each reason is either ``declined: ...`` (a layout or chunk the fast path does not
handle: expected) or ``failed: ...`` (a codec that raised or gave the wrong size: corrupt data,
or a bug), and is logged once, at debug level, on the ``multitables`` logger.
"""

from __future__ import annotations

import collections
import logging

from .._engine import hooks

fallbacks: collections.Counter[str] = collections.Counter()
"""Reads (and, ``declined: dataset ...``, datasets) left to HDF5 in this process, by reason."""
decoded: collections.Counter[str] = collections.Counter()
"""Chunks decoded by the fast path in this process, by codec (``none``: shuffle only)."""

_log = logging.getLogger("multitables")


class Undecodable(Exception):
    """A chunk the fast path does not decode after all: ``args[0]`` is the reason, one of a few
    fixed texts (a key of ``fallbacks``)."""


def fall_back(reason: str) -> None:
    """Count a read left to HDF5 for ``reason``, logging the first one of each reason."""
    if reason not in fallbacks:
        _log.debug("chunks read through HDF5 (%s); further ones are counted in "
                   "multitables.decode.fallbacks", reason)
    fallbacks[reason] += 1


def _reset_counts() -> None:
    fallbacks.clear()
    decoded.clear()


# A forked worker counts its own reads.
hooks.on_fork("decode counts", after_in_child=_reset_counts)
