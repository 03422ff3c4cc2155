"""Test files written the way users write them (h5py and PyTables), their ground truth, and the
harness that watches child processes (a child Python, the workers of a pool) from outside."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import json
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import psutil
import pytest

N_ROWS = 97  # prime: most block sizes leave a remainder
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG_ROWS, BIG_COLS = 4000, 256  # 4 MB of float32 in gzip chunks of 64 rows


def sample(shape, dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -1000), min(info.max, 1000), shape).astype(dtype)
    if dtype.kind == "c":
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
    return rng.normal(size=shape).astype(dtype)


def write_h5py(path, name, data, **create_kwargs) -> np.ndarray:
    with h5py.File(path, "a") as f:
        f.create_dataset(name, data=data, **create_kwargs)
    return data


TABLE_DTYPE = np.dtype([("image", "u1", (4, 4)), ("vec", "<f8", (3,)), ("score", "<f4")])


def write_pytables(path) -> dict[str, np.ndarray]:
    """A Table, an Array, a compressed CArray and an EArray, as PyTables writes them."""
    import tables

    rng = np.random.default_rng(1)
    rows = np.zeros(N_ROWS, TABLE_DTYPE)
    rows["image"] = rng.integers(0, 255, (N_ROWS, 4, 4))
    rows["vec"] = rng.normal(size=(N_ROWS, 3))
    rows["score"] = rng.normal(size=N_ROWS)
    array = sample((N_ROWS, 6), "f8", 2)
    carray = sample((N_ROWS, 5, 2), "i4", 3)
    earray = sample((N_ROWS, 7), "f4", 4)
    filters = tables.Filters(complevel=4, complib="zlib", shuffle=True)
    with tables.open_file(str(path), "w") as f:
        table = f.create_table("/", "table", description=TABLE_DTYPE, chunkshape=(10,))
        table.append(rows)
        f.create_array("/", "array", array)
        f.create_carray("/", "carray", obj=carray, filters=filters, chunkshape=(8, 5, 2))
        e = f.create_earray("/", "earray", tables.Float32Atom(), (0, 7), chunkshape=(16, 7))
        e.append(earray)
    return {"table": rows, "array": array, "carray": carray, "earray": earray}


def block_counter(blocks) -> collections.Counter:
    """Blocks as a multiset, compared by dtype, shape and bytes."""
    return collections.Counter((b.dtype.str, b.shape, b.tobytes()) for b in blocks)


def expected_blocks(truth: np.ndarray, block_size: int, remainder: bool) -> list[np.ndarray]:
    n = len(truth)
    stop = n if remainder else n - n % block_size
    return [truth[i : min(i + block_size, stop)] for i in range(0, stop, block_size)]


def cyclic_block(truth: np.ndarray, block_size: int, ticket: int) -> np.ndarray:
    rows = (ticket * block_size + np.arange(block_size)) % len(truth)
    return truth[rows]


def write_big(path) -> np.ndarray:
    """4 MB of small integers as float32, in gzip chunks of 64 rows: dataset ``x``."""
    rng = np.random.default_rng(7)
    data = rng.integers(0, 8, (BIG_ROWS, BIG_COLS)).astype("<f4")
    return write_h5py(path, "x", data, chunks=(64, BIG_COLS), compression="gzip")


def write_virtual(directory, sizes, chunk_rows=40, compression="gzip", width=3, name="v.h5"):
    """A virtual dataset ``/v`` of one source file per entry of ``sizes``, in order; its rows
    are ``np.arange`` of them all, reshaped."""
    n = sum(sizes)
    data = np.arange(n * width, dtype="f4").reshape(n, width)
    layout = h5py.VirtualLayout(shape=(n, width), dtype="f4")
    at = 0
    for i, size in enumerate(sizes):
        src = f"{name}.src{i}.h5"
        with h5py.File(directory / src, "w") as f:
            f.create_dataset("x", data=data[at:at + size], chunks=(chunk_rows, width),
                             compression=compression)
        layout[at:at + size] = h5py.VirtualSource(src, "x", shape=(size, width))
        at += size
    path = directory / name
    with h5py.File(path, "w") as f:
        f.create_virtual_dataset("v", layout)
        f.create_dataset("plain", data=data, chunks=(chunk_rows, width), compression=compression)
    return str(path), data


def write_vlen_parts(directory, name: str, rows: list, cuts=((0, 100), (100, 101))) -> list:
    """``rows`` (int32 arrays) split into files, each a variable-length ``name`` and a ``label``
    holding the rows' numbers: parts ``cuts``, then the rest; the files' paths."""
    paths = []
    for k, (a, b) in enumerate([*cuts, (cuts[-1][1], len(rows))]):
        paths.append(str(directory / f"part{k}.h5"))
        with h5py.File(paths[-1], "w") as f:
            f.create_dataset("label", data=np.arange(a, b))
            f.create_dataset(name, (b - a,), h5py.vlen_dtype(np.int32))[:] = rows[a:b]
    return paths


def damage(path, how: str) -> None:
    """Cut the file to a third (``truncate``) or write garbage over the middle third of the chunks
    of ``x`` (``garbage``)."""
    size = os.path.getsize(path)
    if how == "truncate":
        os.truncate(path, size // 3)
    else:
        with h5py.File(path, "r") as f:
            dsid = f["x"].id
            n = dsid.get_num_chunks()
            infos = [dsid.get_chunk_info(i) for i in range(n // 3, 2 * n // 3)]
        rng = np.random.default_rng(3)
        with open(path, "r+b") as f:
            for info in infos:
                f.seek(info.byte_offset)
                f.write(rng.integers(0, 256, info.size, dtype=np.uint8).tobytes())


def assert_worker_error(exc: BaseException | None) -> None:
    """``exc`` is what a read of a damaged file must raise: the worker's error, with its text."""
    import multitables  # here, not above: conftest imports this module, and must load without it

    assert exc is not None, "the damaged file was read without an error"
    assert isinstance(exc, (OSError, multitables.SubprocessException)), repr(exc)
    if not isinstance(exc, multitables.SubprocessException):
        assert "the worker's traceback" in str(exc), str(exc)


