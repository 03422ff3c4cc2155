"""``errbox.ErrorBox``: one worker exception carried through a fixed area of shared memory, with
its type, its text and where it happened; too long a traceback keeps its end, which names the line
that raised; the first writer wins."""

from __future__ import annotations

import pytest

from multitables._engine.errbox import ErrorBox

pytestmark = pytest.mark.timeout(60)


def _deep(n: int):
    if n == 0:
        raise_here_at_the_bottom()
    _deeper(n - 1)  # two functions in turn: Python shortens a traceback of one repeated frame


def _deeper(n: int):
    _deep(n)


def raise_here_at_the_bottom():
    raise ValueError("the innermost frame's error")


def _caught(fn, *args) -> BaseException:
    try:
        fn(*args)
    except BaseException as exc:
        return exc
    raise AssertionError("nothing raised")


def test_an_exception_comes_back_with_its_type_text_and_where():
    box = ErrorBox(bytearray(1 << 14), 64, 1 << 13)
    assert not box.full()
    assert box.put(_caught(_deep, 3), "in Reader worker 1, reading /x")
    assert box.full()
    exc = box.exception()
    assert type(exc) is ValueError
    text = str(exc)
    assert "the innermost frame's error" in text and "in Reader worker 1, reading /x" in text
    assert "raise_here_at_the_bottom" in text  # the worker's traceback


def test_a_traceback_too_long_for_the_box_keeps_its_end():
    """A deep recursion's traceback (some 30 KiB) is far longer than a 2 KiB box: the frames
    kept are the last ones, with the line that raised, not the first."""
    exc = _caught(_deep, 100)
    box = ErrorBox(bytearray(4096), 0, 2048)
    assert box.put(exc, "in Streamer worker 0")
    back = box.exception()
    assert type(back) is ValueError
    text = str(back)
    assert "the innermost frame's error" in text and "in Streamer worker 0" in text
    assert 'raise ValueError("the innermost frame\'s error")' in text, text[-600:]
    assert "test_a_traceback_too_long_for_the_box_keeps_its_end" not in text  # the start went


def test_the_first_error_wins_until_the_box_is_cleared():
    box = ErrorBox(bytearray(1 << 14), 0, 1 << 13)
    assert box.put(ValueError("first"), "w0")
    assert not box.put(IndexError("second"), "w1")
    assert type(box.exception()) is ValueError
    box.clear()
    assert not box.full()
    assert box.put(IndexError("third"), "w1")
    assert type(box.exception()) is IndexError and "third" in str(box.exception())
