"""Type stub for the owner of a lent result's memory (see _lent.pyx)."""

from collections.abc import Callable

import numpy as np
import numpy.typing as npt

class Lent:
    def __init__(self, raw: npt.NDArray[np.uint8], on_last: Callable[[], object]) -> None: ...

def view_array(raw: npt.NDArray[np.uint8], at: int, dtype: np.dtype,
               shape: tuple[int, ...]) -> np.ndarray: ...
def lent_array(raw: npt.NDArray[np.uint8], on_last: Callable[[], object], dtype: np.dtype,
               shape: tuple[int, ...]) -> np.ndarray: ...
