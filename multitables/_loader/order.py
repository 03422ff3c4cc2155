"""The order of a training epoch: which file rows each rank plays in each batch, apart from any I/O.

Internal module of pure functions behind ``Loader``. An epoch is a sequence of ``n_rows``
*positions*; ``EpochOrder`` maps positions to file rows (a seeded chunk-aware shuffle),
``plan_rank`` maps a rank and the epoch's resume history to the positions of its batches, and
``worker_batches`` splits those batches among DataLoader workers. Sets of positions are kept as
sorted disjoint ``(start, stop)`` intervals, never as arrays of every position.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_right
from collections.abc import Iterable, Sequence

import numpy as np

Interval = tuple[int, int]

# Tags that keep the unit stream and the window streams of one (seed, epoch) apart.
_UNITS, _WINDOW = 1, 2


def check_epoch(epoch: object) -> int:
    """``epoch`` as an int in [0, 2**32) (the seed mixes 32 bits of it); raises otherwise."""
    return _count("epoch", epoch, 0, 2**32)


def _count(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high)``; ValueError/TypeError naming ``name`` otherwise."""
    number = operator.index(value)  # type: ignore[arg-type]
    if number < low or (high is not None and number >= high):
        bound = f">= {low}" if high is None else f"in [{low}, 2**{high.bit_length() - 1})"
        raise ValueError(f"{name} must be an integer {bound}, got {number}")
    return number


def _rng(seed: int, epoch: int, tag: int, *more: int) -> np.random.Generator:
    """The generator of one stream of (seed, epoch), named by ``tag`` and ``more``."""
    # SeedSequence cuts big ints into 32-bit words and pads with zeros, so fields of varying width
    # could alias ((2**32, 2) would read as (0, 1, 2)): each field gets a fixed number of words.
    return np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, epoch, tag, *more])


def _arange(intervals: Iterable[Interval]) -> np.ndarray:
    """The positions of ``intervals``, in order, as int64."""
    parts = [np.arange(start, stop, dtype=np.int64) for start, stop in intervals]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _coalesce(intervals: Iterable[Interval]) -> list[Interval]:
    """``intervals`` in the given order, each joined to its predecessor where they abut."""
    out: list[Interval] = []
    for start, stop in intervals:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        elif start < stop:
            out.append((start, stop))
    return out


def _subtract(kept: list[Interval], removed: Iterable[Interval]) -> list[Interval]:
    """The sorted disjoint intervals of ``kept`` less every position of ``removed``."""
    cuts: list[list[int]] = []
    for start, stop in sorted(removed):  # merged into sorted disjoint cuts
        if cuts and start <= cuts[-1][1]:
            cuts[-1][1] = max(stop, cuts[-1][1])
        elif start < stop:
            cuts.append([start, stop])
    out: list[Interval] = []
    j = 0
    for start, stop in kept:
        while j < len(cuts) and cuts[j][1] <= start:
            j += 1
        for cut_start, cut_stop in cuts[j:]:
            if cut_start >= stop:
                break
            if cut_start > start:
                out.append((start, cut_start))
            start = max(start, cut_stop)
        if start < stop:
            out.append((start, stop))
    return out


