"""Results handed over with their stage's memory: ``Request.get()`` without a copy.

Internal module. Copying a large result out of its stage costs the caller about as much as a
worker's read of it (the bytes were just written on another core). So ``get()`` lends the stage's
memory to the result instead, and the stage takes other memory for its next request. The memory
comes back (``on_return``) when the last array viewing it goes, to be read into again.

A forked child would share the memory of results lent before the fork. So that each process's
writes stay its own, as with memory of its own, the parent maps that memory copy-on-write just
before the fork (fork then copies it on write, as any private memory) and never reads into it
again: it is freed when its result goes.

At most MAX_LOANS results hold lent memory at once (each holds two descriptors: a result kept
by the thousand must not run the process out of them); later ones are copies until some go.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .._engine import hooks
from .._engine._lent import lent_array
from .stages import StageMemory

# Smaller results are copied: the copy costs less than lending (an owner, a memory swap).
LEND_MIN = 64 << 10
MAX_LOANS = 64


def lendable(nbytes: int, capacity: int) -> bool:
    """Whether a result of ``nbytes`` in a stage of ``capacity`` bytes is lent, not copied: it is
    large, fills at least half its stage (a result kept holds all of its stage's memory), and
    fewer than MAX_LOANS results hold lent memory."""
    return nbytes >= LEND_MIN and 2 * nbytes >= capacity and len(_loans) < MAX_LOANS


class _Loan:
    __slots__ = ("memory", "on_return", "forked")

    def __init__(self, memory: StageMemory, on_return: Callable[[StageMemory], None]):
        self.memory = memory
        self.on_return = on_return
        self.forked = False  # shared with a child process: not to be read into again

    def returned(self) -> None:
        """The last view of the lent result went (the ``Lent`` owner calls it)."""
        _loans.discard(self)
        if self.forked:
            self.memory.discard()  # a child may still view it
        else:
            self.on_return(self.memory)


_loans: set[_Loan] = set()


def lend(view: np.ndarray, memory: StageMemory,
         on_return: Callable[[StageMemory], None]) -> np.ndarray:
    """``view`` (the result at the start of ``memory``'s data area) as an array whose last view
    gives ``memory`` to ``on_return``; nothing reads into ``memory`` until then."""
    loan = _Loan(memory, on_return)
    lent = lent_array(memory.raw, loan.returned, view.dtype, view.shape)
    _loans.add(loan)  # after the owner: if that fails, nothing is lent
    return lent


def on_loan() -> int:
    """How many results hold lent memory in this process."""
    return len(_loans)


def _before_fork() -> None:
    # make_private is a foreign call, which lets other threads run and lend meanwhile: go round
    # until every loan is marked (the fork itself holds the interpreter's lock throughout).
    while unmarked := [loan for loan in list(_loans) if not loan.forked]:
        for loan in unmarked:
            loan.forked = True
            loan.memory.arena.make_private()


hooks.on_fork("lent memory", before=_before_fork)
