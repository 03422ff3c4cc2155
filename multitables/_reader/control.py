"""The control memory a Reader shares with its workers (internal): which worker watches its
queue, per worker the count of requests it finished, its CPU time, when it became ready and its
queue of work, then an ``ErrorBox`` for failures of a worker itself.

The Reader's side (``dispatch``) and the workers' (``job``) map the same layout; the sizes are
read when the memory is mapped, so a test may shrink the queues before a Reader starts.
"""

from __future__ import annotations

from .._engine._ringbuf import Counter, SlotQueue, Word
from .._engine.errbox import ErrorBox
from .readspec import ReadSpec
from .stages import MAX_PARTS

ERROR_BYTES = 1 << 16
SPINNER = 0  # the word naming the watching worker (its index + 1; 0: none)
WORKERS = 64  # where the first worker's area starts
DONE_BYTES = 192  # per worker: its count of finished requests, busy time, ready stamp, queue
QUEUE_ITEMS = 1024  # a caller with more requests pending on one worker waits for room
PER_WORKER = DONE_BYTES + SlotQueue.nbytes(QUEUE_ITEMS)

# Items of a worker's queue: a request (or a part of one) written in a stage memory's header
# (``encode_item``), or NOTICE: a message waits on the worker's channel (a stage memory to map
# or drop, a request too large for the header).
NOTICE = 0

# A task of a worker: stage memory id, part, parts (1: the whole request), the request (None: it
# lies in the memory's header).
Task = tuple[int, int, int, "ReadSpec | None"]


def nbytes(n_procs: int) -> int:
    """The size of the control memory of ``n_procs`` workers."""
    return errors_at(n_procs) + ERROR_BYTES


def errors_at(n_procs: int) -> int:
    return WORKERS + PER_WORKER * n_procs


def spinner(buffer) -> Word:
    return Word(buffer, SPINNER)


def done_counter(buffer, worker: int) -> Counter:
    """The count of requests ``worker`` finished (the caller prefers awake workers)."""
    return Counter(buffer, WORKERS + PER_WORKER * worker)


def ready_stamp(buffer, worker: int) -> Counter:
    """When ``worker`` became ready to serve (``time.monotonic_ns()``, a clock every process
    shares; 0 before): what starting a worker costs, for the caller to weigh starting another
    (``Dispatcher.worth_starting``)."""
    return Counter(buffer, WORKERS + PER_WORKER * worker + 128)


def busy_counter(buffer, worker: int) -> Counter:
    """The CPU nanoseconds ``worker`` spent serving requests (the caller wakes a second worker only
    where a request costs a worker more than it costs the caller, ``Dispatcher.pick_worker``)."""
    return Counter(buffer, WORKERS + PER_WORKER * worker + 64)


def work_queue(buffer, worker: int, create: bool = False) -> SlotQueue:
    return SlotQueue(buffer, WORKERS + PER_WORKER * worker + DONE_BYTES, QUEUE_ITEMS, create)


def error_box(buffer, n_procs: int) -> ErrorBox:
    return ErrorBox(buffer, errors_at(n_procs), ERROR_BYTES)


def encode_item(memory_id: int, part: int, parts: int) -> int:
    """A worker queue's item for part ``part`` of ``parts`` of the request in a stage memory."""
    return (memory_id * MAX_PARTS + part) * MAX_PARTS + (parts - 1) + 1  # 0 is NOTICE


def decode_item(item: int) -> Task:
    rest, parts = divmod(item - 1, MAX_PARTS)
    memory_id, part = divmod(rest, MAX_PARTS)
    return memory_id, part, parts + 1, None
