"""The chunk map of one HDF5 dataset: where every stored chunk's bytes are in the file (logical
offset, byte offset, stored size, filter mask), built once in the parent and handed to workers
that then read chunks by byte range without parsing HDF5 metadata; optionally kept on local disk
keyed by the file's version."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

LAYOUTS = {h5py.h5d.CHUNKED: "chunked", h5py.h5d.CONTIGUOUS: "contiguous",
           h5py.h5d.COMPACT: "compact"}
FORMAT = 1  # of the saved file; a different one is ignored (and rebuilt)


@dataclasses.dataclass(frozen=True, eq=False)
class ChunkMap:
    """One dataset's storage. ``layout`` is ``"chunked"``, ``"contiguous"`` (one entry: the
    whole data, no filters) or ``"compact"`` (no entry: the data sits in the object header,
    and ``compact_data`` holds its bytes for a fixed-size dtype). Chunks never written are
    absent and read as ``fillvalue``. ``filters`` is the pipeline as HDF5 gives it: (filter id,
    flags, client values, name) in the order they were applied."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str
    chunks: tuple[int, ...] | None
    filters: tuple[tuple[int, int, tuple[int, ...], str], ...]
    fillvalue: bytes | None
    chunk_offsets: np.ndarray   # (n, ndim) int64: the first element of each chunk
    byte_offsets: np.ndarray    # (n,) uint64: where its stored bytes start in the file
    sizes: np.ndarray           # (n,) uint64: how many bytes are stored
    filter_masks: np.ndarray    # (n,) uint32: bit i set = filter i was skipped for this chunk
    compact_data: bytes | None = None
    key: tuple | None = None    # the (url, size, version) it was built from, if known

    def __len__(self) -> int:
        return len(self.byte_offsets)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChunkMap):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self) if f.name != "key")

    @property
    def stored_bytes(self) -> int:
        return int(self.sizes.sum())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return bool(a == b)


def chunk_map(dataset: h5py.Dataset, key: tuple | None = None) -> ChunkMap:
    """The chunk map of ``dataset``: one pass over its chunk index (``chunk_iter`` where h5py
    and HDF5 have it, which reads the B-tree once; else ``get_chunk_info`` per chunk)."""
    dsid = dataset.id
    dcpl = dsid.get_create_plist()
    layout = LAYOUTS.get(dcpl.get_layout(), "other")
    filters = tuple((int(code), int(flags), tuple(int(v) for v in values),
                     name.decode(errors="replace") if isinstance(name, bytes) else str(name))
                    for code, flags, values, name in
                    (dcpl.get_filter(i) for i in range(dcpl.get_nfilters())))
    ndim = len(dataset.shape)
    starts: list[tuple[int, ...]] = []
    offsets: list[int] = []
    sizes: list[int] = []
    masks: list[int] = []

    def add(info: Any) -> None:
        starts.append(tuple(info.chunk_offset))
        offsets.append(info.byte_offset)
        sizes.append(info.size)
        masks.append(info.filter_mask)

    compact = None
    if layout == "chunked":
        if hasattr(dsid, "chunk_iter"):
            try:
                dsid.chunk_iter(add)
            except (RuntimeError, NotImplementedError):  # HDF5 < 1.14 or 1.12.3: no H5Dchunk_iter
                for done in (starts, offsets, sizes, masks):
                    done.clear()
                for i in range(dsid.get_num_chunks()):
                    add(dsid.get_chunk_info(i))
        else:
            for i in range(dsid.get_num_chunks()):
                add(dsid.get_chunk_info(i))
    elif layout == "contiguous":
        offset = dsid.get_offset()
        if offset is not None:  # None: never written, all fill value
            starts.append((0,) * ndim)
            offsets.append(offset)
            sizes.append(dsid.get_storage_size())
            masks.append(0)
    elif layout == "compact" and not dataset.dtype.hasobject:
        compact = np.ascontiguousarray(dataset[()]).tobytes()
    return ChunkMap(
        name=dataset.name, shape=tuple(dataset.shape), dtype=dataset.dtype, layout=layout,
        chunks=tuple(dataset.chunks) if dataset.chunks else None, filters=filters,
        fillvalue=_fillvalue(dataset),
        chunk_offsets=np.array(starts, np.int64).reshape(len(starts), ndim),
        byte_offsets=np.array(offsets, np.uint64), sizes=np.array(sizes, np.uint64),
        filter_masks=np.array(masks, np.uint32), compact_data=compact, key=key)


