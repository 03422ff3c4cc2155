"""Type stub for the read plan (see _selection.pyx)."""

from typing import Any

import numpy as np
import numpy.typing as npt

class Selection:
    shape: tuple[int, ...]
    dims: tuple[tuple[int, int, int] | npt.NDArray[np.int64], ...]
    read_shape: tuple[int, ...]
    result_shape: tuple[int, ...]
    local_key: tuple[Any, ...] | None
    points: npt.NDArray[np.int64] | None
    point_dims: tuple[int, ...]
    point_axis: int
    def __init__(
        self,
        shape: tuple[int, ...],
        dims: tuple[tuple[int, int, int] | npt.NDArray[np.int64], ...],
        read_shape: tuple[int, ...],
        result_shape: tuple[int, ...],
        local_key: tuple[Any, ...] | None,
        points: npt.NDArray[np.int64] | None = ...,
        point_dims: tuple[int, ...] = ...,
        point_axis: int = ...,
    ) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def read_size(self) -> int: ...
    def nbytes(self, itemsize: int) -> int: ...
    def __reduce__(self) -> tuple[Any, ...]: ...
    def put_plain(self, dest: npt.NDArray[np.uint8], offset: int, room: int, head: bytes,
                  shape: tuple[int, ...], at: int) -> bool: ...
    def plain_request(self, head: bytes, shape: tuple[int, ...], at: int) -> bytes | None: ...

PLAIN_TAG: bytes

def read_plain(data: Any) -> tuple[bytes, int, tuple[int, ...], Selection]: ...
def take_plain(header: npt.NDArray[np.uint8], offset: int,
               room: int) -> tuple[bytes, int, tuple[int, ...], Selection] | None: ...
