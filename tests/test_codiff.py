"""Collaborative Diffusion: the combination rule, the dynamic diffusers, export/loading and method=codiff / ldm."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image

from conftest import ROOT, compose, run_cli
from facelab.diffusion import Schedule
from facelab.diffusion.collab import CollaborativeDenoiser, Influence, Reweight, influence, mix
from facelab.io.errors import InputError
from facelab.io.images import read_mask, resize_mask, save_mask
from facelab.models.codiff import DynamicDiffusers, build_diffuser, check_shared_space, load_collaborative
from facelab.models.components.conditions import MaskEncoder, TextEncoder
from facelab.models.latent import LatentModel
from facelab.sample import run_sample

SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195,
                 clip_sample=False, steps_offset=1)
TINY_DIFFUSER = dict(layers_per_block=1, block_out_channels=[16, 32], norm_num_groups=8,
                     down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                     up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])
CAPTION = "This man is smiling. He has black hair."


def tiny_vae(sample_size: int = 16, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=sample_size, block_out_channels=(8, 16), latent_channels=3, norm_num_groups=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, scaling_factor=0.7).eval()


def tiny_latent_model(modality: str, vae: AutoencoderKL, seed: int, max_length: int = 12) -> LatentModel:
    """A random latent model (16 px: latents 3×8×8) with a mask or from-scratch text encoder (of `max_length`
    tokens)."""
    torch.manual_seed(seed)
    encoder = MaskEncoder(mask_size=8, dim=16) if modality == "mask" else TextEncoder(16, depth=1, heads=2,
                                                                                      max_length=max_length)
    unet = UNet2DConditionModel(sample_size=vae.config.sample_size // 2, in_channels=3, out_channels=3,
                                layers_per_block=1, block_out_channels=(16, 32), cross_attention_dim=16,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                                norm_num_groups=8)
    return LatentModel(vae, unet, Schedule(SCHEDULER), encoder, source=modality)


def export_stages(root, max_length: int = 12) -> dict:
    """Exported tiny mask and text latent models on one VAE, and a codiff export over them, under root."""
    vae = tiny_vae()
    folders = {m: tiny_latent_model(m, vae, seed, max_length).save(root / f"ldm_{m}")
               for seed, m in enumerate(("mask", "text"))}
    module = DynamicDiffusers({m: str(f) for m, f in folders.items()}, TINY_DIFFUSER)
    with torch.no_grad():  # non-trivial influence: D_m's zero last conv made random
        for unet in module.ema.module.values():
            torch.nn.init.normal_(unet.conv_out.weight, std=0.3)
    module.export(root / "codiff")
    return {**folders, "codiff": root / "codiff", "root": root}


def random_collaboration(modalities, reweight: str, names=None) -> tuple[CollaborativeDenoiser, list]:
    """A collaboration of tiny latent models (one VAE) whose diffusers' zero last convs were made random."""
    vae = tiny_vae()
    models = [tiny_latent_model(m, vae, seed) for seed, m in enumerate(modalities)]
    diffusers = [build_diffuser(TINY_DIFFUSER, model, head_dim=16) for model in models]
    for unet in diffusers:
        torch.nn.init.normal_(unet.conv_out.weight, std=0.3)
    return CollaborativeDenoiser(models, diffusers, names=names, reweight=Reweight(reweight)), models


@pytest.fixture(scope="session")
def stages(tmp_path_factory):
    return export_stages(tmp_path_factory.mktemp("codiff_stages"))


def faces(n: int = 2):
    masks = torch.zeros(n, 16, 16, dtype=torch.long)
    masks[:, 3:13, 4:12] = 1
    masks[:, 6:8, 5:7] = 4
    masks[:, 2, 2] = 15  # an earring the encoder's 8×8 nearest resize misses
    return masks, [CAPTION] * n