# ---- processes, watched from outside -------------------------------------------------------


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive_after(pids, timeout: float) -> list[int]:
    """The pids still running (zombies count as gone) once ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if not gone(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def drain_rows(queue) -> list[np.ndarray]:
    """Copies of every block left in ``queue``."""
    blocks = []
    for guard in queue.iter():
        with guard as block:
            blocks.append(block.copy())
    return blocks


def drain_until_error(get, deadline_s: float) -> tuple[BaseException | None, float]:
    """Call ``get`` until it raises or ``deadline_s`` s have passed: the exception (None if
    none) and the seconds it took."""
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < deadline_s:
            get()
    except Exception as exc:
        return exc, time.monotonic() - t0
    return None, time.monotonic() - t0


def shm_entries() -> set[str]:
    """The names in /dev/shm, but PyTorch's (its DataLoader, in benchmarks beside the tests)."""
    try:
        return {name for name in os.listdir("/dev/shm") if not name.startswith("torch_")}
    except FileNotFoundError:
        return set()


# ---- what a test can leak --------------------------------------------------------------------

MEMFD = "/memfd:multitables"  # how /proc shows an arena of ours (shm.SharedArena's memfd name)


def open_fds() -> set[tuple[int, str]]:
    """This process's open descriptors, each with what it points to (a path, ``pipe:[...]``,
    ``socket:[...]``, ``/memfd:name (deleted)``): a descriptor closed and its number reused
    for something else counts as a new one."""
    fds = set()
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, now closed
            fds.add((int(entry), os.readlink(f"/proc/self/fd/{entry}")))
    return fds


def memfd_maps() -> set[str]:
    """The mappings of this process's arenas (address range and name, from /proc/self/maps):
    an arena whose descriptor is closed still holds its memory while it is mapped."""
    with open("/proc/self/maps") as f:
        return {f"{line.split()[0]} {line.split(maxsplit=5)[5].strip()}"
                for line in f if MEMFD in line}


