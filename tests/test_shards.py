"""Rendered-once synthetic faces (facelab.data.shards): the items read from shards are exactly the rendered ones."""
import json

import pytest
import torch

from facelab.data import synthetic
from facelab.data.shards import Shards
from facelab.data.synthetic import SyntheticFaces
from facelab.io.errors import InputError


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        for k in a)


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: a spawned pool (~10 s)
def test_shard_items_equal_rendered_items(tmp_path, workers):
    faces = SyntheticFaces(size=32, length=21, seed=3, start=7)
    shards = Shards(faces, tmp_path / "s", workers=workers, progress=False, shard_size=8)
    assert sorted(p.name for p in (tmp_path / "s").glob("*.captions.json")) == [f"0000{i}.captions.json"
                                                                              for i in range(3)]
    for index in (0, 7, 8, 20):
        assert same(faces._item(*shards.record(index), index), faces[index]), index


def test_dataset_reads_its_shards_without_rendering(tmp_path, monkeypatch):
    SyntheticFaces(size=32, length=5, seed=1, shards=str(tmp_path), workers=1)
    rendered = SyntheticFaces(size=32, length=5, seed=1)[4]
    monkeypatch.setattr(synthetic, "render", lambda *a: pytest.fail("rendered again"))
    assert same(SyntheticFaces(size=32, length=5, seed=1, shards=str(tmp_path))[4], rendered)


def test_an_interrupted_folder_renders_only_its_missing_shards(tmp_path, monkeypatch):
    faces = SyntheticFaces(size=32, length=6, seed=0)
    Shards(faces, tmp_path, workers=1, progress=False, shard_size=2)
    (tmp_path / "00001.captions.json").unlink()  # the marker of a whole shard: shard 1 counts as unwritten
    drawn = []
    original = SyntheticFaces.face
    monkeypatch.setattr(SyntheticFaces, "face", lambda self, i: drawn.append(i) or original(self, i))
    shards = Shards(faces, tmp_path, workers=1, progress=False, shard_size=2)
    assert drawn == [2, 3]
    assert same(faces._item(*shards.record(3), 3), faces.item(original(faces, 3), 3))


@pytest.mark.parametrize("other", [dict(seed=1), dict(size=48), dict(start=1), dict(length=7),
                                   dict(priors={"Smiling": 1.0})])
def test_a_folder_of_other_faces_is_refused_in_one_line(tmp_path, other):
    SyntheticFaces(size=32, length=6, shards=str(tmp_path), workers=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match="holds other faces") as err:
        SyntheticFaces(**{"size": 32, "length": 6, **other}, shards=str(tmp_path), workers=1)
    assert "\n" not in str(err.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert json.loads((tmp_path / "faces.json").read_text())["length"] == 6