# --- the combination rule -------------------------------------------------------------------------------------------
def test_paper_reweight_matches_closed_form():
    learned = torch.full((3, 2, 1, 2, 2), 0.5)  # m = I_mask = 0.5
    t = torch.tensor([999, 500, 250])
    w = Reweight("paper")(learned, t, [True, False])
    assert torch.allclose(w[:, 0, 0, 0, 0], torch.tensor([0.667, 0.40, 0.14]), atol=0.004)
    m = torch.rand(4, 1, 1, 3, 3)
    t = torch.randint(0, 1000, (4,))
    s = (torch.cos((1 - t / 1000) * math.pi) + 1) / 2
    w = Reweight("paper")(torch.cat([m, 1 - m], 1), t, [True, False])
    sm = s.view(-1, 1, 1, 1) * m[:, 0]
    assert torch.allclose(w[:, 0], 2 * sm / (1 + sm), atol=1e-6)
    assert torch.allclose(w[:, 1], (1 - sm) / (1 + sm), atol=1e-6)
    # linear decay s = t/T; none with a = 1 keeps the learned weights; softmax_twice; average
    w = Reweight("paper", seg_mask_schedule="linear_decay")(torch.cat([m, 1 - m], 1), t, [True, False])
    sm = (t / 1000).view(-1, 1, 1, 1) * m[:, 0]
    assert torch.allclose(w[:, 0], 2 * sm / (1 + sm), atol=1e-6)
    kept = torch.cat([m, 1 - m], 1)
    assert torch.allclose(Reweight("paper", 1.0, "none")(kept, t, [True, False]), kept, atol=1e-6)
    twice = Reweight("paper", softmax_twice=True, boost_factor=3.0)
    assert torch.allclose(twice(kept, t, [True, False]), (3 * Reweight("paper")(kept, t, [True, False])).softmax(1))
    assert torch.equal(Reweight("average")(kept, t, [True, False]), torch.full_like(kept, 0.5))
    assert Reweight("learned")(kept, t, [True, False]) is kept


def test_paper_reweight_three_modalities_and_manual_prob():
    learned = torch.rand(2, 3, 1, 4, 4).softmax(1)  # mask, text, sketch
    t = torch.tensor([900, 100])
    s = ((torch.cos((1 - t / 1000) * math.pi) + 1) / 2).view(-1, 1, 1, 1)
    mask, text, sketch = learned.unbind(1)
    raw = [2 * s * mask, 1 - s * (mask + sketch), 2 * s * sketch]
    expected = torch.stack([r / sum(raw) for r in raw], 1)
    assert torch.allclose(Reweight("paper")(learned, t, [True, False, True]), expected, atol=1e-6)
    never = Reweight("paper", manual_prob=0.0)
    assert never(learned, t, [True, False, True], generator=torch.Generator().manual_seed(0)) is learned
    with pytest.raises(ValueError, match="generator"):
        Reweight("paper", manual_prob=0.5)(learned, t, [True, False, True])
    with pytest.raises(InputError, match="collab.reweight=mean"):
        Reweight.from_options({"reweight": "mean"})


def test_influence_softmax_and_mix():
    logits = [torch.randn(2, 1, 4, 4) for _ in range(3)]
    weights = influence(logits)
    assert weights.shape == (2, 3, 1, 4, 4) and torch.allclose(weights.sum(1), torch.ones(2, 1, 4, 4))
    assert torch.allclose(influence([torch.zeros(2, 1, 4, 4)] * 3), torch.full((2, 3, 1, 4, 4), 1 / 3))
    eps = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    by_hand = sum(weights[:, m] * eps[m] for m in range(3))
    assert torch.allclose(mix(eps, weights), by_hand, atol=1e-6)


# --- the collaborative denoiser ---------------------------------------------------------------------------------------
def test_one_modality_equals_the_unimodal_model_and_cfg():
    model = tiny_latent_model("mask", tiny_vae(), 0)
    masks, _ = faces()
    cond = model.condition(masks)
    z, t = torch.randn(2, 3, 8, 8), torch.tensor([700, 20])
    with torch.no_grad():
        assert torch.equal(CollaborativeDenoiser([model])(z, t, [cond]), model.denoiser(z, t, cond))
        guided = CollaborativeDenoiser([model], cfg_scale=3.0)
        null = model.condition(None, batch_size=2)
        e, e0 = model.denoiser(z, t, cond), model.denoiser(z, t, null)
        assert torch.allclose(guided(z, t, [cond]), e0 + 3 * (e - e0), atol=1e-5)
    assert guided.calls == {"models": 1}  # the null rows ride in the same forward


