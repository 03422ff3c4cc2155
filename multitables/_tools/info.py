"""``python -m multitables info``: each dataset's layout, what a queue would do with it, and what
to change (internal)."""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from .._hdf5.codecs import CODECS
from .._hdf5.remote import RemoteFile
from .._hdf5.source import FileRef, open_file
from . import advice
from . import measure as m
from .files import file_arg
from .progress import mb


def filters_of(ds: Any) -> str:
    """The filter pipeline by name, read from the creation property list so plugins show too."""
    plist = ds.id.get_create_plist()
    names = []
    for i in range(plist.get_nfilters()):
        code, _flags, values, name = plist.get_filter(i)
        name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        name = name.split()[0] if name else f"filter{code}"
        spec = CODECS.get(code)
        shown = spec.show(values) if spec is not None and spec.show is not None else None
        names.append(shown or name)
    return "+".join(names) or "none"


def _virtual_sources(ds: Any) -> tuple[str, int]:
    """A virtual dataset's filters column ("virtual, N sources: their filters") and the bytes its
    sources store: its own pipeline is empty and it stores nothing, whatever its sources hold."""
    import h5py

    base = os.path.dirname(os.path.abspath(ds.file.filename))
    sources = {(vmap.file_name, vmap.dset_name) for vmap in ds.virtual_sources()}
    filters: set[str] = set()
    stored = 0
    for file_name, dset_name in sorted(sources):
        try:
            if file_name == ".":
                src = ds.file[dset_name]
                filters.add(filters_of(src))
                stored += src.id.get_storage_size()
            else:
                with h5py.File(os.path.join(base, file_name), "r") as f:
                    src = f[dset_name]
                    filters.add(filters_of(src))
                    stored += src.id.get_storage_size()
        except (OSError, KeyError):
            filters.add("missing source")
    return f"virtual, {len(sources)} sources: {', '.join(sorted(filters))}", stored


def _dtype(dt: np.dtype) -> str:
    import h5py

    string = h5py.check_string_dtype(dt)
    if string is not None:
        return f"vlen str ({string.encoding})" if string.length is None else str(dt)
    vlen = h5py.check_vlen_dtype(dt)
    if vlen is not None:
        return f"vlen {_dtype(np.dtype(vlen))}"
    if dt.names:
        parts = []
        for name in dt.names:
            sub = dt[name]
            base = sub.base.str.lstrip("<>|=")
            parts.append(f"{name}:{base}{list(sub.shape) if sub.shape else ''}")
        return "{" + ", ".join(parts) + "}"
    return str(dt)


def describe(filename: FileRef) -> list[dict[str, Any]]:
    """One dict per dataset in the file: the facts ``info`` prints."""
    import h5py

    found: list[dict[str, Any]] = []

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        shape = tuple(obj.shape) if obj.shape is not None else ()
        entry = {
            "path": "/" + name, "shape": shape, "dtype": obj.dtype, "chunks": obj.chunks,
            "filters": filters_of(obj), "nbytes": int(np.prod(shape, dtype=np.int64)) *
            obj.dtype.itemsize, "stored": obj.id.get_storage_size(), "block_size": None,
        }
        if obj.is_virtual and not isinstance(filename, RemoteFile):
            entry["filters"], entry["stored"] = _virtual_sources(obj)
        entry["remainder"] = None
        # Variable-length rows are not streamed (a Loader reads them as lists).
        if len(shape) >= 1 and shape[0] > 0 and h5py.check_vlen_dtype(obj.dtype) is None:
            entry["block_size"] = m.default_block_size(shape, obj.dtype, obj.chunks)
            # A queue streams whole blocks only, unless made with remainder=True.
            entry["remainder"] = shape[0] % entry["block_size"]
        found.append(entry)

    with open_file(filename, {}) as f:
        f.visititems(visit)
    return found


def cmd_info(args: argparse.Namespace) -> int:
    rows = [["path", "shape", "dtype", "chunks", "filters", "size", "stored", "block_size",
             "remainder"]]
    warnings: list[str] = []
    file = file_arg(args)
    found = describe(file)
    for d in found:
        warnings += advice.layout_warnings(args.file, d)
        row_bytes = d["nbytes"] // d["shape"][0] if d["shape"] and d["shape"][0] else 0
        block = "-" if d["block_size"] is None else (
            f"{d['block_size']} ({d['block_size'] * row_bytes / m.MiB:.2f} MiB)")
        ratio = f" (x{d['nbytes'] / d['stored']:.1f})" if d["stored"] else ""
        rest = "-" if d["remainder"] is None else f"{d['remainder']} rows"
        rows.append([d["path"], str(d["shape"]), _dtype(d["dtype"]), str(d["chunks"]),
                     d["filters"], mb(d["nbytes"]), mb(d["stored"]) + ratio, block, rest])
    if len(rows) == 1:
        print(f"{args.file}: no datasets")
        return 0
    print(m.format_table(rows))
    if isinstance(file, RemoteFile):
        stats = file.source.stats
        print(f"\nopened {file} with {stats.requests} request(s), "
              f"{mb(stats.bytes_fetched)} fetched (its metadata: every dataset's header; "
              f"median request {stats.percentile(50) * 1e3:.1f} ms)")
    print("\nremainder: the rows past the last whole block that get_queue(path) leaves to "
          "streamer.get_remainder(path, block_size);\nget_queue(path, remainder=True) streams "
          "them as a last, shorter block")
    if warnings:
        print("\nwarnings:")
        for line in warnings:
            print(f"  {line}")
    notes = [note for d in found if (note := advice.shuffle_note(d)) is not None]
    if notes:
        print("\ntraining (the Loader's default shuffle is uniform on unfiltered data):")
        for line in notes:
            print(f"  {line}")
    return 0
