"""Type stub for the Cython index translation (see _indexing.pyx)."""

from typing import Any

from ._selection import PLAIN_TAG as PLAIN_TAG
from ._selection import Selection as Selection
from ._selection import read_plain as read_plain
from ._selection import take_plain as take_plain

def translate(key: Any, shape: tuple[int, ...]) -> Selection: ...