def _fillvalue(dataset: h5py.Dataset) -> bytes | None:
    if dataset.dtype.hasobject:
        return None
    return np.asarray(dataset.fillvalue, dataset.dtype).tobytes()


def _descr(d: Any) -> Any:
    """A dtype descr back from JSON, which made its tuples lists: (name, type[, shape])."""
    if isinstance(d, str):
        return d
    fields = []
    for name, kind, *shape in d:
        fields.append((name, _descr(kind), *(tuple(s) for s in shape)))
    return fields


class ChunkMapStore:
    """Chunk maps saved under ``directory``, one ``.npz`` file per (source identity, dataset
    name), so reopening an unchanged file needs no HDF5 metadata read; and per source identity,
    the numbers of the blocks h5py read to open it (``save_blocks``). Written to a temporary
    file and renamed, so a reader sees a whole map or none; a map whose stored key differs
    (another version, a hash collision) or that cannot be read counts as absent."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, key: tuple, name: str) -> Path:
        name = "/" + name.lstrip("/")  # "x" and "/x" are the same dataset
        digest = hashlib.sha256(repr((key, name)).encode()).hexdigest()[:40]
        return self.directory / f"chunkmap-{digest}.npz"

    def blocks_path(self, key: tuple) -> Path:
        digest = hashlib.sha256(repr(("blocks", key)).encode()).hexdigest()[:40]
        return self.directory / f"metablocks-{digest}.json"

    def save_blocks(self, key: tuple, blocks: Any) -> None:
        """Keep the block numbers ``blocks`` of the object ``key`` names."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": FORMAT, "key": repr(key), "blocks": sorted(blocks)})
        fd, tmp = tempfile.mkstemp(prefix=".metablocks-", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.blocks_path(key))
        except BaseException:
            os.unlink(tmp)
            raise

    def load_blocks(self, key: tuple) -> list[int]:
        """The block numbers kept for ``key``; none when absent, unreadable or another's."""
        try:
            found = json.loads(self.blocks_path(key).read_text())
            if found.get("format") != FORMAT or found.get("key") != repr(key):
                return []
            return [int(b) for b in found["blocks"]]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def save(self, cm: ChunkMap) -> Path:
        if cm.key is None:
            raise ValueError("a chunk map without a key (source identity) cannot be stored")
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "key": repr(cm.key), "name": cm.name, "shape": cm.shape,
                "dtype": np.lib.format.dtype_to_descr(cm.dtype), "layout": cm.layout,
                "chunks": cm.chunks, "filters": cm.filters}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
                  "chunk_offsets": cm.chunk_offsets, "byte_offsets": cm.byte_offsets,
                  "sizes": cm.sizes, "filter_masks": cm.filter_masks}
        for field in ("fillvalue", "compact_data"):
            value = getattr(cm, field)
            if value is not None:
                arrays[field] = np.frombuffer(value, np.uint8)
        target = self.path(cm.key, cm.name)
        fd, tmp = tempfile.mkstemp(prefix=".chunkmap-", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
        return target

    def load(self, key: tuple, name: str) -> ChunkMap | None:
        name = "/" + name.lstrip("/")
        try:
            with np.load(self.path(key, name), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes())
                if meta.get("format") != FORMAT or meta["key"] != repr(key) or \
                        meta["name"] != name:
                    return None
                dtype = np.lib.format.descr_to_dtype(_descr(meta["dtype"]))
                return ChunkMap(
                    name=name, shape=tuple(meta["shape"]), dtype=dtype, layout=meta["layout"],
                    chunks=tuple(meta["chunks"]) if meta["chunks"] else None,
                    filters=tuple((c, fl, tuple(v), n) for c, fl, v, n in meta["filters"]),
                    fillvalue=z["fillvalue"].tobytes() if "fillvalue" in z else None,
                    chunk_offsets=z["chunk_offsets"], byte_offsets=z["byte_offsets"],
                    sizes=z["sizes"], filter_masks=z["filter_masks"],
                    compact_data=z["compact_data"].tobytes() if "compact_data" in z else None,
                    key=key)
        except (OSError, ValueError, KeyError, TypeError):
            return None
