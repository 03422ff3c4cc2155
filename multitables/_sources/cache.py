"""A local disk cache of fetched byte ranges for later epochs: bounded in bytes, least recently
used out first, shared safely by processes and users, and touching no file it did not write."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import Any

MARKER = ".multitables-cache"
MARKER_TEXT = "multitables byte cache, format 1: files named <sha256[:40]>.mtb are ours\n"
_ENTRY = re.compile(r"[0-9a-f]{40}\.mtb")
_TEMP = re.compile(r"\.tmp-(?P<host>[^/]+)-(?P<pid>\d+)-[0-9a-f]{16}\.mtb")
LOCK_WAIT = 10.0
STALE_TEMP_AGE = 3600.0  # a temporary file this old is a crashed writer's, on any host


class ByteCache:
    """Byte ranges of sources kept under ``cache_dir/multitables-<uid>/``, at most about
    ``cache_limit`` bytes.

    - **Ours only.** The subfolder holds a marker file; only names matching our pattern (a
      40-hex-digit key + ``.mtb``, or our temporary names) are ever deleted, and a subfolder
      that exists without the marker and is not empty is refused.
    - **Several users.** Each user gets a subfolder of their own (mode 0700): nobody evicts or
      reads another's files; ``cache_limit`` applies per user.
    - **Several processes.** Entries appear by atomic rename (a reader sees a whole entry or
      none); eviction runs under an ``flock`` on ``.lock``; an entry evicted while another
      process reads it stays readable through its open descriptor.
    - **LRU.** A hit touches the entry's mtime; eviction removes the oldest first. Each process
      trims whenever it has written ``trim_every`` bytes (default ``cache_limit // 8``), down
      to ``cache_limit - trim_every``, so with P processes writing at once the total may pass
      the limit by up to (P - 1) x ``trim_every`` until the next trim.
    - **Stale temporary files** (of a writer that died) are removed at start.
    """

    def __init__(self, cache_dir: str | os.PathLike, cache_limit: int, *,
                 trim_every: int | None = None) -> None:
        if cache_limit < 1:
            raise ValueError(f"cache_limit must be >= 1 byte, got {cache_limit}")
        self.limit = int(cache_limit)
        self.trim_every = max(1, min(trim_every or self.limit // 8, self.limit))
        self.dir = Path(cache_dir) / f"multitables-{os.getuid()}"
        self._host = socket.gethostname().replace("-", "_").replace("/", "_")
        self._written = 0
        self.hits = self.misses = self.evicted = 0
        self._claim()
        self.clean_temp()
        self.trim()

    def _claim(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        marker = self.dir / MARKER
        if marker.exists():
            return
        with os.scandir(self.dir) as it:
            # Another process's marker on its way in (its temporary name) is no stranger's.
            empty = not any(not e.name.startswith(MARKER) for e in it)
        if not empty and not marker.exists():
            raise FileExistsError(errno.EEXIST, "Not a multitables cache (no marker file, not "
                                  "empty): choose another cache_dir", str(self.dir))
        tmp = self.dir / f"{MARKER}.{os.getpid()}.{secrets.token_hex(4)}"
        tmp.write_text(MARKER_TEXT)
        os.replace(tmp, marker)

    # -- entries -------------------------------------------------------------------------------
    def path(self, identity: tuple, offset: int, size: int) -> Path:
        digest = hashlib.sha256(repr((identity, offset, size)).encode()).hexdigest()[:40]
        return self.dir / f"{digest}.mtb"

    def get_into(self, identity: tuple, offset: int, view: memoryview) -> bool:
        """Fill ``view`` with the cached bytes of (``identity``, ``offset``, its size) and mark
        them recently used: True; False if absent (or unreadable, or of the wrong size)."""
        path = self.path(identity, offset, view.nbytes)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self.misses += 1
            return False
        try:
            if os.fstat(fd).st_size != view.nbytes:
                self.misses += 1
                return False
            got = 0
            while got < view.nbytes:
                n = os.preadv(fd, [view[got:]], got)
                if n == 0:
                    self.misses += 1
                    return False
                got += n
            with contextlib.suppress(OSError):
                os.utime(fd)  # LRU by mtime: atime is often not kept (noatime, relatime)
        finally:
            os.close(fd)
        self.hits += 1
        return True

    def put(self, identity: tuple, offset: int, data: Any) -> None:
        """Keep ``data`` (a buffer) as (``identity``, ``offset``, its size). Ranges larger than
        the limit are not kept; a full disk is not an error (the cache is only a cache)."""
        view = memoryview(data).cast("B")
        if view.nbytes > self.limit or view.nbytes == 0:
            return
        tmp = self.dir / f".tmp-{self._host}-{os.getpid()}-{secrets.token_hex(8)}.mtb"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                done = 0
                while done < view.nbytes:
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)
            os.replace(tmp, self.path(identity, offset, view.nbytes))
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                self.trim()
                return
            raise
        self._written += view.nbytes
        if self._written >= self.trim_every:
            self.trim()

    # -- housekeeping --------------------------------------------------------------------------
    def entries(self) -> list[tuple[float, int, str]]:
        """(mtime, size, name) of each of our entries now."""
        found = []
        with os.scandir(self.dir) as it:
            for e in it:
                if _ENTRY.fullmatch(e.name):
                    with contextlib.suppress(FileNotFoundError):
                        st = e.stat(follow_symlinks=False)
                        found.append((st.st_mtime, st.st_size, e.name))
        return found

    def usage(self) -> int:
        """Bytes in our entries now."""
        return sum(size for _, size, _ in self.entries())

    def trim(self) -> int:
        """Evict least recently used entries until the total is at most ``cache_limit -
        trim_every``, under the directory's lock; returns the bytes removed."""
        self._written = 0
        target = self.limit - self.trim_every if self.trim_every < self.limit else self.limit
        with self._locked() as locked:
            if not locked:
                return 0
            entries = self.entries()
            total = sum(size for _, size, _ in entries)
            if total <= target:
                return 0
            removed = 0
            for _, size, name in sorted(entries):
                if total - removed <= target:
                    break
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.dir / name)
                    removed += size
                    self.evicted += 1
            return removed

    def clean_temp(self) -> None:
        """Remove our temporary files whose writer is gone: a dead pid on this host, or older
        than an hour on any host (another host's pids cannot be checked)."""
        now = time.time()
        with os.scandir(self.dir) as it:
            for e in it:
                m = _TEMP.fullmatch(e.name)
                if m is None:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    stale = now - e.stat(follow_symlinks=False).st_mtime > STALE_TEMP_AGE
                    if m["host"] == self._host and not _alive(int(m["pid"])):
                        stale = True
                    if stale:
                        os.unlink(e.path)

    @contextlib.contextmanager
    def _locked(self) -> Any:
        """Hold the directory's eviction lock; yields False (and holds nothing) if another
        process keeps it past LOCK_WAIT seconds: a trim skipped beats a hang."""
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + LOCK_WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        yield False
                        return
                    time.sleep(0.005)
            yield True
        finally:
            os.close(fd)  # releases the lock

    def __repr__(self) -> str:
        return f"ByteCache({str(self.dir)!r}, cache_limit={self.limit})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
