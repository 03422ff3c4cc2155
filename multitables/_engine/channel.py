"""A channel between the parent and one worker: pickled messages, with the descriptors of the
shared memory in them passed beside the bytes (internal). See NOTE [ Worker shutdown logic ] in
:mod:`multitables._engine.pool`."""

from __future__ import annotations

import contextlib
import os
import pickle
import select
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Any

from . import hooks, timeouts
from .shm import passing_descriptors

# Control messages of the channel; a Reader's requests are tuples.
STOP = "stop"  # parent → idle worker: exit
END = "end"  # parent → worker serving requests from its channel: the job is over
DONE = "done"  # worker → parent: the job is over, standing by

_HEADER = struct.Struct("<QI")  # bytes of the pickle, descriptors attached to the first packet
_PACKET = 1 << 15  # well below a Unix socket's send buffer: a packet always fits an empty one
_MAX_FDS = 64
TIMEOUT = object()  # what Channel.receive returns when nothing came in time


def no_check() -> None:
    pass


class Channel:
    """One end of a connection between the parent and one worker: Python objects, pickled, with
    the descriptor of each ``SharedArena`` in them passed beside the bytes (SCM_RIGHTS).

    A ``SOCK_SEQPACKET`` socket pair: messages keep their boundaries and descriptors arrive with
    the packet that carries them. Sends wait in slices of WAIT_SLICE, calling ``check`` (which
    raises to give up) between them, so a stopped peer with a full buffer never blocks for ever.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        sock.settimeout(timeouts.WAIT_SLICE)

    def __reduce__(self):  # to a spawned worker: the socket travels as a descriptor
        return Channel, (self.sock,)

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def send(self, obj: Any, check: Callable[[], None] = no_check) -> None:
        """Send ``obj``; ``check()`` runs whenever the peer has not taken it for WAIT_SLICE."""
        with passing_descriptors([]) as fds:
            data = pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
        room = _PACKET - _HEADER.size
        self._send_packet(_HEADER.pack(len(data), len(fds)) + data[:room], fds, check)
        for at in range(room, len(data), _PACKET):
            self._send_packet(data[at : at + _PACKET], [], check)

    def _send_packet(self, packet: bytes, fds: list[int], check: Callable[[], None]) -> None:
        while True:
            try:
                if fds:
                    socket.send_fds(self.sock, [packet], fds)
                else:
                    self.sock.send(packet)
                return
            except TimeoutError:
                check()

    def receive(self, timeout: float | None) -> Any:
        """The next object, ``TIMEOUT`` if none began to arrive within ``timeout`` s; EOFError
        once the peer's end is closed (it exited, or died)."""
        if not self._wait_readable(timeout):
            return TIMEOUT
        packet, fds, _, _ = socket.recv_fds(self.sock, _PACKET, _MAX_FDS)
        try:
            if not packet:
                raise EOFError("the other end of the channel is closed")
            size, _ = _HEADER.unpack_from(packet)
            parts, got = [packet[_HEADER.size :]], len(packet) - _HEADER.size
            while got < size:  # the rest follows at once: a peer that stops sending is gone
                if not self._wait_readable(timeouts.JOIN_TIMEOUT):
                    raise EOFError(f"a message stopped after {got} of {size} bytes")
                part = self.sock.recv(_PACKET)
                if not part:
                    raise EOFError(f"a message stopped after {got} of {size} bytes")
                parts.append(part)
                got += len(part)
            with passing_descriptors(fds):
                return pickle.loads(b"".join(parts))
        finally:
            for fd in fds:  # those no arena took
                if fd >= 0:
                    os.close(fd)

    def _wait_readable(self, timeout: float | None) -> bool:
        return bool(select.select([self.sock], [], [], timeout)[0])

    def keep_from_children(self) -> None:
        """This is the parent's end: a child forked later closes its copy, so that the worker
        sees EOF as soon as its parent is gone. See NOTE [ Worker shutdown logic ], step (7)."""
        _PARENT_ENDS.add(self)

    def close(self) -> None:
        self.sock.close()


# The parent's ends of this process's channels. A child forked from this process (our workers,
# a DataLoader worker) closes its copies, so that a worker sees EOF as soon as its parent is gone.


# The parent's ends of this process's channels, closed in a forked child.
_PARENT_ENDS: weakref.WeakSet[Channel] = weakref.WeakSet()


def _close_parent_ends() -> None:
    for channel in list(_PARENT_ENDS):
        with contextlib.suppress(OSError):
            channel.close()
    _PARENT_ENDS.clear()


hooks.on_fork("channels", after_in_child=_close_parent_ends)
