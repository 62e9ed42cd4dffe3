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


def test_keep_models_loads_each_model_once_and_notices_changed_files(tiny_model_dir, tmp_path):
    import shutil

    from facelab.models.pretrained import load_denoiser

    assert load_denoiser(str(tiny_model_dir)) is not load_denoiser(str(tiny_model_dir))  # outside: fresh each time
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    with facelab.keep_models():
        first = load_denoiser(str(copy))
        assert load_denoiser(str(copy)) is first
        with facelab.keep_models():  # nested blocks share the outer one's models
            assert load_denoiser(str(copy)) is first
        config = copy / "unet" / "config.json"
        config.write_text(config.read_text() + "\n")  # the files changed: read again
        assert load_denoiser(str(copy)) is not first
        a = facelab.run("generate", num_samples=1, steps=2, device="cpu", progress=False, **{"model.pretrained": copy})
        b = facelab.run("generate", num_samples=1, steps=2, device="cpu", progress=False, **{"model.pretrained": copy})
    assert torch.equal(a.images, b.images)
    assert load_denoiser(str(copy)) is not first


def test_a_codiff_folder_reads_its_samples_not_its_mask(tmp_path):
    from facelab.api import read_run
    from facelab.io.images import save_image

    folder = tmp_path / "samples" / "mask" / "caption"
    save_image(torch.zeros(3, 64, 64), folder / "mask.png")
    for i in range(2):
        save_image(torch.full((3, 16, 16), 0.5), folder / f"{i:06d}_x_0.png")
    result = read_run(tmp_path, {})
    assert result.images.shape == (2, 3, 16, 16) and all(n.endswith("_x_0.png") for n in result.names)
