"""Type stub for the row primitives of the worker-side reads (see _rows.pyx)."""

from typing import Any

import numpy as np
import numpy.typing as npt

def runs(u: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...
def gather_rows(
    src: Any, dst: Any, rows: np.ndarray, chunk_offsets: np.ndarray, chunk_rows: int,
    row_bytes: int,
) -> None: ...
def populate(image: Any, start: int = 0, stop: int = -1) -> bool: ...
