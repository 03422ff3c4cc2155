"""A Loader's ``transform`` and ``batch_transform`` as its workers run them, and how a batch of
transformed samples is collated (internal).

``Pipeline`` reaches the workers inside their job. Workers that fork find it in their copy of
this process's memory (``_INHERITED``: a lambda or a closure is fine, nothing is pickled);
workers started otherwise, and a Loader sent to a spawned DataLoader worker, need it pickled,
which ``check_picklable`` tries when the Loader is made, so that the reason comes at once.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import pickle
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import TransformError
from .pad import Pad

# Pipelines this process made, by number: a forked worker finds its job's here.
_INHERITED: dict[int, Pipeline] = {}
_NUMBERS = itertools.count()


def takes_rng(function: Callable) -> bool:
    """Whether ``function`` has a parameter named ``rng`` that can be passed by keyword."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    rng = parameters.get("rng")
    return rng is not None and rng.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                            inspect.Parameter.KEYWORD_ONLY)


def sample_rng(seed: int, epoch: int, row: int, *, fresh: bool = True) -> np.random.Generator:
    """The generator a transform gets for ``row`` of ``epoch``: the same numbers wherever and
    whenever the row is made (another worker, a resumed epoch). Its PCG64 state and increment
    are a BLAKE2b hash of the three numbers. ``fresh=False`` (the workers) reseeds one bit
    generator per process instead of making one, which costs 15-30 us a sample."""
    return _seeded(b"%d %d %d" % (seed, epoch, row), fresh)


def batch_rng(seed: int, epoch: int, first_row: int, *, fresh: bool = True
              ) -> np.random.Generator:
    """The generator a batch transform gets: keyed on the batch's first row, apart from that
    row's own."""
    return _seeded(b"%d %d %d batch" % (seed, epoch, first_row), fresh)


# The workers' one generator, reseeded for each sample (``fresh=False``).
_SHARED: np.random.Generator | None = None


def _seeded(key: bytes, fresh: bool) -> np.random.Generator:
    global _SHARED
    digest = hashlib.blake2b(key, digest_size=32).digest()
    state: Any = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
                  "state": {"state": int.from_bytes(digest[:16], "little"),
                            "inc": int.from_bytes(digest[16:], "little") | 1}}
    if fresh:
        generator = np.random.Generator(np.random.PCG64())
    else:
        if _SHARED is None:
            _SHARED = np.random.Generator(np.random.PCG64())
        generator = _SHARED
    generator.bit_generator.state = state  # a Generator keeps no numbers of its own
    return generator


class Pipeline:
    """What the workers do to the rows they read: ``transform`` each sample, then
    ``batch_transform`` the collated batch. ``inherit``: the workers fork from this process."""

    def __init__(self, transform: Callable | None, batch_transform: Callable | None,
                 seed: int, inherit: bool):
        for name, function in (("transform", transform), ("batch_transform", batch_transform)):
            if function is not None and not callable(function):
                raise TypeError(f"{name} must be callable, got {type(function).__name__}")
        self.transform, self.batch_transform = transform, batch_transform
        self.transform_rng = transform is not None and takes_rng(transform)
        self.batch_rng = batch_transform is not None and takes_rng(batch_transform)
        self.seed, self.inherit = seed, inherit
        self.number = next(_NUMBERS)
        if inherit:
            _INHERITED[self.number] = self
            weakref.finalize(self, _INHERITED.pop, self.number, None)

    @property
    def fused_pad(self) -> Pad | None:
        """The ``Pad`` the reads do in place of the transforms, when it is the only one."""
        if self.transform is None and isinstance(self.batch_transform, Pad):
            return self.batch_transform
        return None

    @property
    def transforms(self) -> bool:
        return self.transform is not None or self.batch_transform is not None

    def release(self) -> None:
        """Workers forked from now on will not need it (the Loader is closed)."""
        _INHERITED.pop(self.number, None)

    def check_picklable(self, why: str) -> None:
        """TypeError saying which transform cannot be pickled and why, when ``why`` needs it."""
        for name in ("transform", "batch_transform"):
            function = getattr(self, name)
            if function is None:
                continue
            try:
                pickle.dumps(function)
            except Exception as exc:
                raise TypeError(
                    f"the Loader's {name} {function!r} cannot be pickled ({type(exc).__name__}: "
                    f"{exc}), which {why} needs: define it at module level (not a lambda or a "
                    "local function), or use functools.partial of one") from None

    def __reduce__(self):
        if self.inherit:
            return _inherited, (self.number,)
        return _rebuilt, (self.transform, self.batch_transform, self.seed)

    # ---- in the workers ----

    def apply(self, sample: Any, epoch: int, row: int, where: Callable[[int], str]) -> Any:
        """``transform(sample)`` (with its ``rng``); TransformError naming ``where(row)``."""
        assert self.transform is not None
        try:
            if self.transform_rng:
                return self.transform(sample, rng=_seeded(b"%d %d %d" % (self.seed, epoch, row),
                                                          False))
            return self.transform(sample)
        except Exception as exc:
            raise _error("transform", exc, where(row)) from exc

    def apply_batch(self, batch: Any, epoch: int, first_row: int,
                    where: Callable[[], str]) -> Any:
        """``batch_transform(batch)`` (with its ``rng``); TransformError naming ``where()``."""
        assert self.batch_transform is not None
        try:
            if self.batch_rng:
                return self.batch_transform(
                    batch, rng=batch_rng(self.seed, epoch, first_row, fresh=False))
            return self.batch_transform(batch)
        except Exception as exc:
            raise self.batch_error(exc, where()) from exc

    def batch_error(self, exc: Exception, where: str) -> TransformError:
        """What the training process is told when ``batch_transform`` raised ``exc``."""
        return _error("batch_transform", exc, where)