def forked_results(target, args_list, timeout: float = 60) -> list:
    """Run ``target(*args, results)`` in one forked child per ``args`` (what they inherit is not
    pickled: a DataLoader's workers under fork), at once; what each puts in ``results``, in
    the order they come. Children that outlive ``timeout`` are killed and fail the test."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    children = [ctx.Process(target=target, args=(*args, results)) for args in args_list]
    for child in children:
        child.start()
    try:
        return [results.get(timeout=timeout) for _ in children]
    finally:
        end_children(children, results)


def end_children(children, queue) -> None:
    """Join forked ``children`` (killing any left after 10 s) and close their ``queue``."""
    for child in children:
        child.join(10)
        if child.exitcode is None:
            child.kill()
            child.join()
    queue.close()
    queue.join_thread()


def worker_pids() -> set[int]:
    """The running children of this process but multiprocessing's own helpers: the workers a
    test started (with those of earlier tests that still stand by)."""
    helpers, _ = _mp_helpers()
    return {p.pid for p in psutil.Process().children()
            if p.pid not in helpers and not gone(p.pid) and not _server(p)}


def _server(process: psutil.Process) -> bool:
    """Whether ``process`` is the S3 server a session fixture keeps for the tests after it."""
    try:
        return "rclone" in process.name()
    except psutil.Error:
        return False


def _mp_helpers() -> tuple[set[int], set[int]]:
    """The pids and descriptors of multiprocessing's own long-lived helpers (the resource
    tracker, the fork server): started by the first test that needs them (a spawn or forkserver
    start), they live as long as this process."""
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    tracker = multiprocessing.resource_tracker._resource_tracker
    server = multiprocessing.forkserver._forkserver
    pids = {getattr(tracker, "_pid", None), getattr(server, "_forkserver_pid", None)}
    fds = {getattr(tracker, "_fd", None), getattr(server, "_forkserver_alive_fd", None)}
    return {pid for pid in pids if pid is not None}, {fd for fd in fds if fd is not None}


def _ours(shm_name: str) -> bool:
    """Whether a /dev/shm name is this process's to answer for: named multitables*, and, when it
    ends in a pid (the leak fixture's own test names its bait so), by this process or its parent,
    not by another test run on the same machine."""
    if not shm_name.startswith("multitables"):
        return False
    tail = shm_name.rpartition("-")[2]
    return not tail.isdigit() or int(tail) in (os.getpid(), os.getppid())


@dataclasses.dataclass(frozen=True)
class Resources:
    """What a test can leak, taken at one moment: child processes, open descriptors, the
    mappings of our memfds, and /dev/shm names of ours (we create none; the directory is shared
    by the whole machine, so other programs' names there say nothing about us)."""

    children: frozenset[int]
    fds: frozenset[tuple[int, str]]
    maps: frozenset[str]
    shm: frozenset[str]

    @classmethod
    def now(cls) -> Resources:
        me = psutil.Process()
        return cls(
            children=frozenset(p.pid for p in me.children(recursive=True)),
            fds=frozenset(open_fds()),
            maps=frozenset(memfd_maps()),
            shm=frozenset(n for n in shm_entries() if _ours(n)),
        )


def leaks_since(before: Resources, settle: float = 5.0) -> list[str]:
    """One message per kind of resource left behind since ``before`` (none: an empty list).
    Waits up to ``settle`` s for children to exit and descriptors and mappings to go (a worker
    exits, a thread closes its end), and kills the children still running then."""
    # multitables.dask keeps the files its tasks read open in this process, by design (one open
    # per file, not one per chunk): close them, so that what stays open is a leak.
    dask_front = sys.modules.get("multitables.dask")
    if dask_front is not None:
        dask_front.close_files()
    deadline = time.monotonic() + settle
    while True:
        gc.collect()
        after = Resources.now()
        helper_pids, helper_fds = _mp_helpers()
        extra = [psutil.Process(pid) for pid in after.children - before.children - helper_pids
                 if not gone(pid)]
        fds = sorted((fd, what) for fd, what in after.fds - before.fds if fd not in helper_fds)
        maps = sorted(after.maps - before.maps)
        shm = sorted(after.shm - before.shm)
        if not (extra or fds or maps or shm) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    messages = []
    if extra:
        described = []
        for p in extra:
            with contextlib.suppress(psutil.NoSuchProcess):
                described.append((p.pid, p.cmdline()))
                p.kill()
        messages.append(f"test left child processes: {described}")
    memfds = [(fd, what) for fd, what in fds if what.startswith(MEMFD)]
    if memfds:
        messages.append(f"test left memfds open: {memfds}")
    others = [(fd, what) for fd, what in fds if not what.startswith(MEMFD)]
    if others:
        messages.append(f"test left file descriptors open: {others}")
    if maps:
        messages.append(f"test left memfds mapped: {maps}")
    if shm:
        messages.append(f"test left /dev/shm entries: {shm}")
    return messages


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child(subprocess.Popen):
    """A child Python running ``code`` (argv[1:] = args) in the repository, its stdout and
    stderr piped: the way to run anything that could crash or hang the test process itself (a
    dying parent, Ctrl-C, a rlimit, a segfault), watched from outside.

    ``pids`` are the workers the test knows of (see :meth:`read_pids`). On the way out of its
    ``with`` block the child is killed if still running, so are those workers (a stopped worker
    would hold the pipes open), and its pipes are closed.
    """

    def __init__(self, code: str, *args, **popen_kwargs):
        popen_kwargs.setdefault("cwd", REPO)
        # Ctrl-C as a terminal sends it: a test run started in the background by a shell
        # without job control ignores SIGINT, and a child would inherit that and never see it.
        popen_kwargs.setdefault("preexec_fn", _default_sigint)
        super().__init__(
            [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_kwargs,
        )
        self.pids: list[int] = []

    def __exit__(self, *exc_info) -> None:
        if self.poll() is None:
            self.kill()
        self._kill_workers(self.pids)
        self.wait(10)
        self.stdout.close()
        self.stderr.close()

    @staticmethod
    def _kill_workers(pids) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def read_pids(self, timeout: float = 30) -> list[int]:
        """The worker pids the child prints as its first line of stdout (a JSON list); they
        become ``pids``. Fails the test if none come within ``timeout`` s."""
        sel = selectors.DefaultSelector()
        sel.register(self.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout)
        sel.close()
        line = self.stdout.readline() if ready else ""
        if not line:
            self.kill()
            rc = self.wait(10)
            pytest.fail(f"child printed nothing (rc {rc}); stderr:\n{self.stderr.read()}")
        self.pids = json.loads(line)
        return self.pids

    def finish(self, timeout: float) -> tuple[str, str, list[int]]:
        """Wait for the child to exit: its stdout, its stderr and its workers still running 2 s
        later (killed then). Fails the test (killing it and its workers) on timeout."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._kill_workers(self.pids)
            self.wait(10)
            pytest.fail(f"child still running {timeout} s later; "
                        f"stderr:\n{self.stderr.read()[-3000:]}")
        left = alive_after(self.pids, 2)
        self._kill_workers(left)  # stopped workers left behind would hold the pipes open
        return self.stdout.read(), self.stderr.read(), left
