"""PyTorch's front door: a ``Loader`` as an ``IterableDataset`` of batches of tensors.

Use it with ``DataLoader(dataset, batch_size=None)``: the batches are made here, by the Loader's
own worker processes, so ``num_workers=0`` is the fast and resumable choice. With
``num_workers > 0`` the DataLoader's workers split each epoch between them (no row twice, none
missing; each reads only its share of the chunks); call ``set_epoch`` before each epoch then, as
with ``DistributedSampler``, since the workers play copies of this object.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import loader as _loader
from .source import default_n_procs

__all__ = ["Loader"]


class Loader(IterableDataset):
    """``multitables.Loader(filename, columns, batch_size, **kw)`` yielding tensors.

    Same arguments and methods (``set_epoch``, ``state_dict``, ``load_state_dict``, ``close``,
    ``len``) as :class:`multitables.Loader`; batches are tensors, tuples or dicts of tensors that
    share memory with the arrays the Loader made (owned by the caller unless ``copy=False``).
    Columns must have dtypes torch has: name fields of a table as columns (``"/table/field"``)
    rather than the table itself.

    Examples
    --------
    >>> import h5py, numpy as np, tempfile, os, torch
    >>> import multitables.torch
    >>> path = os.path.join(tempfile.mkdtemp(), "doc.h5")
    >>> with h5py.File(path, "w") as f:
    ...     _ = f.create_dataset("x", data=np.arange(10.0).reshape(5, 2))
    >>> dataset = multitables.torch.Loader(path, "x", batch_size=2, n_procs=1)
    >>> [batch.shape for batch in torch.utils.data.DataLoader(dataset, batch_size=None)]
    [torch.Size([2, 2]), torch.Size([2, 2]), torch.Size([1, 2])]
    >>> dataset.close()
    """

    def __init__(self, filename, columns, batch_size: int, **kw):
        super().__init__()
        self._n_procs_given = kw.get("n_procs") is not None
        self.loader = _loader.Loader(filename, columns, batch_size, **kw)
        for column, info in zip(self.loader._columns, _column_dtypes(self.loader), strict=True):
            if info.names is not None:
                raise TypeError(
                    f"column {column.path!r} is a table ({info}); torch has no structured "
                    f"dtype: name its fields as columns, e.g. '{column.path}/{info.names[0]}'")

    def __iter__(self):
        worker = get_worker_info()
        if worker is None:
            batches = self.loader._epoch_batches(0, 1)
        else:
            if not self._n_procs_given:  # the DataLoader's workers share the CPUs
                self.loader.n_procs = max(1, default_n_procs() // worker.num_workers)
            batches = self.loader._epoch_batches(worker.id, worker.num_workers)
        for batch in batches:
            yield _tensors(batch)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _column_dtypes(loader: _loader.Loader) -> list[np.dtype]:
    return [loader._infos[c.dataset].field_dtype(c.field) for c in loader._columns]


def _tensors(batch: Any) -> Any:
    if isinstance(batch, dict):
        return {name: torch.from_numpy(a) for name, a in batch.items()}
    if isinstance(batch, tuple):
        return tuple(torch.from_numpy(a) for a in batch)
    return torch.from_numpy(batch)
