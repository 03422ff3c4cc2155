"""Every front door reads a URL (our range server, then rclone's S3) as h5py reads the local
file; a missing object raises FileNotFoundError naming the URL where a missing file raises; a
front door pickles with its URL and options."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

import multitables
from multitables.errors import ObjectChangedError

from .remote_files import H5_NAME

pytestmark = pytest.mark.timeout(30)


def test_streamer_queue_generator_remainder(remote, truth):
    url, options = remote(H5_NAME)
    with multitables.Streamer(url, storage_options=options) as streamer:
        assert streamer.filename.startswith(("http://", "s3://"))
        for path, block in (("x", 100), ("gz", 64), ("label", 128), ("wide", 70)):
            with streamer.get_queue(path, n_procs=2, block_size=block, ordered=True) as queue:
                blocks = [g.__enter__().copy() for g in queue.iter()]
            tail = streamer.get_remainder(path, block)
            np.testing.assert_array_equal(np.concatenate(blocks + [tail]), truth[path])
        rows = list(streamer.get_generator("table", n_procs=2, field="b", block_size=33,
                                            ordered=True))
        np.testing.assert_array_equal(np.array(rows), truth["table"]["b"])


def test_reader_keys(remote, truth):
    url, options = remote(H5_NAME)
    keys = [np.s_[[7, 1, 7, 990]], np.s_[10:300:3], np.s_[::-1], np.s_[5:9, 3:6]]
    with multitables.Reader(url, n_procs=2, storage_options=options) as reader:
        for path in ("x", "gz", "wide"):
            ds = reader.get_dataset(path)
            stage = ds.create_stage(2000)
            for key in keys:
                np.testing.assert_array_equal(reader.request(ds[key], stage).get(),
                                              truth[path][key], err_msg=f"{path}[{key}]")
        table = reader.get_dataset("table")
        got = reader.request(table["a"][[3, 500, 2]], table.create_stage(3)).get()
        np.testing.assert_array_equal(got, truth["table"]["a"][[3, 500, 2]])


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_equals_local(remote, local, shuffle):
    url, options = remote(H5_NAME)
    columns = {"x": "x", "gz": "gz", "y": "label", "b": "/table/b"}
    kw = dict(batch_size=64, shuffle=shuffle, seed=3, n_procs=2)
    with multitables.Loader(local, columns, **kw) as here, \
            multitables.Loader(url, columns, storage_options=options, **kw) as there:
        for a, b in zip(here, there, strict=True):
            for name in columns:
                np.testing.assert_array_equal(a[name], b[name])


def test_loader_copy_false_batches_unfiltered(remote, local):
    url, options = remote(H5_NAME)
    kw = dict(batch_size=50, shuffle=True, seed=1, n_procs=2, copy=False, window=1000)
    with multitables.Loader(local, ["x", "label"], **kw) as here, \
            multitables.Loader(url, ["x", "label"], storage_options=options, **kw) as there:
        for a, b in zip(here, there, strict=True):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_torch_dataloader_two_workers(remote, local):
    torch = pytest.importorskip("torch")
    import multitables.torch as mtorch

    url, options = remote(H5_NAME)
    dataset = mtorch.Loader(url, ["x", "label"], batch_size=100, n_procs=1,
                            storage_options=options)
    try:
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
        got = sorted(torch.cat([b[1] for b in loader]).tolist())
        with h5py.File(local) as f:
            assert got == sorted(f["label"][()].tolist())
    finally:
        dataset.close()


def test_dask_from_hdf5(remote, truth):
    pytest.importorskip("dask")
    import multitables.dask as mdask

    url, options = remote(H5_NAME)
    for path in ("x", "gz"):
        arr = mdask.from_hdf5(url, path, chunks=100, storage_options=options)
        np.testing.assert_array_equal(arr.compute(scheduler="threads"), truth[path])
    field = mdask.from_hdf5(url, "table", field="a", storage_options=options)
    np.testing.assert_array_equal(field[10:20].compute(scheduler="sync"),
                                  truth["table"]["a"][10:20])


def test_missing_object_raises_file_not_found_at_first_use(remote):
    url, options = remote("missing.h5")
    streamer = multitables.Streamer(url, storage_options=options)  # no request yet
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        streamer.get_queue("x")
    streamer.close()
    with multitables.Reader(url, storage_options=options) as reader, \
            pytest.raises(FileNotFoundError, match="missing.h5"):
        reader.get_dataset("x")
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        multitables.Loader(url, "x", batch_size=4, storage_options=options)


def test_bad_storage_options_raise_at_construction():
    with pytest.raises(TypeError, match="unexpected key 'secret_key'"):
        multitables.Streamer("s3://b/k.h5", storage_options={"secret_key": "x"})
    with pytest.raises(ValueError, match="cache_limit needs a cache_dir"):
        multitables.Reader("s3://b/k.h5", cache_limit=10)


@pytest.mark.parametrize("open_", [
    lambda url: multitables.Streamer(url),
    lambda url: multitables.Reader(url),
    lambda url: multitables.Loader(url, "x", batch_size=4),
])
def test_other_url_schemes_are_refused_by_name(open_):
    """gs:// and ftp:// were taken for local paths: h5py said no such file."""
    with pytest.raises(ValueError, match=r"unsupported URL scheme 'gs' in 'gs://b/k\.h5'"):
        open_("gs://b/k.h5")
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'") as e:
        open_("ftp://user:hunter2@host/k.h5")
    assert "hunter2" not in str(e.value)


