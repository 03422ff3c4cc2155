"""A file is data, not code: pickled VLArray rows are unpickled only when the caller allows it."""

from __future__ import annotations

import pathlib
import pickle

import pytest

import multitables

pytestmark = pytest.mark.timeout(60)


class _Touch:
    """Pickles as a call that creates ``marker``: what a hostile file can hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture
def hostile(tmp_path):
    import tables

    path, marker = tmp_path / "hostile.h5", tmp_path / "marker"
    with tables.open_file(str(path), "w") as f:
        rows = f.create_vlarray("/", "objects", tables.ObjectAtom())
        rows.append({"harmless": 1})
        rows.append(_Touch(str(marker)))
        f.create_array("/", "plain", [1, 2, 3])
    assert not marker.exists()
    return str(path), marker


def test_pickled_rows_are_refused_by_default(hostile):
    path, marker = hostile
    with multitables.Reader(path, n_procs=1) as reader:
        objects = reader.get_dataset("/objects")
        stage = objects.create_stage(1000)
        for key in [slice(None), 1, [1, 0]]:
            with pytest.raises(ValueError, match=r"/objects holds pickled .*allow_pickle=True"):
                reader.request(objects[key], stage)
        # The refusal left the stage free and the Reader working.
        plain = reader.get_dataset("/plain")
        assert reader.request(plain, plain.create_stage(3)).get().tolist() == [1, 2, 3]
    assert not marker.exists()


def test_pickled_rows_are_unpickled_when_allowed(hostile):
    # The same file with the flag: the marker shows that the test above would see a load.
    path, marker = hostile
    with multitables.Reader(path, n_procs=1, allow_pickle=True) as reader:
        objects = reader.get_dataset("/objects")
        got = reader.request(objects[0], objects.create_stage(1000)).get()
        assert got == {"harmless": 1}
        assert not marker.exists()
        reader.request(objects[1], objects.create_stage(1000)).get()
    assert marker.exists()


def test_a_spec_made_elsewhere_cannot_unpickle(hostile):
    from multitables._reader.readspec import VLEN, ReadSpec

    with pytest.raises(ValueError, match="allow_pickle=True"):
        ReadSpec(VLEN, "/objects", None, None, (1,), None, pseudo_atom="object")
    # A spec sent to a worker keeps its permission.
    spec = ReadSpec(VLEN, "/objects", None, None, (1,), None, pseudo_atom="object",
                    allow_pickle=True)
    assert pickle.loads(pickle.dumps(spec)).allow_pickle