def test_three_modalities_batch_calls_and_records():
    collab, models = random_collaboration(("mask", "text", "mask"), "paper", names=["mask", "text", "sketch"])
    collab.record = True
    masks, captions = faces()
    cond = [models[0].condition(masks), models[1].condition(captions), models[2].condition(masks)]
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eps = collab(z, 500, cond)
        parts = [m.denoiser(z, torch.tensor([500, 500]), c) for m, c in zip(models, cond)]
    record = collab.records[0]
    assert eps.shape == z.shape and collab.calls == {"models": 3, "diffusers": 3}
    assert record["learned"].shape == record["weights"].shape == (2, 3, 8, 8)
    assert torch.allclose(record["weights"].sum(1), torch.ones(2, 8, 8), atol=1e-5)
    assert torch.allclose(eps, mix(parts, record["weights"][:, :, None]), atol=1e-5)
    with torch.no_grad():
        collab(z, 200, cond)
    taken = collab.take_influence()  # the run's records stacked per step: [B, steps, M, h, w]
    assert taken.t == [500, 200] and taken.weights.shape == (2, 2, 3, 8, 8) and collab.records == []
    assert torch.equal(taken.weights[:, 0], record["weights"]) and collab.take_influence() is None
    both = Influence.cat([taken, taken])
    means = both.means(["mask", "text", "sketch"], masks[0])
    face = resize_mask(masks[0], (8, 8)) != 0  # the face at latent resolution
    assert means["region"] == "face" and len(means["weights"]["text"]) == 2
    assert math.isclose(means["learned"]["text"][1], float(taken.learned[:, 1, 1][:, face].mean()), abs_tol=1e-4)
    tiles, t = taken.tiles(columns=10)
    assert tiles.shape == (2 * 3 * 2, 1, 8, 8) and t == [500, 200]


def test_influence_every_k_steps_reuses_the_last_maps_within_a_run():
    """k = 3: the diffusers run at calls 1 and 4 of a descending run; the calls between mix with the I of the last
    computed call (checked against the mix of direct ε with those weights); a new run (t back up) recomputes."""
    collab, models = random_collaboration(("mask", "text"), "learned")
    collab.influence_every, collab.record = 3, True
    masks, captions = faces()
    cond = [models[0].condition(masks), models[1].condition(captions)]
    z = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        eps = [collab(z, t, cond) for t in (900, 700, 500, 300, 900)]
        direct = [m.denoiser(z, torch.tensor([500, 500]), c) for m, c in zip(models, cond)]
    learned = [r["learned"] for r in collab.records]
    assert collab.calls == {"models": 10, "diffusers": 6}  # computed at 900, 300 and the new run's 900
    assert torch.equal(learned[1], learned[0]) and torch.equal(learned[2], learned[0])
    assert not torch.allclose(learned[3], learned[0]) and torch.equal(learned[4], learned[0])
    assert torch.allclose(eps[2], mix(direct, learned[0][:, :, None]), atol=1e-5)
    collab.influence_every = 1  # every call again: the maps at t = 500 are the diffusers' own
    with torch.no_grad():
        collab(z, 500, cond)
    assert not torch.allclose(collab.records[-1]["learned"], learned[0])