def _inherited(number: int) -> Pipeline:
    pipeline = _INHERITED.get(number)
    if pipeline is None:  # a worker not forked from the Loader's process
        raise RuntimeError("a Loader's transforms reach only workers forked from its process")
    return pipeline


def _rebuilt(transform, batch_transform, seed: int) -> Pipeline:
    return Pipeline(transform, batch_transform, seed, inherit=False)


def _error(name: str, exc: Exception, where: str) -> TransformError:
    return TransformError(f"the Loader's {name} raised on {where}: {type(exc).__name__}: {exc}")


# ---- collating samples ----------------------------------------------------------------------

Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


class Collator:
    """One batch of ``n`` samples, spelled as they are (a dict, a tuple or a value), collated as
    they come: for each part, the values stacked into an array from ``allocate`` when they are
    arrays or numbers of one shape and dtype, else a list of them.

    Each value is stacked as soon as it is added, while it is still in the cache, and can then
    be freed: a batch's samples never all live at once (256 decoded images: 9.6 MB). A value
    that does not stack with those before turns its part into a list."""

    def __init__(self, first: Any, n: int, allocate: Allocate):
        self.first, self.n = first, n
        if isinstance(first, dict):
            self.keys: list[Any] | None = list(first)
            values = [first[key] for key in self.keys]
        elif type(first) is tuple:
            self.keys, values = None, list(first)
        else:
            self.keys, values = None, [first]
        self.parts = [_Part(value, n, allocate) for value in values]
        self.count = 1

    def add(self, sample: Any) -> None:
        """The next sample; TypeError if it is not spelled as the first."""
        i, first = self.count, self.first
        if self.keys is not None:
            if not isinstance(sample, dict) or list(sample) != self.keys:
                raise TypeError(f"the samples of a batch must be alike: sample 0 is a dict of "
                                f"{self.keys}, sample {i} is {_spelled(sample)}")
            values = [sample[key] for key in self.keys]
        elif type(first) is tuple:
            if type(sample) is not tuple or len(sample) != len(first):
                raise TypeError(f"the samples of a batch must be alike: sample 0 is a tuple of "
                                f"{len(first)}, sample {i} is {_spelled(sample)}")
            values = list(sample)
        else:
            values = [sample]
        for part, value in zip(self.parts, values, strict=True):
            part.add(i, value)
        self.count += 1

    def batch(self) -> Any:
        """The batch of the samples added (as many as ``n``)."""
        assert self.count == self.n, (self.count, self.n)
        done = [part.done() for part in self.parts]
        if self.keys is not None:
            return dict(zip(self.keys, done, strict=True))
        return tuple(done) if type(self.first) is tuple else done[0]


def collate(samples: Sequence[Any], allocate: Allocate) -> Any:
    """One batch of ``samples`` (``Collator``)."""
    collator = Collator(samples[0], len(samples), allocate)
    for sample in samples[1:]:
        collator.add(sample)
    return collator.batch()


def _spelled(sample: Any) -> str:
    if isinstance(sample, dict):
        return f"a dict of {list(sample)}"
    if type(sample) is tuple:
        return f"a tuple of {len(sample)}"
    return f"a {type(sample).__name__}"


# Scalars that stack: Python's numbers and numpy's (a fixed string or a record too).
_SCALARS = (bool, int, float, complex, np.generic)


class _Part:
    """One part of a batch's samples: stacked into ``out`` while its values allow, else a list
    (of the values as they came, arrays already stacked copied back out)."""

    def __init__(self, first: Any, n: int, allocate: Allocate):
        self.out: np.ndarray | None = None
        self.values: list[Any] | None = None  # the part as a list, once it is one
        self.scalars: list[Any] | None = None  # stacked numbers, kept as they came
        self.array = isinstance(first, np.ndarray)
        if self.array and not first.dtype.hasobject:
            self.shape, self.dtype = first.shape, first.dtype
        elif not self.array and isinstance(first, _SCALARS) and not (
                dtype := np.asarray(first).dtype).hasobject:
            self.shape, self.dtype, self.kind, self.scalars = (), dtype, type(first), [first]
        else:
            self.values = [first]
            return
        self.out = allocate((n, *self.shape), self.dtype)
        self.out[0] = first

    def add(self, i: int, value: Any) -> None:
        if self.values is not None:
            self.values.append(value)
        elif self._stacks(value):
            assert self.out is not None
            self.out[i] = value
            if self.scalars is not None:
                self.scalars.append(value)
        else:
            assert self.out is not None
            self.values = (self.scalars if self.scalars is not None
                           else [np.array(row) for row in self.out[:i]])
            self.values.append(value)
            self.out = self.scalars = None

    def _stacks(self, value: Any) -> bool:
        if self.array:
            return (isinstance(value, np.ndarray) and value.shape == self.shape
                    and value.dtype == self.dtype)
        return type(value) is self.kind and np.asarray(value).dtype == self.dtype

    def done(self) -> Any:
        return self.out if self.values is None else self.values