def test_front_doors_pickle_with_url_and_options(remote, truth):
    url, options = remote(H5_NAME)
    streamer = pickle.loads(pickle.dumps(multitables.Streamer(url, storage_options=options)))
    reader = pickle.loads(pickle.dumps(multitables.Reader(url, 1, storage_options=options)))
    loader = pickle.loads(pickle.dumps(
        multitables.Loader(url, "label", batch_size=300, n_procs=1, storage_options=options)))
    with streamer, reader, loader:
        with streamer.get_queue("label", n_procs=1, block_size=1000) as q:
            for guard in q.iter():
                with guard as block:
                    np.testing.assert_array_equal(block, truth["label"])
        ds = reader.get_dataset("gz")
        np.testing.assert_array_equal(reader.request(ds[3:9], ds.create_stage(6)).get(),
                                      truth["gz"][3:9])
        np.testing.assert_array_equal(np.concatenate(list(loader)), truth["label"])


def test_spawned_workers_get_the_pinned_file(remote, truth):
    url, options = remote(H5_NAME)
    with multitables.Streamer(url, start_method="spawn", storage_options=options) as s:
        rows = np.array(list(s.get_generator("gz", n_procs=1, block_size=200, ordered=True)))
    np.testing.assert_array_equal(rows, truth["gz"])


def test_object_replaced_mid_read_raises_in_the_caller(http, truth, local):
    url = http.url(H5_NAME)
    with multitables.Reader(url, n_procs=1) as reader:
        ds = reader.get_dataset("x")  # pins the object's version
        stage = ds.create_stage(10)
        np.testing.assert_array_equal(reader.request(ds[:10], stage).get(), truth["x"][:10])
        with open(local, "rb") as f:
            http.replace(H5_NAME, f.read())  # the same bytes, a new version (ETag)
        with pytest.raises(ObjectChangedError, match=H5_NAME):
            reader.request(ds[500:510], stage).get()


def test_reader_read_sorted_and_where_over_a_url(http):
    """PyTables' sorted reads and conditions over a URL: the index check reads the file's
    metadata through the block cache, the rows come as from the local file."""
    tables = pytest.importorskip("tables")
    rng = np.random.default_rng(4)
    rows = np.zeros(500, [("score", "f8"), ("vec", "i4", (3,))])
    rows["score"] = rng.permutation(500) / 7
    rows["vec"] = rng.integers(0, 99, (500, 3))
    with tables.open_file(str(http.root / "indexed.h5"), "w") as f:
        table = f.create_table("/", "indexed", rows.dtype)
        table.append(rows)
        table.cols.score.create_csindex()
        f.create_table("/", "plain", rows.dtype).append(rows)
    order = np.argsort(rows["score"], kind="stable")
    with multitables.Reader(http.url("indexed.h5"), n_procs=2) as reader:
        table = reader.get_dataset("/indexed")
        stage = table.create_stage(500)
        got = reader.request(table.read_sorted("score", checkCSI=True), stage).get()
        np.testing.assert_array_equal(got, rows[order])
        got = reader.request(table.read_sorted("score", field="vec", start=5, stop=50, step=4),
                             stage).get()
        np.testing.assert_array_equal(got, rows["vec"][order[5:50:4]])
        got = reader.request(table.where("score > 30"), stage).get()
        np.testing.assert_array_equal(got, rows[rows["score"] > 30])
        with pytest.raises(ValueError, match="must have associated a 'full' index"):
            reader.get_dataset("/plain").read_sorted("score", checkCSI=True)
