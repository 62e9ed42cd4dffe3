"""The diffusers round trip: diffusers' own DDPMPipeline.from_pretrained loads every pixel-DDPM folder facelab ships
(the zoo), writes (a training export) or converts (an author's checkpoint), and samples the same images as
facelab's DDPM sampler from the same seed (same noise draws: the start image, then one per step)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DiffusionPipeline

from facelab.diffusion import sample
from facelab.diffusion.samplers import DDPM
from facelab.models.ddpm import PixelDDPM
from facelab.models.pretrained import ZOO_DIR, load_denoiser

TINY_UNET = {"sample_size": 16, "in_channels": 3, "out_channels": 3, "layers_per_block": 1,
             "block_out_channels": [32, 32], "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": 8}
SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
             "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True}


def same_images(folder: Path, source: str, size: int, steps: int = 4) -> float:
    """Max |diffusers − facelab| over DDPMPipeline images and facelab's DDPM sampler images, in [0, 1]."""
    pipe = DDPMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                  output_type="np").images
    denoiser = load_denoiser(source)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)
    ours = sample(denoiser, denoiser.schedule, x, denoiser.schedule.timesteps(steps, spacing="leading"),
                  sampler=DDPM(spacing="leading"), generator=g, progress=False)
    return float(abs((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() - theirs).max())


def test_zoo_ddpm64_loads_in_diffusers_and_gives_facelabs_images():
    assert json.loads((ZOO_DIR / "ddpm64" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert same_images(ZOO_DIR / "ddpm64", "ddpm64", 64) < 1e-4  # measured ~2e-6


def test_every_zoo_pixel_ddpm_has_a_model_index():
    for name in ("ddpm64", "ddpm64_biased", "cyclediff64"):
        index = json.loads((ZOO_DIR / name / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline" and index["scheduler"] == ["diffusers", "DDPMScheduler"]


def test_training_export_round_trips(tmp_path):
    model = PixelDDPM(unet=TINY_UNET, scheduler=SCHEDULER)
    folder = model.export(tmp_path / "diffusers")
    assert (folder / "model_index.json").is_file()
    assert same_images(folder, str(folder), 16) < 1e-4


def test_converted_learned_sigma_model_round_trips(tmp_path):
    """A converted guided-diffusion model with learn_sigma: diffusers' learned_range steps = facelab's."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_convert import TINY, original

    from facelab.convert import convert_file

    path = tmp_path / "gd.pt"
    torch.save(original(TINY).state_dict(), path)
    folder = convert_file(path, tmp_path / "converted", config={**TINY, "diffusion_steps": 1000})
    assert same_images(folder, str(folder), 32) < 1e-4


def test_attribute_conditional_zoo_model_round_trips():
    """model_index.json names facelab's AttributeUNet2DModel (its attribute embedding kept; no class labels: the null
    label, as facelab samples), which diffusers finds once facelab.models.pretrained is imported."""
    index = json.loads((ZOO_DIR / "cyclediff64" / "model_index.json").read_text())
    assert index["unet"] == ["facelab.models.pretrained", "AttributeUNet2DModel"]
    assert same_images(ZOO_DIR / "cyclediff64", "cyclediff64", 64) < 1e-4  # measured ~3e-6
    assert DiffusionPipeline.from_pretrained(ZOO_DIR / "cyclediff64").unet.class_embedding.attributes[0] == "Male"
