"""Whether a PyTables table's column carries a completely sorted index (internal), as
``read_sorted(..., checkCSI=True)`` requires."""

from __future__ import annotations

from typing import Any

import h5py

from .._hdf5.source import FileRef, get_dataset, open_file


def check_csindex(filename: FileRef, file_kwargs: dict[str, Any], path: str, column: str) -> None:
    """``ValueError`` unless column ``column`` of the table at ``path`` has a 'full' index
    (PyTables' ``create_csindex``: 64-bit indices, optlevel 9, not dirty)."""
    with open_file(filename, file_kwargs) as file:
        table = get_dataset(file, path)
        parent, _, name = table.name.rpartition("/")
        index = file.get(f"{parent}/_i_{name}/{column}")
        ok = (
            isinstance(index, h5py.Group)
            and "indices" in index
            and index["indices"].dtype.itemsize == 8
            and int(index.attrs.get("optlevel", 0)) == 9
            and not int(index.attrs.get("DIRTY", 0))
        )
    if not ok:
        raise ValueError(
            f"Field `{column}` must have associated a 'full' index in table `{path}`"
            " (PyTables' create_csindex); pass checkCSI=False to sort without one"
        )
