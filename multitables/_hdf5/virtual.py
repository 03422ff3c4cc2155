"""What an HDF5 virtual dataset is made of: its sources' filters and chunk rows (internal).

A virtual dataset's own creation properties say nothing of how its rows are stored: its filter
pipeline is empty and it has no chunks, whatever its sources hold. A read path chosen by those
tests would take compressed sources for plain bytes on disk. ``sources`` looks at the sources
themselves, so the front doors can describe a virtual dataset as such and read it as its sources
are stored (the rows are still read through HDF5, which maps them to the sources).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py

# A source read in units that do not start on its chunk grid decodes one chunk more per unit:
# units of this many chunks keep that to a quarter more.
UNALIGNED_UNIT_CHUNKS = 4


@dataclass(frozen=True)
class VirtualSources:
    """The facts about a virtual dataset's sources that choose how to read it."""

    n_sources: int  # distinct (file, dataset) pairs mapped
    filters: tuple[str, ...]  # the sources' compression, sorted ("none" for unfiltered ones)
    compressed: bool  # some source is filtered, or could not be opened to tell
    chunk_rows: int | None  # every source's rows per chunk, when all are chunked alike in rows
    aligned: bool  # every mapping starts on its source's chunk grid in the virtual rows

    @property
    def read_rows(self) -> int | None:
        """Rows of a read that decodes each source chunk once or about once: whole chunks where
        the sources' chunk grids line up in the virtual rows, else a few chunks' rows."""
        if self.chunk_rows is None:
            return None
        return self.chunk_rows if self.aligned else UNALIGNED_UNIT_CHUNKS * self.chunk_rows


def sources(ds: h5py.Dataset) -> VirtualSources:
    """The sources of the virtual dataset ``ds``, opened read-only alongside its file (a source
    that cannot be opened counts as compressed, of unknown chunks)."""
    dcpl = ds.id.get_create_plist()
    base = os.path.dirname(os.path.abspath(os.fsdecode(ds.file.filename)))
    pairs: set[tuple[str, str]] = set()
    filters: set[str] = set()
    chunk_rows: set[int | None] = set()
    aligned = True
    compressed = False
    for i in range(dcpl.get_virtual_count()):
        file_name, dset_name = dcpl.get_virtual_filename(i), dcpl.get_virtual_dsetname(i)
        pairs.add((file_name, dset_name))
        facts = _source(ds, base, file_name, dset_name)
        if facts is None:
            filters.add("missing source")
            compressed, aligned = True, False
            chunk_rows.add(None)
            continue
        filtered, compression, rows = facts
        filters.add(compression or ("filtered" if filtered else "none"))
        compressed |= filtered
        chunk_rows.add(rows)
        v0, s0 = _first_row(dcpl.get_virtual_vspace(i)), _first_row(
            dcpl.get_virtual_srcspace(i))
        if rows is None or v0 is None or s0 is None or (v0 - s0) % rows:
            aligned = False
    uniform = chunk_rows.pop() if len(chunk_rows) == 1 else None
    return VirtualSources(len(pairs), tuple(sorted(filters)), compressed, uniform,
                          aligned and uniform is not None)


def _source(ds: h5py.Dataset, base: str, file_name: str,
            dset_name: str) -> tuple[bool, str | None, int | None] | None:
    """(filtered, compression, chunk rows in whole rows) of one source; None if unreadable."""
    try:
        if file_name == ".":
            return _facts(ds.file[dset_name])
        with h5py.File(os.path.join(base, file_name), "r") as f:
            return _facts(f[dset_name])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def _facts(src: h5py.Dataset) -> tuple[bool, str | None, int | None]:
    if src.is_virtual:
        return True, "virtual", None  # a source of sources: leave its reads to HDF5, by units
    filtered = src.id.get_create_plist().get_nfilters() > 0
    whole_rows = src.chunks is not None and tuple(src.chunks[1:]) == tuple(src.shape[1:])
    return filtered, src.compression, src.chunks[0] if whole_rows and src.chunks else None


def _first_row(space: h5py.h5s.SpaceID) -> int | None:
    """The first row a mapping's selection holds: 0 for all of it, the block's start for one
    regular hyperslab, None for anything else."""
    kind = space.get_select_type()
    if kind == h5py.h5s.SEL_ALL:
        return 0
    if kind == h5py.h5s.SEL_HYPERSLABS and space.is_regular_hyperslab():
        return int(space.get_regular_hyperslab()[0][0])
    return None
