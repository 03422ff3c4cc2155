"""multitables: fast parallel reads of HDF5 datasets into shared memory.

Two front doors: ``Streamer`` streams a dataset in blocks; ``Reader`` serves random access with
numpy-style keys. Worker processes read with h5py straight into shared memory and the caller gets
zero-copy views.
"""

from .errors import (
    QueueClosed,
    QueueClosedException,
    SharedMemoryError,
    SubprocessException,
)
from .futures import Request, RequestPool
from .reader import Reader
from .stages import Stage, StagePool
from .streamer import Guard, Queue, Streamer

__version__ = "3.0.0.dev0"

__all__ = [
    "Guard",
    "Queue",
    "QueueClosed",
    "QueueClosedException",
    "Reader",
    "Request",
    "RequestPool",
    "SharedMemoryError",
    "Stage",
    "StagePool",
    "Streamer",
    "SubprocessException",
    "__version__",
]
