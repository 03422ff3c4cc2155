"""Type stub for the global heap primitives of the variable-length reads (see _vlen.pyx)."""

from typing import Any

import numpy as np

def walk(
    image: Any, at: np.ndarray, end: np.ndarray,
) -> tuple[np.ndarray, None] | tuple[None, tuple[int, int]]: ...
def gather(image: Any, offsets: np.ndarray, sizes: np.ndarray, out: Any) -> None: ...
