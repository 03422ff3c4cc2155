"""A message that spans several packets arrives whole or not at all: a peer that stops in the
middle of one (it died, and a copy of its end is still open elsewhere, so no EOF comes) makes
the receiver give up with EOFError after a deadline, never wait for ever."""

from __future__ import annotations

import threading
import time

import pytest

from multitables._engine import timeouts
from multitables._engine.channel import Channel

DEADLINE = 0.5  # the channel's deadline for the rest of a message, shortened for the test


class GaveUp(Exception):
    """What the sender's check raises: it stops sending in the middle of the message."""


def give_up() -> None:
    raise GaveUp


@pytest.mark.timeout(30)
def test_a_message_cut_off_by_a_silent_peer_ends_in_eoferror(monkeypatch):
    """Bug guarded: ``Channel.receive`` waits for the rest of a message that spans several
    packets with no deadline, so a peer that dies mid-message (while a copy of its end stays
    open, so that no EOF comes) leaves the receiver waiting for ever. The receive runs in a
    thread with a short, explicit limit: a hang fails the test, it does not hang the suite."""
    monkeypatch.setattr(timeouts, "JOIN_TIMEOUT", DEADLINE)
    a, b = Channel.pair()
    try:
        # 1 MiB is dozens of packets, more than the socket buffers hold: the send blocks
        # with a part of the message queued, and its check gives up.
        with pytest.raises(GaveUp):
            a.send(b"x" * (1 << 20), check=give_up)
        outcome: list[object] = []

        def receive():
            t0 = time.monotonic()
            try:
                outcome.append(b.receive(5.0))
            except BaseException as exc:
                outcome.append(exc)
            outcome.append(time.monotonic() - t0)

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        thread.join(DEADLINE + 5)
        hung = thread.is_alive()
    finally:
        a.close()  # the peer's end goes: a receive still waiting sees EOF and returns
    thread.join(5)
    b.close()
    assert not hung, "receive() still waits for the rest of a message its peer stopped sending"
    result, took = outcome
    assert isinstance(result, EOFError), f"receive() gave {result!r}, not EOFError"
    assert took < DEADLINE + 2, f"receive() took {took:.1f} s to give up"