# --- the dynamic diffusers ------------------------------------------------------------------------------------------
def test_zero_init_and_training_updates_only_the_diffusers(stages):
    module = DynamicDiffusers({m: str(stages[m]) for m in ("mask", "text")}, TINY_DIFFUSER, lr=1e-3)
    masks, captions = faces()
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "mask": masks, "caption": captions}
    collab = module.collaborative(ema=False)
    assert torch.equal(collab.learned_influence(torch.randn(2, 3, 8, 8), torch.tensor([5, 900]),
                                                module.conditions(batch)), torch.full((2, 2, 1, 8, 8), 0.5))
    frozen = {k: v.clone() for k, v in module.experts.state_dict().items()}
    trained = {k: v.clone() for k, v in module.diffusers.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    module.train()
    assert not any(m.training for m in module.experts.modules())
    module.loss(collab, batch, torch.Generator().manual_seed(0)).backward()
    optimizer.step()
    assert all(torch.equal(v, frozen[k]) for k, v in module.experts.state_dict().items())
    assert all(p.grad is None for p in module.experts.parameters())
    assert any(not torch.equal(v, trained[k]) for k, v in module.diffusers.state_dict().items())


def test_export_round_trip(stages):
    collab = load_collaborative(stages["codiff"], reweight=Reweight("learned"))
    manifest = json.loads((stages["codiff"] / "codiff.json").read_text())
    assert [e["name"] for e in manifest["modalities"]] == ["mask", "text"] == collab.names
    assert manifest["reweight"]["reweight"] == "paper"
    masks, captions = faces()
    with torch.no_grad():
        learned = collab.learned_influence(torch.randn(2, 3, 8, 8), torch.tensor([3, 800]),
                                           collab.conditions([masks[0], CAPTION], 2))
    assert not torch.allclose(learned, torch.full_like(learned, 0.5))  # the exported (randomised) D_m were loaded


# --- bad input ------------------------------------------------------------------------------------------------------
def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_incompatible_or_missing_models(stages, tmp_path):
    mask = tiny_latent_model("mask", tiny_vae(), 0)
    with pytest.raises(InputError) as err:
        check_shared_space({"mask": mask, "text": tiny_latent_model("text", tiny_vae(seed=1), 1)})
    assert "different autoencoders" in one_line(err)
    same_weights = tiny_vae(sample_size=32)  # same weights (fingerprint), other latent shape
    with pytest.raises(InputError) as err:
        check_shared_space({"mask": mask, "text": tiny_latent_model("text", same_weights, 1)})
    assert "latent shapes" in one_line(err)
    broken = tmp_path / "codiff"
    shutil.copytree(stages["codiff"], broken)
    manifest = json.loads((broken / "codiff.json").read_text())
    manifest["modalities"][0]["source"] = str(tmp_path / "no_such_ldm")
    (broken / "codiff.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError) as err:
        load_collaborative(broken)
    assert "stage ldm_mask" in one_line(err) and "python -m facelab.train +experiment=ldm_mask" in one_line(err)
    manifest["modalities"][0]["source"] = str(stages["mask"])
    manifest["modalities"][1]["fingerprint"] = "0" * 64
    (broken / "codiff.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError) as err:
        load_collaborative(broken)
    assert "not the model these dynamic diffusers were trained with" in one_line(err)
    with pytest.raises(InputError) as err:
        load_collaborative("codiff_not_built")
    assert "+experiment=codiff_mask_text" in one_line(err)


def test_bad_inputs(stages, tmp_path):
    labels = np.zeros((16, 16), np.uint8)
    labels[4:8, 4:8] = 19
    Image.fromarray(labels).save(tmp_path / "m19.png")
    rgb = np.full((16, 16, 3), (120, 60, 200), np.uint8)  # no palette colour
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    with pytest.raises(InputError) as err:
        read_mask(tmp_path / "rgb.png")
    assert "not a CelebAMask-HQ label map" in one_line(err)
    np.save(tmp_path / "x_T.npy", np.zeros((2, 3, 4, 4), np.float32))  # the latents are 3×8×8
    base = [f"model.pretrained={stages['codiff']}", "method=codiff", "sampler.steps=2", "num_samples=1",
            "batch_size=1", "progress=false"]
    for i, (extra, expected) in enumerate((
            ([f"mask={tmp_path / 'm19.png'}"], "19 classes"), (["text=' '"], "caption is empty"),
            ([f"x_T={tmp_path / 'x_T.npy'}"], "shape [2, 3, 4, 4]; the model needs [1, 3, 8, 8]"),
            (["num_samples=0"], "num_samples=0, batch_size=1: both must be at least 1"),
            (["sampler=repaint"], "sampler=repaint resamples for inpainting"),
            (["+source=synthetic"], "+source: method=codiff reads its own inputs"),
            (["+eval=[similarity]"], "+eval=[similarity]: method=codiff has no reference image"),
            (["method.influence_every=0"], "method.influence_every=0: give a whole number of steps"),
            (["+eval=[captions]"], "eval.captions.classifier=attr64_eval reads 64 px images"))):
        run = tmp_path / f"run{i}"
        with pytest.raises(InputError) as err:
            run_sample(compose("sample", base + extra + ([f"text={CAPTION}"] if i > 1 else []), run))
        assert expected in one_line(err)
        assert not (run / "samples").exists()  # refused before anything is written


# --- end to end -----------------------------------------------------------------------------------------------------
def test_train_cli_then_sample_codiff_and_ldm(stages, tmp_path):
    train = tmp_path / "train"
    res = run_cli("train", "+experiment=codiff_mask_text", f"model.models.mask={stages['mask']}",
                  f"model.models.text={stages['text']}", "model.diffuser.block_out_channels=[16,32]",
                  "model.diffuser.norm_num_groups=8", "data.dataset.size=16", "data.dataset.length=12",
                  "data.batch_size=4", "data.val_fraction=0.25", "trainer.max_steps=2", "trainer.accelerator=cpu",
                  "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.sample_grid.steps=2",
                  "callbacks.sample_grid.num_samples=2", "callbacks.sample_grid.every_n_steps=2",
                  "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
                  "trainer.enable_model_summary=false", f"hydra.run.dir={train}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (train / "samples" / "step_000002.png").is_file()
    ckpt = torch.load(train / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("experts.") for k in ckpt["state_dict"])  # frozen models reload from their sources
    from_ckpt, from_folder = (load_collaborative(s, reweight=Reweight("learned"))
                              for s in (train / "checkpoints" / "last.ckpt", train / "diffusers"))
    for a, b in zip(from_ckpt.diffusers.parameters(), from_folder.diffusers.parameters()):
        assert torch.equal(a, b)

    masks, _ = faces(1)
    save_mask(masks[0], tmp_path / "face.png", style="palette")
    out = tmp_path / "run"
    res = run_cli("sample", "method=codiff", f"model.pretrained={train / 'diffusers'}", f"mask={tmp_path / 'face.png'}",
                  f"text='{CAPTION}'", "num_samples=3", "batch_size=2", "sampler.steps=3", "save_z=true",
                  "return_influence_function=true", "display_x_inter=true", "save_mixed=true", "progress=false",
                  f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    folder = out / "samples" / "face" / "this_man_is_smiling_he_has_black_hair"
    names = {p.name for p in folder.iterdir()}
    for idx in ("000000", "000001", "000002"):
        assert {f"{idx}_{kind}.png" for kind in ("x_0", "x_inter", "pred_x0", "seg_mask_influence_function",
                                                 "text_influence_function", "z_0", "mixed")} <= names
    assert "face.png" in names
    record = np.load(folder / "influence" / "000002.npz")
    assert record["learned"].shape == record["weights"].shape == (3, 2, 8, 8)
    assert list(record["t"]) == [667, 334, 1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["network_calls"] == 3 * 4 and metrics["reweight"]["reweight"] == "paper"
    assert metrics["network_calls_by_kind"] == {"models": 6, "diffusers": 6}  # per run of a batch, counted by hooks
    assert len(metrics["influence"]["weights"]["mask"]) == 3 and metrics["influence"]["region"] == "face"
    assert metrics["warnings"] == ["mask: ear_r not visible at the 8×8 the mask encoder reads (nearest resize)"]
    html = (out / "index.html").read_text()
    assert "influence.png" in html and "grid.png" in html

    ldm = tmp_path / "ldm"
    text = ["method=ldm", f"method.models.text={stages['text']}", "num_samples=2", "sampler.steps=2", "progress=false"]
    with pytest.raises(InputError, match="5 WordPiece tokens beyond the 12"):
        run_sample(compose("sample", [*text, f"text={CAPTION} He wears a hat."], tmp_path / "long"))
    np.save(tmp_path / "x_T.npy", np.zeros((3, 8, 8), np.float32))  # one fixed start for every sample
    metrics = run_sample(compose("sample", [*text, f"text={CAPTION}", f"x_T={tmp_path / 'x_T.npy'}", "sampler.eta=0"],
                                 ldm))
    assert metrics["network_calls"] == 2 and metrics["modalities"] == ["text"] and metrics["warnings"] == []
    folder = ldm / "samples" / "none" / "this_man_is_smiling_he_has_black_hair"
    first, second = (np.asarray(Image.open(folder / f"00000{i}_x_0.png")) for i in (0, 1))
    assert np.array_equal(first, second)  # the same x_T and η = 0: the same image


def test_zoo_codiff_runs_offline_and_the_evaluation_scores_it(tmp_path):
    """The shipped models: `method=codiff` with its defaults (the packaged mask and caption), then a tiny evaluation
    whose real-face ceiling shows the evaluators work (the parser and classifier read the real faces near-perfectly)."""
    out = tmp_path / "run"
    res = run_cli("sample", "method=codiff", "num_samples=2", "batch_size=2", "sampler.steps=3", "progress=false",
                  "+eval=[captions,parsing]", f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["modalities"] == ["mask", "text"] and metrics["network_calls"] == 3 * 4
    scores = metrics["eval"]  # against the default caption and mask, by the held-out classifier and parser
    assert 0 <= scores["captions"]["accuracy"] <= 1 and scores["captions"]["count"] > 0
    assert 0 <= scores["parsing"]["miou"] <= 1 and 0 <= scores["parsing"]["pixel_acc"] <= 1
    assert len(list((out / metrics["outputs"]).glob("*_x_0.png"))) == 2

    res = subprocess.run([sys.executable, "experiments/codiff/evaluate.py", "--faces", "4", "--steps", "2",
                          "--batch-size", "4", "--out", str(tmp_path / "eval")], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    ceiling = results["runs"]["real faces (ceiling)"]
    assert ceiling["pixel_acc"] > 0.95 and ceiling["caption_acc"] > 0.9
    assert set(results["runs"]) == {"real faces (ceiling)", "mask-only", "text-only", "codiff, learned",
                                    "codiff, paper (default)", "average of the two ε"}
    assert len(results["learned_mask_influence_in_face"]["I_mask"]) == 2
    assert (tmp_path / "eval" / "figures" / "samples.png").is_file()
