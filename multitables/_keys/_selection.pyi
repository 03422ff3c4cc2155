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
    def plain(self) -> tuple[Any, ...] | None: ...

def from_plain(plain: tuple[Any, ...]) -> Selection: ...
