"""The Python API: facelab.run takes the CLI's overrides as keywords, returns images, metrics and maps, and writes files
only into a given folder."""
import pytest
import torch

import facelab
from facelab.api import hydra_value, to_overrides


def test_values_become_hydra_overrides():
    assert hydra_value(None) == "null" and hydra_value(True) == "true" and hydra_value(0.07) == "0.07"
    assert hydra_value("This woman is smiling.") == "'This woman is smiling.'"
    assert hydra_value([1, "a"]) == "[1,a]" and hydra_value({"Male": 0.5}) == "{Male: 0.5}"
    assert to_overrides("fuzzy", {"mask_s": 0.07, "sampler": "dpmpp_2m", "steps": 20}) == [
        "method=fuzzy", "mask_s=0.07", "sampler=dpmpp_2m", "sampler.steps=20"]


def test_run_returns_images_in_memory_and_writes_nothing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = facelab.run("generate", num_samples=2, sampler="dpmpp_2m", steps=3, progress=False, device="cpu",
                         **{"model.pretrained": str(tiny_model_dir)})
    assert result.images.shape == (2, 3, 16, 16) and result.images.abs().max() <= 1
    assert result.metrics["sampler"] == "dpmpp_2m" and result.metrics["network_calls_per_image"] == 3
    assert len(result.pil()) == 2 and result.folder is None
    assert not list(tmp_path.iterdir())


def test_run_matches_the_cli_and_keeps_files_when_asked(tiny_model_dir, tmp_path):
    args = dict(num_samples=2, steps=3, seed=4, progress=False, device="cpu", **{"model.pretrained": str(tiny_model_dir)})
    kept = facelab.run("generate", out=tmp_path / "run", **args)
    assert (tmp_path / "run" / "metrics.json").is_file() and kept.folder == tmp_path / "run"
    again = facelab.run("generate", **args)
    assert torch.equal(kept.images, again.images)
    with pytest.raises(FileExistsError):
        facelab.run("generate", out=tmp_path / "run", **args)


def test_fuzzy_maps_come_back(tmp_path):
    result = facelab.run("fuzzy", mode="zscore", self_degrade=True, num_samples=1, steps=3, progress=False,
                         device="cpu")
    assert result.images.shape[0] == 1
    assert any(name.endswith("/m") for name in result.maps)
