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
    image: Any, offsets: np.ndarray, sizes: np.ndarray, dest: np.ndarray | None, out: Any,
    fill: Any, unit: int = 1,
) -> None: ...
def recall(
    known: np.ndarray, rows: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
) -> int: ...
def pack(
    image: Any, offsets: np.ndarray, sizes: np.ndarray, dest: np.ndarray | None, values: Any,
    at: int, starts: np.ndarray, lengths: np.ndarray, unit: int,
) -> tuple[int, int]: ...
