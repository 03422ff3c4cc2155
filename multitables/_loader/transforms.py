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


def collate(samples: Sequence[Any], allocate: Allocate) -> Any:
    """One batch of ``samples``, spelled as they are (a dict, a tuple or a value): for each
    part, the values stacked into an array from ``allocate`` when they are arrays or numbers of
    one shape and dtype, else a list of them."""
    first = samples[0]
    if isinstance(first, dict):
        keys = list(first)
        for i, sample in enumerate(samples):
            if not isinstance(sample, dict) or list(sample) != keys:
                raise TypeError(f"the samples of a batch must be alike: sample 0 is a dict of "
                                f"{keys}, sample {i} is {_spelled(sample)}")
        return {key: _part([s[key] for s in samples], allocate) for key in keys}
    if type(first) is tuple:
        for i, sample in enumerate(samples):
            if type(sample) is not tuple or len(sample) != len(first):
                raise TypeError(f"the samples of a batch must be alike: sample 0 is a tuple of "
                                f"{len(first)}, sample {i} is {_spelled(sample)}")
        return tuple(_part([s[k] for s in samples], allocate) for k in range(len(first)))
    return _part(list(samples), allocate)


def _spelled(sample: Any) -> str:
    if isinstance(sample, dict):
        return f"a dict of {list(sample)}"
    if type(sample) is tuple:
        return f"a tuple of {len(sample)}"
    return f"a {type(sample).__name__}"


def _part(values: list[Any], allocate: Allocate) -> Any:
    """``values`` stacked into one array, or as a list (strings, objects, ragged arrays)."""
    kind = _stackable(values)
    if kind is None:
        return list(values)
    shape, dtype = kind
    out = allocate((len(values), *shape), dtype)
    for i, value in enumerate(values):
        out[i] = value
    return out


# Scalars that stack: Python's numbers and numpy's (a fixed string or a record too).
_SCALARS = (bool, int, float, complex, np.generic)


def _stackable(values: list[Any]) -> tuple[tuple[int, ...], np.dtype] | None:
    """The shape and dtype every value has, if all are arrays (or scalars) of the same."""
    first = values[0]
    if isinstance(first, np.ndarray):
        shape, dtype = first.shape, first.dtype
        if dtype.hasobject:
            return None
        for value in values:
            if not (isinstance(value, np.ndarray) and value.shape == shape
                    and value.dtype == dtype):
                return None
        return shape, dtype
    if isinstance(first, _SCALARS):
        dtype = np.asarray(first).dtype
        if dtype.hasobject:
            return None
        for value in values:
            if type(value) is not type(first) or np.asarray(value).dtype != dtype:
                return None
        return (), dtype
    return None