class EpochOrder:
    """The file row at each position of one epoch: units permuted, rows mixed within windows.

    Rows come in units of ``unit_rows`` consecutive rows (the last may be short). Shuffled, the
    units are permuted (seeded by ``seed`` and ``epoch``), cut into windows of ``window_units``
    units, and the rows of each window permuted uniformly (seeded by ``seed``, ``epoch`` and the
    window's index); unshuffled, the order is the identity. A window's rows are computed when a
    position in it is asked for; the last two are cached.

    Examples
    --------
    >>> order = EpochOrder(10, 3, 2, shuffle=False)
    >>> order.n_units, order.n_windows, order.window_bounds(1), order.rows(4, 8).tolist()
    (4, 2, (6, 10), [4, 5, 6, 7])
    >>> shuffled = EpochOrder(10, 3, 2, shuffle=True, seed=7, epoch=1)
    >>> sorted(shuffled.rows(0, 10).tolist()) == list(range(10))
    True
    """

    def __init__(self, n_rows: int, unit_rows: int, window_units: int, *, shuffle: bool,
                 seed: int = 0, epoch: int = 0, unit_starts: np.ndarray | None = None) -> None:
        self.n_rows = _count("n_rows", n_rows, 1)
        # Units of several files (``_loader/files.py``): each file's own units, of its own
        # size, none across a file's end; ``unit_rows`` is then the largest.
        self.unit_starts = unit_starts
        self.unit_rows = _count("unit_rows", unit_rows, 1)
        self.units_per_window = _count("window_units", window_units, 1)
        self.shuffle = bool(shuffle)
        self.seed = _count("seed", seed, 0, 2**64)
        self.epoch = check_epoch(epoch)
        self.n_units = (-(-self.n_rows // self.unit_rows) if unit_starts is None
                        else len(unit_starts) - 1)
        self.n_windows = -(-self.n_units // self.units_per_window)
        if self.shuffle:
            rng = _rng(self.seed, self.epoch, _UNITS)
            self._units = rng.permutation(self.n_units).astype(np.int64)
        else:
            self._units = np.arange(self.n_units, dtype=np.int64)
        first = np.arange(self.n_windows, dtype=np.int64) * self.units_per_window
        if unit_starts is not None:
            sizes = np.add.reduceat(np.diff(unit_starts)[self._units], first)
        else:
            sizes = np.minimum(self.units_per_window, self.n_units - first) * self.unit_rows
            # Only the last unit of the file can be short; its window holds that many rows
            # fewer.
            last_window = int(np.flatnonzero(self._units == self.n_units - 1)[0])
            sizes[last_window // self.units_per_window] -= (self.n_units * self.unit_rows
                                                            - self.n_rows)
        self._starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache: tuple[tuple[int, np.ndarray], ...] = ()  # replaced whole: thread-safe

    def __repr__(self) -> str:
        return (f"EpochOrder(n_rows={self.n_rows}, unit_rows={self.unit_rows}, "
                f"window_units={self.units_per_window}, shuffle={self.shuffle}, "
                f"seed={self.seed}, epoch={self.epoch})")

    def _check_window(self, w: int) -> int:
        w = operator.index(w)
        if not 0 <= w < self.n_windows:
            raise IndexError(f"window {w} is out of bounds for an epoch of {self.n_windows} "
                             f"windows ({self.n_rows} rows)")
        return w

    def window_bounds(self, w: int) -> tuple[int, int]:
        """The positions ``[start, stop)`` that window ``w`` fills."""
        w = self._check_window(w)
        return int(self._starts[w]), int(self._starts[w + 1])

    def window_of(self, position: int) -> int:
        """The window that holds ``position``."""
        position = operator.index(position)
        if not 0 <= position < self.n_rows:
            raise IndexError(f"position {position} is out of bounds for an epoch of "
                             f"{self.n_rows} rows")
        return int(np.searchsorted(self._starts, position, side="right")) - 1

    def window_units(self, w: int) -> np.ndarray:
        """The units of window ``w`` in read order (file order, so neighbours read as one)."""
        w = self._check_window(w)
        upw = self.units_per_window
        return np.sort(self._units[w * upw:(w + 1) * upw])

    def _window_rows(self, w: int) -> np.ndarray:
        """The file rows at the positions of window ``w``, in epoch order."""
        for cached, rows in self._cache:
            if cached == w:
                return rows
        units = self.window_units(w)
        if self.unit_starts is not None:
            starts = self.unit_starts[units]
            lengths = self.unit_starts[units + 1] - starts
            ends = np.cumsum(lengths)
            rows = np.arange(int(ends[-1]), dtype=np.int64) + np.repeat(
                starts - (ends - lengths), lengths)
        else:
            rows = (units[:, None] * self.unit_rows + np.arange(self.unit_rows)).ravel()
            rows = rows[rows < self.n_rows]
        rows = _rng(self.seed, self.epoch, _WINDOW, w).permutation(rows)
        self._cache = (*self._cache[-1:], (w, rows))
        return rows

    def unit_of(self, rows: np.ndarray) -> np.ndarray:
        """The unit that holds each of ``rows``."""
        if self.unit_starts is None:
            return rows // self.unit_rows
        return np.searchsorted(self.unit_starts, rows, side="right") - 1

    def unit_start(self, units: np.ndarray) -> np.ndarray:
        """The first row of each of ``units``."""
        if self.unit_starts is None:
            return units * self.unit_rows
        return self.unit_starts[units]

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The int64 file rows at positions ``start:stop`` (``0 <= start <= stop <= n_rows``)."""
        start, stop = operator.index(start), operator.index(stop)
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"positions {start}:{stop} are out of bounds for an epoch of "
                             f"{self.n_rows} rows")
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        if start == stop:
            return np.empty(0, np.int64)
        parts = []
        for w in range(self.window_of(start), self.window_of(stop - 1) + 1):
            base = int(self._starts[w])
            lo, hi = max(start, base), min(stop, int(self._starts[w + 1]))
            parts.append(self._window_rows(w)[lo - base:hi - base])
        return np.concatenate(parts)

    def rows_at(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """The int64 file rows at ``positions`` (any order, repeats allowed), in that order."""
        pos = np.asarray(positions, dtype=np.int64)
        bad = (pos < 0) | (pos >= self.n_rows)
        if bad.any():
            raise IndexError(f"position {int(pos[bad][0])} is out of bounds for an epoch of "
                             f"{self.n_rows} rows")
        if not self.shuffle:
            return pos.copy()
        windows = np.searchsorted(self._starts, pos, side="right") - 1
        out = np.empty_like(pos)
        # One pass per window over its own positions (grouped by a stable sort), not over all.
        by_window = np.argsort(windows, kind="stable")
        groups = np.flatnonzero(np.diff(windows[by_window])) + 1
        for here in np.split(by_window, groups) if len(pos) else ():
            w = int(windows[here[0]])
            out[here] = self._window_rows(w)[pos[here] - self._starts[w]]
        return out


class _Segment:
    """One world's partition of a set of positions: padded (or cut) to equal, contiguous spans.

    The padded list is the set in epoch order followed by its first positions again (cyclically,
    as DistributedSampler does) until it splits evenly; rank r owns list indices
    ``[r * per_rank, (r + 1) * per_rank)``. With ``drop_last`` nothing is padded and the tail
    that does not fill a batch on every rank is left out.
    """

    def __init__(self, kept: list[Interval], world_size: int, batch_size: int,
                 drop_last: bool) -> None:
        self.kept, self.world_size, self.batch_size = kept, world_size, batch_size
        self._cum = [0]
        for start, stop in kept:
            self._cum.append(self._cum[-1] + stop - start)
        self.size = self._cum[-1]
        if drop_last:
            self.n_batches = self.size // (world_size * batch_size)
            self.per_rank = self.n_batches * batch_size
        else:
            self.per_rank = -(-self.size // world_size)
            self.n_batches = -(-self.per_rank // batch_size)

    def _take(self, a: int, b: int) -> list[Interval]:
        """Positions at indices ``[a, b)`` of the (unpadded) set, ``0 <= a <= b <= size``."""
        out = []
        i = bisect_right(self._cum, a) - 1
        while a < b:
            start, stop = self.kept[i]
            first = start + a - self._cum[i]
            n = min(stop - first, b - a)
            out.append((first, first + n))
            a += n
            i += 1
        return out

    def span(self, a: int, b: int) -> list[Interval]:
        """Positions at indices ``[a, b)`` of the padded list, in order."""
        out = self._take(a, min(b, self.size))
        k, end = max(a, self.size) - self.size, b - self.size  # padding indices, cyclic in the set
        while k < end:
            first = k % self.size
            n = min(self.size - first, end - k)
            out += self._take(first, first + n)
            k += n
        return out

    def rank_span(self, rank: int, first_batch: int, stop_batch: int) -> list[Interval]:
        """Positions of ``rank``'s batches ``first_batch:stop_batch``, in order."""
        base = rank * self.per_rank
        end = base + self.per_rank
        return self.span(min(base + first_batch * self.batch_size, end),
                         min(base + stop_batch * self.batch_size, end))

    def delivered(self, batches_done: int) -> list[Interval]:
        """Every position some rank played in its first ``batches_done`` batches."""
        return [iv for rank in range(self.world_size)
                for iv in self.rank_span(rank, 0, batches_done)]


class RankPlan:
    """What one rank plays in the rest of an epoch: ``n_batches`` batches of epoch positions.

    Built by ``plan_rank``. Batch ``k`` counts from the resume point; ``history_after(k)`` is the
    epoch's state to save once ``k`` of these batches have been played.
    """

    def __init__(self, segment: _Segment, rank: int, first_batch: int,
                 history: list[list[int]]) -> None:
        self._segment, self.rank, self._first = segment, rank, first_batch
        self._history = history  # earlier segments, the current one excluded
        self.world_size, self.batch_size = segment.world_size, segment.batch_size
        self.n_batches = segment.n_batches - first_batch

    def __repr__(self) -> str:
        return (f"RankPlan(rank={self.rank}, world_size={self.world_size}, "
                f"n_batches={self.n_batches}, batch_size={self.batch_size})")

    def batch_intervals(self, k: int) -> list[Interval]:
        """The positions of this rank's ``k``-th remaining batch, as intervals in order."""
        k = operator.index(k)
        if not 0 <= k < self.n_batches:
            raise IndexError(f"batch {k} is out of bounds for rank {self.rank}'s "
                             f"{self.n_batches} remaining batches")
        first = self._first + k
        return self._segment.rank_span(self.rank, first, first + 1)

    def batch_positions(self, k: int) -> np.ndarray:
        """The int64 positions of this rank's ``k``-th remaining batch, in order."""
        return _arange(self.batch_intervals(k))

    def intervals(self) -> list[Interval]:
        """All positions this rank still plays, in order (padding last), as intervals."""
        segment = self._segment
        return _coalesce(segment.rank_span(self.rank, self._first, segment.n_batches))

    def history_after(self, k: int) -> list[list[int]]:
        """The epoch's state once ``k`` of this plan's batches are played (JSON-friendly)."""
        k = operator.index(k)
        if not 0 <= k <= self.n_batches:
            raise ValueError(f"{k} batches played, but the plan holds {self.n_batches}")
        return [*map(list, self._history), [self.world_size, self._first + k]]


def plan_rank(n_rows: int, batch_size: int, world_size: int, rank: int, *, drop_last: bool,
              history: Iterable[Sequence[int]] = ()) -> RankPlan:
    """The batches ``rank`` of ``world_size`` plays in the rest of an epoch of ``n_rows``.

    ``history`` lists the segments already played in this epoch, ``[world_size, batches_done]``
    each. The same world size as the last segment continues it exactly; another one starts a new
    segment over the positions not yet delivered, in epoch order.

    Examples
    --------
    >>> [plan_rank(10, 2, 3, r, drop_last=False).intervals() for r in range(3)]
    [[(0, 4)], [(4, 8)], [(8, 10), (0, 2)]]
    >>> plan = plan_rank(10, 2, 3, 1, drop_last=False, history=[[3, 1]])
    >>> plan.n_batches, plan.batch_positions(0).tolist(), plan.history_after(1)
    (1, [6, 7], [[3, 2]])
    >>> plan_rank(10, 2, 2, 0, drop_last=False, history=[[3, 1]]).intervals()  # elastic
    [(2, 4)]
    """
    n_rows = _count("n_rows", n_rows, 0)
    batch_size = _count("batch_size", batch_size, 1)
    world_size = _count("world_size", world_size, 1)
    rank = _count("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank {rank} is out of range for world_size {world_size}")
    kept: list[Interval] = [(0, n_rows)] if n_rows else []
    past: list[list[int]] = []
    entries = [list(entry) for entry in history]
    for i, entry in enumerate(entries):
        if len(entry) != 2:
            raise ValueError(f"history entry {i} must be [world_size, batches_done], got {entry}")
        size = _count(f"world_size of history entry {i}", entry[0], 1)
        done = _count(f"batches_done of history entry {i}", entry[1], 0)
        segment = _Segment(kept, size, batch_size, drop_last)
        if done > segment.n_batches:
            raise ValueError(f"history entry {i} has {done} batches done, but {size} ranks play "
                             f"{segment.n_batches} batches of {batch_size} there")
        if i == len(entries) - 1 and size == world_size:
            return RankPlan(segment, rank, done, past)
        kept = _subtract(kept, segment.delivered(done))
        past.append([size, done])
    return RankPlan(_Segment(kept, world_size, batch_size, drop_last), rank, 0, past)


def total_batches(n_rows: int, batch_size: int, world_size: int, *, drop_last: bool) -> int:
    """Batches per rank in a fresh epoch (``len(loader)``); the same on every rank.

    >>> total_batches(10, 2, 3, drop_last=False), total_batches(10, 2, 3, drop_last=True)
    (2, 1)
    """
    n_rows = _count("n_rows", n_rows, 0)
    kept = [(0, n_rows)] if n_rows else []
    return _Segment(kept, _count("world_size", world_size, 1), _count("batch_size", batch_size, 1),
                    drop_last).n_batches


def worker_batches(n_batches: int, n_workers: int, worker: int) -> range:
    """The contiguous share of ``range(n_batches)`` that DataLoader ``worker`` plays.

    Shares partition the batches and differ in size by at most one, the larger ones first.

    >>> [list(worker_batches(5, 3, w)) for w in range(3)]
    [[0, 1], [2, 3], [4]]
    """
    n_batches = _count("n_batches", n_batches, 0)
    n_workers = _count("n_workers", n_workers, 1)
    worker = _count("worker", worker, 0)
    if worker >= n_workers:
        raise ValueError(f"worker {worker} is out of range for {n_workers} workers")
    base, extra = divmod(n_batches, n_workers)
    start = worker * base + min(worker, extra)
    return range(start, start + base + (worker < extra))


def shuffle_quality(rows_per_batch: Iterable[np.ndarray], chunk_rows: int) -> tuple[float, float]:
    """How well batches mix: (mean distinct chunks per batch, fraction of neighbour pairs).

    A neighbour pair is two consecutive rows of a batch that are neighbours in the file
    (``|a - b| == 1``); a uniform shuffle of n rows gives about 2/n of them.

    >>> shuffle_quality([np.array([0, 1, 2, 3]), np.array([8, 4])], chunk_rows=4)
    (1.5, 0.75)
    """
    chunk_rows = _count("chunk_rows", chunk_rows, 1)
    n_batches = chunks = pairs = neighbours = 0
    for batch in rows_per_batch:
        rows = np.asarray(batch, dtype=np.int64)
        n_batches += 1
        chunks += len(np.unique(rows // chunk_rows))
        pairs += max(len(rows) - 1, 0)
        neighbours += int(np.count_nonzero(np.abs(np.diff(rows)) == 1))
    return (chunks / n_batches if n_batches else math.nan,
            neighbours / pairs if pairs else 0.0)
