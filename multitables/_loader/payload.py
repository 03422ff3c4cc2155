"""A batch of any shape laid out in one slot of shared memory, and read back (internal).

A worker writes the batch's arrays as raw bytes and pickles the rest around them (pickle
protocol 5, each array's data out of band), so the consumer rebuilds the batch with one copy of
the slot (``copy=True``), or none: its arrays are then views of the slot. Arrays the worker
stacked in the slot already (``SlotWriter.array``) are not copied again.

Layout of a slot::

    int64 manifest offset | int64 manifest length | ... | buffers (64-byte aligned) | manifest

The manifest is the pickled ``(pickle stream, [(offset, length) of each buffer])``. A batch
larger than the slot is not written: ``SlotWriter.finish`` returns the bytes it needs instead.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import numpy as np

from .._engine.shm import items, round_up

HEADER = 64
ALIGN = 64


class SlotWriter:
    """Places a batch in ``slot`` (a uint8 view of it): arrays first, the manifest last; counts
    what a batch needs even once it no longer fits."""

    def __init__(self, slot: np.ndarray):
        self.slot = slot
        self.capacity = len(slot)
        self.base = slot.ctypes.data
        self.end = HEADER  # where the next part goes
        self.counted: set[int] = set()  # arrays that did not fit, counted already

    def _take(self, nbytes: int) -> int:
        at = round_up(self.end, ALIGN)
        self.end = at + nbytes
        return at

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array to fill: in the slot while the batch fits, else in private memory (the
        batch will not be written, but its size is counted)."""
        shape, dtype = items(shape, dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        at = self._take(nbytes)
        if self.end > self.capacity:
            private = np.empty(shape, dtype)
            self.counted.add(private.ctypes.data)
            return private
        return self.slot[at : at + nbytes].view(dtype).reshape(shape)

    def finish(self, batch: Any) -> int:
        """Write ``batch``: the bytes of the slot it holds, or minus the bytes it needs."""
        buffers: list[pickle.PickleBuffer] = []
        stream = pickle.dumps(batch, protocol=5, buffer_callback=buffers.append)
        spans = []
        for buffer in buffers:
            data = np.frombuffer(buffer.raw(), np.uint8)
            address = data.ctypes.data if data.size else 0
            if data.size and self.base <= address and address + data.size <= (
                    self.base + self.capacity):
                spans.append((address - self.base, data.size))  # stacked in the slot already
                continue
            if address in self.counted:  # the batch does not fit: only its size matters
                continue
            at = self._take(data.size)
            if self.end <= self.capacity:
                self.slot[at : self.end] = data
            spans.append((at, data.size))
        manifest = pickle.dumps((stream, spans), protocol=5)
        at = self._take(len(manifest))
        if self.end > self.capacity:
            return -self.end
        self.slot[at : self.end] = np.frombuffer(manifest, np.uint8)
        self.slot[:16].view(np.int64)[:] = (at, len(manifest))
        return self.end


def read_batch(slot: np.ndarray, used: int, copy: bool) -> Any:
    """The batch in ``slot`` (``used`` bytes of it): its arrays in one new buffer the caller
    owns (``copy``), else views of the slot."""
    at, length = (int(v) for v in slot[:16].view(np.int64))
    stream, spans = pickle.loads(slot[at : at + length].tobytes())
    source = slot[:used].copy() if copy else slot
    return pickle.loads(stream, buffers=[source[a : a + n] for a, n in spans])
