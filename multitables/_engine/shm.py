"""An anonymous shared-memory mapping that every worker process can map and that cannot leak.

The memory is a ``memfd`` (no name in ``/dev/shm``): the kernel frees it when the last process that
maps it or holds its descriptor goes away, even if every process is killed with SIGKILL. Its pages
are reserved when it is created, so a shortage is a ``SharedMemoryError`` naming the size now,
never a SIGBUS in the middle of a read later.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import threading
from multiprocessing import reduction

import numpy as np

from ..errors import ClosedError, SharedMemoryError

PAGE = mmap.PAGESIZE


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def items(shape: tuple[int, ...], dtype: np.typing.DTypeLike) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of an array of ``shape`` items of ``dtype``, as numpy makes it: a
    subarray dtype's dimensions (an HDF5 array type) extend the shape."""
    dtype = np.dtype(dtype)
    if dtype.subdtype is None:
        return tuple(shape), dtype
    base, sub = dtype.subdtype
    return (*shape, *sub), base


class SharedArena:
    """``nbytes`` of zero-filled shared memory, mapped read-write in this process.

    Pickles (during a ``spawn``/``forkserver`` process start) by duplicating its descriptor into
    the child, which maps the same pages. Forked children inherit the mapping as it is.
    """

    def __init__(self, nbytes: int, *, name: str = "multitables", _fd: int | None = None):
        self.nbytes = max(int(nbytes), 1)
        if _fd is None:
            fd = _create(name, self.nbytes)
        else:
            fd = _fd
        try:
            self.buffer = mmap.mmap(fd, self.nbytes, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def ndarray(self, shape, dtype, offset: int = 0) -> np.ndarray:
        """A numpy view of the mapping (no copy). It keeps the pages mapped while it lives, also
        past ``close``: ``np.frombuffer`` holds the mmap's buffer (``np.ndarray(buffer=...)``
        would not, and its view of unmapped pages would crash the process)."""
        shape, dtype = items((int(shape),) if isinstance(shape, (int, np.integer)) else shape,
                             dtype)
        count = math.prod(shape)
        return np.frombuffer(self.buffer, dtype, count, offset).reshape(shape)

    def make_private(self) -> bool:
        """Map the same pages copy-on-write in place, views and all: from now on this process's
        writes stay its own, and a forked child's copy is its own as for any private memory.
        Pages not yet written show the shared ones, so nothing may write them through another
        mapping afterwards. False when closed, or when the kernel refused."""
        if self._fd is None or self.buffer.closed:
            return False
        anchor = ctypes.c_char.from_buffer(self.buffer)
        address = ctypes.addressof(anchor)
        del anchor  # an exported buffer would keep the mmap from closing
        got = _libc.mmap(address, self.nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | _MAP_FIXED, self._fd, 0)
        return got == address

    @property
    def closed(self) -> bool:
        return self._fd is None

    @property
    def fd(self) -> int:
        """The memfd, to send to a worker (``multiprocessing.reduction.send_handle``)."""
        if self._fd is None:
            raise ClosedError("this SharedArena is closed")
        return self._fd

    def close(self) -> None:
        """Drop the descriptor and unmap; pages still viewed by numpy arrays live until those go."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        try:
            self.buffer.close()
        except BufferError:
            pass  # views (numpy arrays, ring primitives) remain: unmapped with the last of them

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __reduce__(self):
        if self._fd is None:
            raise ClosedError("cannot send a closed SharedArena to a worker")
        fds = getattr(_passing, "fds", None)
        if fds is not None:  # a worker channel's message: the descriptor travels beside it
            fds.append(self._fd)
            return _received, (len(fds) - 1, self.nbytes)
        return _rebuild, (self.nbytes, reduction.DupFd(self._fd))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_MAP_FIXED = 0x10  # replaces the mapping at that address in one step: no gap to race into


def _rebuild(nbytes: int, dup) -> SharedArena:
    return SharedArena(nbytes, _fd=dup.detach())


# While a worker channel pickles or unpickles one message (this thread only): the descriptors
# of the arenas in it, in order. See workers.Channel.
_passing = threading.local()


@contextlib.contextmanager
def passing_descriptors(fds: list[int]):
    """In this block, pickle each arena as an index into ``fds`` (appending its descriptor), or
    unpickle arenas from the received ``fds`` (each taken is replaced by -1)."""
    _passing.fds = fds
    try:
        yield fds
    finally:
        del _passing.fds


def _received(index: int, nbytes: int) -> SharedArena:
    fds = _passing.fds
    fd, fds[index] = fds[index], -1  # taken: not closed with the unused ones
    return SharedArena(nbytes, _fd=fd)


def available_memory() -> int | None:
    """Bytes of memory the system can still give (MemAvailable: free plus reclaimable cache)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _create(name: str, nbytes: int) -> int:
    # Reserving pages the machine does not have would only end in the OOM killer: refuse now.
    available = available_memory()
    if available is not None and nbytes > available:
        raise SharedMemoryError(
            f"cannot reserve {nbytes} bytes ({nbytes / 2**20:.1f} MiB) of shared memory: only "
            f"{available} bytes are available; lower read_ahead, block_size or the stage size"
        )
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        # Reserve every page now: a shortage fails here with ENOSPC/ENOMEM, not as SIGBUS later.
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        os.close(fd)
        raise SharedMemoryError(
            f"cannot reserve {nbytes} bytes ({nbytes / 2**20:.1f} MiB) of shared memory: "
            f"{exc.strerror}; lower read_ahead, block_size or the stage size, or free memory"
        ) from exc
    except BaseException:
        os.close(fd)
        raise
    return fd
