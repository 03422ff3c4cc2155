"""A virtual dataset described as such: its sources' filters and chunk rows, which its own
(empty) filter pipeline and (absent) chunks do not show."""

from __future__ import annotations

import pytest
from helpers import write_virtual

from multitables._hdf5.source import describe
from multitables._hdf5.virtual import UNALIGNED_UNIT_CHUNKS


def test_a_virtual_dataset_of_compressed_sources_says_so(tmp_path):
    """Its own pipeline is empty: described by it alone, it read as unfiltered, contiguous."""
    path, _ = write_virtual(tmp_path, [200, 120, 80])
    info = describe(path, "/v", {})
    assert info.compression is None and info.chunks is None  # what the test passed by accident
    assert info.virtual is not None
    assert info.virtual.n_sources == 3
    assert info.virtual.filters == ("gzip",)
    assert info.compressed
    assert info.virtual.aligned and info.chunk_rows == 40
    plain = describe(path, "/plain", {})
    assert plain.virtual is None and plain.compressed and plain.chunk_rows == 40


def test_sources_off_their_chunk_grid_read_in_several_chunks(tmp_path):
    path, _ = write_virtual(tmp_path, [190, 210])  # the second starts 30 rows into a chunk
    info = describe(path, "/v", {})
    assert info.virtual is not None and not info.virtual.aligned
    assert info.virtual.chunk_rows == 40
    assert info.chunk_rows == UNALIGNED_UNIT_CHUNKS * 40


@pytest.mark.parametrize("compression", [None, "lzf"])
def test_unfiltered_and_mixed_sources(tmp_path, compression):
    path, _ = write_virtual(tmp_path, [200, 200], compression=compression)
    info = describe(path, "/v", {})
    assert info.virtual is not None
    assert info.compressed == (compression is not None)
    assert info.virtual.filters == ((compression,) if compression else ("none",))


def test_a_missing_source_counts_as_compressed_of_unknown_chunks(tmp_path):
    path, _ = write_virtual(tmp_path, [200, 200])
    (tmp_path / "v.h5.src1.h5").unlink()
    info = describe(path, "/v", {})
    assert info.virtual is not None and info.compressed and info.chunk_rows is None
    assert "missing source" in info.virtual.filters
