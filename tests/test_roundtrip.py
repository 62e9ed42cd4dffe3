"""The diffusers round trip: diffusers' own DDPMPipeline.from_pretrained loads every pixel-DDPM folder facelab ships
(the zoo), writes (a training export) or converts (an author's checkpoint), and samples the same images as
facelab's DDPM sampler from the same seed (same noise draws: the start image, then one per step).

The latent folders (an autoencoder, a latent model, a Collaborative Diffusion export) load through the facelab
pipeline class their model_index.json names (facelab.pipelines; diffusers' DiffusionPipeline.from_pretrained resolves
only its own classes), and sample, with diffusers' DDIMScheduler, the images of facelab's sampler (method=ldm /
method=codiff: DDIM η = 1 on the LDM grid) from the same generator."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, DDPMPipeline, DiffusionPipeline
from test_codiff import TINY_DIFFUSER, tiny_latent_model, tiny_vae

from facelab.diffusion import DDIM, sample
from facelab.diffusion.collab import CollaborativeDenoiser, Reweight
from facelab.diffusion.samplers import DDPM
from facelab.io.errors import InputError
from facelab.io.images import read_mask
from facelab.models.codiff import DynamicDiffusers, ldm_timesteps, load_collaborative
from facelab.models.ddpm import PixelDDPM
from facelab.models.latent import load_latent_model
from facelab.models.pretrained import ZOO_DIR, load_denoiser
from facelab.models.vae import VAE, load_vae, vae_config
from facelab.pipelines import (
    FacelabAutoencoderPipeline,
    FacelabCollaborativePipeline,
    FacelabLatentPipeline,
    model_index,
    pipeline_for,
)

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


# --- latent folders: facelab.pipelines ----------------------------------------------------------------------------
ASSETS = Path(__file__).resolve().parents[1] / "facelab" / "assets" / "codiff"
CAPTION = "This man has a beard of medium length."


def face_mask(size: int) -> torch.Tensor:
    """The shipped default face's label map at `size`."""
    return read_mask(ASSETS / "900001.png", size)


