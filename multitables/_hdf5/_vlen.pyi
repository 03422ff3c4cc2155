"""Type stub for the global heap primitives of the variable-length reads (see _vlen.pyx)."""

from typing import Any

import numpy as np

def walk(
    image: Any, at: np.ndarray, end: np.ndarray,
) -> tuple[np.ndarray, None] | tuple[None, tuple[int, int]]: ...
def gather(image: Any, offsets: np.ndarray, sizes: np.ndarray, out: Any) -> None: ...

OK: int
PAST: int
UNKNOWN: int
NO_OBJECT: int
WRONG_SIZE: int
RANGE: int

def locate(
    image: Any, rows: np.ndarray, n_rows: int, chunk_rows: int, chunk_offsets: np.ndarray,
    where: dict[int, int], table_offsets: np.ndarray, table_sizes: np.ndarray, itemsize: int,
    offsets: np.ndarray, sizes: np.ndarray,
) -> tuple[int, int]: ...
def gather_rows(
    image: Any, offsets: np.ndarray, sizes: np.ndarray, dest: np.ndarray, out: Any,
    fill: Any,
) -> None: ...
