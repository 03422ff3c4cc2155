"""What a Reader's proxies and requests may ask of the Reader that made them (internal).

They hold their Reader as an ``Owner``, not as a ``Reader``: so they import nothing above them,
and the Reader's other internals stay its own.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .stages import Stage


class Owner(Protocol):
    """The part of a ``Reader`` its proxies and requests use."""

    filename: str
    file_kwargs: dict[str, Any]
    allow_pickle: bool
    n_procs: int

    def check_open(self, what: str = "this Reader") -> None:
        """Raise ``ClosedError`` once the Reader is closed."""

    def check_serving(self) -> None:
        """Raise once the Reader can no longer serve (closed, or its workers failed, which
        closes it): what a wait calls between its slices."""

    def register(self, stage: Stage) -> Stage:
        """Make ``stage`` the Reader's: its workers may read into it, it closes with the Reader."""

    def waited(self, seconds: float) -> None:
        """A request's ``get()`` waited ``seconds`` for its result (time that costs the caller
        nothing: the Reader weighs what requests cost the caller and its workers)."""

    def hand_over(self, stage: Stage, view: np.ndarray) -> np.ndarray:
        """``view``, a result in ``stage``, as an array of its own that takes the stage's memory
        with it (see ``lending``); the stage takes other memory."""