def facelab_images(collab: CollaborativeDenoiser, values: list, n: int, steps: int) -> torch.Tensor:
    """facelab's sampler (method=ldm / codiff): start latents then one noise draw per step from one generator, DDIM
    η = 1 on the LDM grid down to ᾱ_0, decoded; in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, *collab.models[0].latent_shape, generator=g)
    z = sample(collab, collab.schedule, z, ldm_timesteps(collab.schedule, steps), sampler=DDIM(eta=1.0), final=0,
               cond=collab.conditions(values, n), generator=g, progress=False)
    return (collab.decode(z) / 2 + 0.5).clamp(0, 1)


def pipeline_images(pipe, condition, n: int, steps: int, **options) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(condition, batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="pt", **options).images


def same_latent_images(folder: Path, value, n: int = 1, steps: int = 2, cfg_scale: float = 1.0) -> float:
    """Max |diffusers − facelab| of a latent model folder under one condition value (one model alone: M = 1)."""
    pipe = FacelabLatentPipeline.from_pretrained(folder)
    collab = CollaborativeDenoiser([load_latent_model(folder)], reweight=Reweight("average"), cfg_scale=cfg_scale)
    ours = facelab_images(collab, [value], n, steps)
    return float((pipeline_images(pipe, value, n, steps, guidance_scale=cfg_scale) - ours).abs().max())


def same_collaborative_images(folder: Path, values: dict, n: int = 1, steps: int = 2) -> float:
    """Max |diffusers − facelab| of a codiff folder under {modality: value} (one left out: its null condition),
    with the reweighting the folder records."""
    pipe = FacelabCollaborativePipeline.from_pretrained(folder)
    collab = load_collaborative(folder)
    ours = facelab_images(collab, [values.get(name) for name in collab.names], n, steps)
    return float((pipeline_images(pipe, values, n, steps) - ours).abs().max())


def test_every_zoo_latent_folder_names_its_facelab_pipeline():
    """The zoo's model_index.json files are what `python -m facelab.pipelines` writes now; diffusers' own
    DiffusionPipeline refuses the class name (the documented limit: load through the class named)."""
    expected = {"vae64": "FacelabAutoencoderPipeline", "ldm_mask64": "FacelabLatentPipeline",
                "ldm_text64": "FacelabLatentPipeline", "codiff64": "FacelabCollaborativePipeline"}
    assert {p.name for p in ZOO_DIR.iterdir() if pipeline_for(p)} == set(expected)
    for name, pipeline in expected.items():
        index = json.loads((ZOO_DIR / name / "model_index.json").read_text())
        assert index["_class_name"] == pipeline
        assert {k: v for k, v in index.items() if k != "_diffusers_version"} == \
            {k: v for k, v in model_index(ZOO_DIR / name).items() if k != "_diffusers_version"}
    assert json.loads((ZOO_DIR / "ldm_mask64" / "model_index.json").read_text())["condition"] == \
        ["facelab.pipelines", "ConditionEncoder"]
    with pytest.raises(AttributeError, match="FacelabAutoencoderPipeline"):
        DiffusionPipeline.from_pretrained(ZOO_DIR / "vae64")


def test_zoo_mask_model_round_trips_with_guidance():
    assert same_latent_images(ZOO_DIR / "ldm_mask64", face_mask(64), n=2, cfg_scale=2.0) < 1e-4


def test_zoo_text_model_round_trips():
    """The frozen MiniLM text encoder: its weights reload from its package in both loaders."""
    assert same_latent_images(ZOO_DIR / "ldm_text64", CAPTION) < 1e-4


def test_zoo_codiff_round_trips():
    assert same_collaborative_images(ZOO_DIR / "codiff64", {"mask": face_mask(64), "text": CAPTION}) < 1e-4


def test_zoo_autoencoder_round_trips():
    """vae64 reconstructs as facelab's latent models encode and decode (ldm_mask64 holds the same autoencoder)."""
    pipe = FacelabAutoencoderPipeline.from_pretrained(ZOO_DIR / "vae64")
    assert AutoencoderKL.from_pretrained(ZOO_DIR / "vae64", subfolder="vae").config.scaling_factor == \
        load_vae("vae64").config.scaling_factor == pipe.vae.config.scaling_factor
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    model = load_latent_model("ldm_mask64")
    with torch.no_grad():
        assert float((pipe.encode(images) - model.encode(images)).abs().max()) < 1e-5
        ours = (model.decode(model.encode(images)) / 2 + 0.5).clamp(0, 1)
    assert float((pipe(images, output_type="pt").images - ours).abs().max()) < 1e-4


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Training exports at tiny sizes: VAE.export, LatentDDPM.export (LatentModel.save of its EMA model) of a mask
    and a text model on that autoencoder, and DynamicDiffusers.export over them (random last convs: real mixing)."""
    root = tmp_path_factory.mktemp("latent_exports")
    vae = VAE(vae_config(tiny_vae())).export(root / "vae")
    shared = load_vae(vae)
    folders = {m: tiny_latent_model(m, shared, seed).save(root / f"ldm_{m}") for seed, m in enumerate(("mask", "text"))}
    module = DynamicDiffusers({m: str(f) for m, f in folders.items()}, TINY_DIFFUSER)
    with torch.no_grad():
        for unet in module.ema.module.values():
            torch.nn.init.normal_(unet.conv_out.weight, std=0.3)
    return {"vae": vae, **folders, "codiff": module.export(root / "codiff")}


def test_training_exports_round_trip(exports):
    for name, pipeline in (("vae", "FacelabAutoencoderPipeline"), ("mask", "FacelabLatentPipeline"),
                           ("codiff", "FacelabCollaborativePipeline")):
        assert json.loads((exports[name] / "model_index.json").read_text())["_class_name"] == pipeline
    assert same_latent_images(exports["mask"], face_mask(16), n=2, steps=3) < 1e-4
    assert same_latent_images(exports["text"], CAPTION, cfg_scale=3.0) < 1e-4
    assert same_collaborative_images(exports["codiff"], {"mask": face_mask(16), "text": CAPTION}, n=2) < 1e-4
    assert same_collaborative_images(exports["codiff"], {"text": CAPTION}) < 1e-4  # the mask's null condition
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = load_latent_model(exports["mask"])
    with torch.no_grad():
        want = (ours.decode(ours.encode(images)) / 2 + 0.5).clamp(0, 1)
    got = FacelabAutoencoderPipeline.from_pretrained(exports["vae"])(images, output_type="pt").images
    assert float((got - want).abs().max()) < 1e-4


def test_converted_compvis_folders_round_trip(tmp_path):
    """A converted 512_codiff_mask_text.ckpt (its layout at tiny widths): the codiff folder and the latent models
    it holds (ldm_mask/, ldm_text/: the converted BERTEmbedder), and a converted lone autoencoder (512_vae.ckpt)."""
    from test_convert_compvis import TINY, codiff_state, tiny_nets

    from facelab.convert import convert_file

    state, _ = codiff_state()
    torch.save({"state_dict": state}, tmp_path / "codiff.ckpt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    dest = convert_file(tmp_path / "codiff.ckpt", tmp_path / "converted", config=tmp_path / "tiny.yaml")
    index = json.loads((dest / "model_index.json").read_text())
    assert index == {**model_index(dest), "_diffusers_version": index["_diffusers_version"]}
    assert index["collab"] == ["facelab.pipelines", "CollaborativeModel"]
    mask = torch.randint(0, 19, (16, 16), generator=torch.Generator().manual_seed(1))
    assert same_collaborative_images(dest, {"mask": mask, "text": "This man is smiling."}) < 1e-4
    assert same_latent_images(dest / "ldm_text", "This man is smiling.", steps=3) < 1e-4

    torch.save({"state_dict": tiny_nets(0)[2].state_dict()}, tmp_path / "vae.ckpt")
    vae_dest = convert_file(tmp_path / "vae.ckpt", tmp_path / "vae", config=tmp_path / "tiny.yaml")
    pipe = FacelabAutoencoderPipeline.from_pretrained(vae_dest)
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    vae = load_vae(vae_dest)
    with torch.no_grad():
        want = (vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1) / 2 + 0.5).clamp(0, 1)
    assert float((pipe(images, output_type="pt").images - want).abs().max()) < 1e-4


def test_pipeline_save_pretrained(exports, tmp_path):
    """A latent pipeline saved by diffusers reloads and samples alike; a collaborative one refuses, writing nothing."""
    pipe = FacelabLatentPipeline.from_pretrained(exports["text"])
    pipe.save_pretrained(tmp_path / "saved")
    again = FacelabLatentPipeline.from_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["condition"] == \
        ["facelab.pipelines", "ConditionEncoder"]
    assert torch.equal(pipeline_images(pipe, CAPTION, 1, 2), pipeline_images(again, CAPTION, 1, 2))
    with pytest.raises(InputError, match="not written"):
        FacelabCollaborativePipeline.from_pretrained(exports["codiff"]).save_pretrained(tmp_path / "collab")
    with pytest.raises(InputError, match="conditions name caption; the modalities are mask, text"):
        FacelabCollaborativePipeline.from_pretrained(exports["codiff"])({"caption": CAPTION})
    assert not (tmp_path / "collab").exists()
