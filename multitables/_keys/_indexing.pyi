"""Type stub for the Cython index translation (see _indexing.pyx)."""

from typing import Any

from ._selection import Selection as Selection
from ._selection import from_plain as from_plain

def translate(key: Any, shape: tuple[int, ...]) -> Selection: ...
