"""What the command line advises (multitables._tools.advice), as functions of stored or measured
facts."""

from __future__ import annotations

import numpy as np
import pytest

from multitables._tools.advice import (
    break_even_bytes,
    calls,
    layout_warnings,
    shuffle_note,
    verdict,
)


def entry(shape, chunks, filters="gzip(4)", dtype="f4", block_size=None, remainder=0):
    dtype = np.dtype(dtype)
    return {"path": "/x", "shape": shape, "dtype": dtype, "chunks": chunks, "filters": filters,
            "nbytes": int(np.prod(shape)) * dtype.itemsize,
            "block_size": block_size or shape[0], "remainder": remainder}


def test_compressed_chunks_of_many_rows_warn_for_random_access():
    (line,) = layout_warnings("f.h5", entry((4000, 1024), (256, 1024)))
    assert "1,048,576 bytes for a row of 4,096 (256 rows per chunk)" in line
    # Chunks of 8 rows of 4 KiB suggested: too few rows to warn again.
    assert line.endswith("h5repack -l /x:CHUNK=8x1024 f.h5 rechunked.h5")
    # h5repack reads no URL: it is told to take a local copy.
    (line,) = layout_warnings("s3://b/f.h5", entry((4000, 1024), (256, 1024)))
    assert line.endswith("h5repack -l /x:CHUNK=8x1024 <a local copy of s3://b/f.h5> "
                         "rechunked.h5")


@pytest.mark.parametrize("shape, chunks", [((4000, 256), (16, 256)), ((4000, 1024), (16, 1024)),
                                           ((100, 1 << 18), (32, 1 << 18)), ((50, 4), (40, 4))])
def test_the_layout_suggested_for_random_access_takes_the_warning_away(shape, chunks):
    line = layout_warnings("f.h5", entry(shape, chunks))[0]
    suggested = tuple(int(n) for n in line.split("CHUNK=")[1].split()[0].split("x"))
    assert suggested[0] < chunks[0] and suggested[1:] == shape[1:]
    assert not any("random access" in w for w in layout_warnings("f.h5", entry(shape, suggested)))


def test_uncompressed_chunks_read_rows_straight_from_the_file_and_do_not_warn():
    assert layout_warnings("f.h5", entry((4000, 1024), (256, 1024), filters="none")) == []
    # Just under the threshold: 15 rows per chunk.
    assert layout_warnings("f.h5", entry((4000, 2048), (15, 2048))) == []
    assert len(layout_warnings("f.h5", entry((4000, 2048), (16, 2048)))) == 1


def test_tiny_chunks_warn_for_streaming():
    (line,) = layout_warnings("f.h5", entry((5000, 16), (10, 16), filters="none"))
    assert "tiny chunks (640 bytes, 500 of them)" in line
    assert line.endswith("h5repack -l /x:CHUNK=5000x16 f.h5 rechunked.h5")  # capped at length
    assert layout_warnings("f.h5", entry((10, 16), (10, 16), filters="none")) == []  # one chunk


def test_remainder_is_said():
    (line,) = layout_warnings("f.h5", entry((2500, 256), None, filters="none", block_size=1024,
                                            remainder=452))
    assert "streams 2,048 of 2,500 rows in blocks of 1,024; the last 452" in line
    assert "get_remainder('/x', 1024)" in line and "remainder=True" in line


def test_break_even():
    # 0.1 s to start, then 400 MB/s against 100 MB/s: equal at 0.1 / (1/100 - 1/400) MB.
    assert break_even_bytes(0.1, 100, 400) == pytest.approx(0.1 / (1 / 100e6 - 1 / 400e6))
    assert break_even_bytes(0.1, 100, 100) is None
    assert break_even_bytes(0.1, 100, 50) is None


def test_verdict_says_when_h5py_is_better():
    # 10 MB: h5py 100 MB/s (0.1 s); multitables 0.15 s to start, then 10 MB in 0.025 s.
    lines = verdict(10_000_000, 100, 10 / 0.175, 0.15, 0.175)
    assert "plain h5py is the better choice for passes of 10.0 MB" in "\n".join(lines)
    even = 0.15 / (1 / 100e6 - 1 / 400e6) / 1e6
    assert f"pays off from about {even:,.1f} MB" in "\n".join(lines)
    lines = verdict(1_000_000_000, 100, 380, 0.15, 1_000 / 380)
    assert "multitables is 3.80x plain h5py here; it pays off above about" in lines[-1]


def test_calls_name_the_settings():
    text = "\n".join(calls("f.h5", "/x", 2, 512))
    assert "streamer.get_queue('/x', n_procs=2, block_size=512, read_ahead=5)" in text
    assert "multitables.Reader('f.h5', n_procs=2)" in text
    assert "create_stage_pool(ROWS_PER_REQUEST, 4)" in text
    # tune's training line was a Loader without shuffle=True: an unshuffled epoch.
    assert "multitables.Loader('f.h5', ['/x'], batch_size=BATCH, shuffle=True, n_procs=2)" in text


def test_the_steady_rate_is_told_apart_from_the_tables_figure():
    """tune printed "then 1,014 MB/s" beside a best of 684 MB/s in its own table, unexplained:
    the first is past the start-up, the second over the whole pass."""
    lines = verdict(1_000_000_000, 100, 380, 0.5, 1_000 / 380)
    steady = 1_000_000_000 / (1_000 / 380 - 0.5) / 1e6
    assert f"past it, {steady:,.0f} MB/s (380 MB/s over the whole pass, start-up included" \
        in lines[0]


def test_random_access_advice_says_training_needs_no_rechunking():
    warnings = layout_warnings("f.h5", entry((100_000, 64), (4096, 64)))
    random = next(w for w in warnings if "random access" in w)
    assert "the Loader's chunk-aware shuffle reads whole chunks" in random


def test_info_says_when_the_loaders_default_shuffle_is_not_uniform():
    """Unfiltered data gets a uniform shuffle by default; compressed data keeps a window of
    chunks, and info said nothing of it."""
    note = shuffle_note(entry((100_000, 64), (64, 64)))
    assert note is not None
    assert "mixes windows of chunks (each decoded once), not uniformly" in note
    assert "window=100000 shuffles uniformly, holding 25.6 MB of decoded rows" in note
    assert shuffle_note(entry((100_000, 64), (64, 64), filters="none")) is None


def test_tune_says_when_the_training_call_does_not_shuffle_uniformly():
    assert not any("not uniform" in line for line in calls("f.h5", "/x", 2, 512))
    lines = calls("f.h5", "/x", 2, 512, uniform_shuffle=False)
    assert "window=N_ROWS is uniform" in lines[-1]
