"""Which stored chunk a failed read of some rows tripped on, for the error that reports it.

Internal module. Used only after a read has failed: each chunk that the rows lie in is read
through HDF5 again, alone, and the first that fails is named by its place in the dataset and in
the file, so that a corrupt chunk can be found and mended (``h5dump``, a copy of the file).
"""

from __future__ import annotations

import h5py


def bad_chunk(dataset: h5py.Dataset, start: int, stop: int) -> str | None:
    """The first chunk holding rows ``start:stop`` of ``dataset`` that HDF5 cannot read, as
    "chunk K (rows a:b, at byte offset O, N bytes stored)"; None when every one reads (or the
    dataset is not chunked)."""
    chunks, shape = dataset.chunks, dataset.shape
    if not chunks or not shape or dataset.is_virtual:
        return None
    c = chunks[0]
    whole_rows = tuple(chunks[1:]) == tuple(shape[1:])
    for k in range(start // c, -(-stop // c)):
        a, b = k * c, min((k + 1) * c, shape[0])
        boxes: list[tuple[slice, ...]]
        if whole_rows:
            boxes = [(slice(a, b),)]
        else:  # every chunk of the band of rows, across the other axes
            boxes = [(slice(a, b), *grid) for grid in _grids(shape[1:], chunks[1:])]
        for box in boxes:
            try:
                dataset[box]
            except Exception:  # noqa: BLE001 - any failure of this chunk is the one to name
                origin = tuple(s.start for s in box) + (0,) * (len(shape) - len(box))
                info = dataset.id.get_chunk_info_by_coord(origin)
                where = ("" if info.byte_offset is None else
                         f", at byte offset {info.byte_offset:,}, {info.size:,} bytes stored")
                place = f"rows {a}:{b}" if whole_rows else f"offset {origin}"
                return f"chunk {k} ({place}{where})"
    return None


def _grids(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The boxes of one chunk each that tile ``shape``."""
    boxes: list[tuple[slice, ...]] = [()]
    for n, c in zip(shape, chunks, strict=True):
        boxes = [(*box, slice(i, min(i + c, n))) for box in boxes for i in range(0, n, c)]
    return boxes
