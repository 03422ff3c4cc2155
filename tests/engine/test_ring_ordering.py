"""The ring's memory-ordering rule, watched one instruction at a time: a push writes the value
before it publishes the sequence number that hands the cell to consumers.

A consumer racing the producer sees a misordered push only if it reads the cell in the few cycles
between the two stores (the cross-fork tests caught one in a hundred runs). Here a forked producer
runs its push under ``ptrace`` single-stepping and the parent inspects the shared cells after every
instruction, so any order of the two stores is seen, every time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal

import numpy as np
import pytest

from multitables._engine._ringbuf import SlotQueue

pytestmark = pytest.mark.timeout(60)

PTRACE_TRACEME, PTRACE_CONT, PTRACE_SINGLESTEP = 0, 7, 9
MAX_STEPS = 1_000_000  # a push is a few hundred instructions; a runaway child is a failure
VALUE = 0x5EED_0000_0777  # the pushed value, unlike anything else in the queue's memory

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]


def _ptrace(request: int, pid: int, sig: int = 0) -> None:
    if _libc.ptrace(request, pid, None, ctypes.c_void_p(sig)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"ptrace({request}, {pid}): {os.strerror(err)}")


def _push_traced(q: SlotQueue, value: int) -> None:
    """In the forked child: let the parent trace us, stop, push ``value``, exit."""
    try:
        _ptrace(PTRACE_TRACEME, 0)
    except OSError:
        os._exit(3)
    os.kill(os.getpid(), signal.SIGSTOP)
    q.push(value)
    os._exit(0)


def _step_through(pid: int, words: np.ndarray) -> list[np.ndarray]:
    """Single-step the stopped child until it exits: the distinct states of ``words`` seen
    after each instruction, in order."""
    states = [words.copy()]
    for _ in range(MAX_STEPS):
        _ptrace(PTRACE_SINGLESTEP, pid)
        _, status = os.waitpid(pid, 0)
        if not os.WIFSTOPPED(status):
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            return states
        if not np.array_equal(words, states[-1]):
            states.append(words.copy())
        sig = os.WSTOPSIG(status)
        if sig != signal.SIGTRAP:  # a signal of its own: deliver it and go on stepping
            _ptrace(PTRACE_SINGLESTEP, pid, sig)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the push did not finish in {MAX_STEPS} instructions")


@pytest.mark.parametrize("lap", [0, 1, 2])
def test_push_writes_the_value_before_publishing_the_sequence_number(lap):
    """Cells are (sequence number, value) pairs of int64 after the queue's header; in no state
    between two instructions of a push may the cell's sequence number say "full" while its value
    is not yet the pushed one. ``lap``: how often the cell was used before (its stale value)."""
    buf = mmap.mmap(-1, 64 + SlotQueue.nbytes(4))
    q = SlotQueue(buf, 64, 4, True)
    for i in range(4 * lap + 1):  # the next push goes to cell 1 of lap ``lap``
        q.push(1000 + i)
        assert q.try_pop() == 1000 + i
    words = np.frombuffer(buf, np.int64)
    pid = os.fork()
    if pid == 0:
        _push_traced(q, VALUE)
    try:
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3:
            pytest.skip("ptrace is not permitted here")
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP, status
        states = _step_through(pid, words)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert q.try_pop() == VALUE
    (value_at,) = np.flatnonzero(states[-1] == VALUE)
    seq_at = value_at - 1
    seq_before = states[0][seq_at]
    for n, state in enumerate(states):
        if state[seq_at] != seq_before:  # published from here on
            assert state[value_at] == VALUE, (
                f"after instruction-level state {n} of the push the cell's sequence number is "
                f"{state[seq_at]} (published) but its value is still {state[value_at]}: a "
                "consumer could take the stale value"
            )
    assert states[-1][seq_at] != seq_before, "the push never published its cell"
