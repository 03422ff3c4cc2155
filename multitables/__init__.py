"""multitables: fast parallel reads of HDF5 datasets into shared memory.

Three front doors on one engine: ``Streamer`` streams a dataset in blocks; ``Reader`` serves
random access with numpy-style keys; ``Loader`` plays shuffled, sharded, resumable training batches
of aligned columns. Worker processes read with h5py straight into shared memory.
"""

import sys as _sys

if not _sys.platform.startswith("linux"):
    raise ImportError(
        f"multitables runs on Linux only (its workers wait on futexes and share memfd memory); "
        f"this is {_sys.platform}")

from ._reader.futures import Request, RequestPool
from ._reader.stages import Stage, StagePool
from .errors import (  # noqa: E402
    ClosedError,
    MultitablesError,
    ObjectChangedError,
    QueueClosed,
    QueueClosedException,
    SharedMemoryError,
    StagePoolExhausted,
    SubprocessException,
    TransformError,
)
from .loader import Loader, Pad
from .reader import Reader
from .streamer import Guard, Queue, Streamer

__version__ = "3.0.0.dev0"

__all__ = [
    "ClosedError",
    "Guard",
    "Loader",
    "MultitablesError",
    "ObjectChangedError",
    "Pad",
    "Queue",
    "QueueClosed",
    "QueueClosedException",
    "Reader",
    "Request",
    "RequestPool",
    "SharedMemoryError",
    "Stage",
    "StagePool",
    "StagePoolExhausted",
    "Streamer",
    "SubprocessException",
    "TransformError",
    "__version__",
]
