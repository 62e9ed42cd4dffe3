"""Every method runs to its end on a 256 px model (the google/ddpm-celebahq-256 size), with the 64 px helper models
(evaluators, parser, classifiers) either resized for or refused before sampling, with the option that fixes it."""
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from conftest import TINY_UNET, compose
from facelab.io.errors import InputError
from facelab.sample import run_sample

BASE = ["sampler.steps=2", "num_samples=2", "batch_size=2", "device=cpu", "progress=false"]


@pytest.fixture(scope="module")
def model256(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny256")
    torch.manual_seed(0)
    UNet2DModel(**{**TINY_UNET, "sample_size": 256}).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("method", [["method=generate"], ["method=fuzzy"], ["method=fuzzy", "self_degrade=true"],
                                    pytest.param(["method=directions", "discover=pca"], marks=pytest.mark.slow),
                                    ["method=hextract"]])
def test_methods_finish_at_256_px(model256, tmp_path, method):
    from PIL import Image

    out = tmp_path / "run"
    metrics = run_sample(compose("sample", [f"model.pretrained={model256}", *BASE, *method], out))
    assert metrics and (out / "metrics.json").is_file()
    if "method=hextract" in method:  # its outputs are h-space shards
        assert list((out / "hspace").glob("*.safetensors"))
        return
    images = sorted(p for p in out.rglob("*.png") if "grid" not in p.name and "inputs" not in p.parts)
    assert images and all(Image.open(p).size == (256, 256) for p in images[:4]), images[:4]


@pytest.mark.parametrize("method, says", [
    (["method=debias"], "h-classifier .* not found"),
    (["method=cyclediff"], "is not attribute-conditional"),
    (["method=fuzzy", "mode=zscore"], "needs zscore_path=FILE"),
])
def test_what_a_256_px_model_lacks_is_named_before_sampling(model256, tmp_path, method, says):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=says):
        run_sample(compose("sample", [f"model.pretrained={model256}", *BASE, *method], out))
    assert not list(out.rglob("*.png"))
