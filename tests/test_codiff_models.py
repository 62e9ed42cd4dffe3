"""The models of Collaborative Diffusion: condition encoders, the VAE with its measured latent scale, the latent DDPM
and the LatentModel runtime contract (tiny configs, 16 px faces)."""
import json

import pytest
import torch
from diffusers import AutoencoderKL
from hydra.utils import instantiate

from conftest import compose, run_cli
from facelab.io.checkpoints import load_checkpoint
from facelab.io.errors import InputError
from facelab.io.images import resize_mask
from facelab.models.components.conditions import (
    MaskEncoder,
    PretrainedTextEncoder,
    TextEncoder,
    load_condition_encoder,
    save_condition_encoder,
)
from facelab.models.latent import LatentModel, load_latent_model
from facelab.models.vae import load_vae
from facelab.train import run_train

TINY = ["data.dataset.size=16", "data.dataset.length=24", "data.batch_size=4", "data.val_fraction=0.25",
        "trainer.accelerator=cpu", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.max_steps=2"]
TINY_VAE = ["+experiment=vae", "model.vae.block_out_channels=[8,8,8]", "model.vae.norm_num_groups=4",
            "model.scale_samples=5", *TINY]  # 16 px -> 3×4×4 latents
TINY_LDM = ["model.unet.block_out_channels=[16,16]", "model.unet.down_block_types=[CrossAttnDownBlock2D,DownBlock2D]",
            "model.unet.up_block_types=[UpBlock2D,CrossAttnUpBlock2D]", "model.unet.attention_head_dim=[1,1]",
            "model.unet.norm_num_groups=4", "callbacks.sample_grid.steps=2", "callbacks.sample_grid.num_samples=2",
            "callbacks.sample_grid.every_n_steps=2", *TINY]
TINY_MASK = ["+experiment=ldm_mask", "model.condition.dim=16", "model.condition.mask_size=8", *TINY_LDM]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vae") / "run"
    res = run_cli("train", *TINY_VAE, f"hydra.run.dir={run}", cwd=run.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def ldm_run(vae_run):
    run = vae_run.parent / "ldm"
    res = run_cli("train", *TINY_MASK, f"model.vae={vae_run / 'diffusers'}", f"hydra.run.dir={run}", cwd=run.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    return run


def test_vae_measures_its_latent_scale(vae_run):
    exported = json.loads((vae_run / "diffusers" / "vae" / "config.json").read_text())["scaling_factor"]
    assert exported != pytest.approx(0.18215)
    assert load_checkpoint(vae_run / "checkpoints" / "last.ckpt")["vae_config"]["scaling_factor"] == exported
    # independently: 1/std of the posterior means of the first scale_samples validation faces
    datamodule = instantiate(compose("train", TINY_VAE, vae_run.parent / "check").data)
    datamodule.setup("fit")
    images = torch.cat([b["image"] for b in datamodule.val_dataloader()])[:5]
    vae = load_vae(vae_run / "diffusers")
    with torch.no_grad():
        assert exported == pytest.approx(1 / vae.encode(images).latent_dist.mean.std().item(), rel=1e-5)
    assert load_vae(vae_run / "checkpoints" / "last.ckpt").config.scaling_factor == exported


def test_latent_model_from_export_and_checkpoint_agree(ldm_run, vae_run):
    folder = ldm_run / "diffusers"
    assert json.loads((folder / "latent_model.json").read_text())["modality"] == "mask"
    a, b = load_latent_model(folder), load_latent_model(ldm_run / "checkpoints" / "last.ckpt")
    assert a.modality == b.modality == "mask" and a.latent_shape == (3, 4, 4)
    assert a.scale_factor == load_vae(vae_run / "diffusers").config.scaling_factor
    assert a.fingerprint() == b.fingerprint() and a.vae_fingerprint() == b.vae_fingerprint()
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    masks = [torch.randint(0, 19, (16, 16)), torch.randint(0, 19, (40, 30)), None]
    z, t = torch.randn(3, 3, 4, 4), torch.tensor([10, 500, 990])
    with torch.no_grad():
        cond = a.condition(masks)
        assert cond["encoder_hidden_states"].shape == (3, 19, 16) and cond["encoder_attention_mask"].shape == (3, 19)
        torch.testing.assert_close(a.denoiser(z, t, cond), b.denoiser(z, t, b.condition(masks)), rtol=0, atol=1e-6)
        images = a.decode(a.encode(torch.rand(2, 3, 16, 16) * 2 - 1))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert (ldm_run / "samples" / "step_000002.png").is_file()  # conditional preview grid


def test_ldm_resumes_from_last_checkpoint(ldm_run, vae_run, tmp_path):
    out = tmp_path / "resumed"
    cfg = compose("train", [*TINY_MASK, f"model.vae={vae_run / 'diffusers'}", "trainer.max_steps=4",
                            f"ckpt_path={ldm_run / 'checkpoints' / 'last.ckpt'}"], out)
    run_train(cfg)
    resumed = load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4 and int(resumed["state_dict"]["ema.updates"]) == 4


def test_text_ldm_trains_on_the_frozen_minilm(vae_run, tmp_path):
    out = tmp_path / "text"
    cfg = compose("train", ["+experiment=ldm_text", f"model.vae={vae_run / 'diffusers'}",
                            "model.condition.max_length=16", *TINY_LDM], out)
    run_train(cfg)
    model = load_latent_model(out / "diffusers")
    assert model.modality == "text" and model.unet.config.cross_attention_dim == 384
    assert not any(k.startswith("encoder.model.") for k in load_checkpoint(out / "checkpoints" / "last.ckpt")
                   ["state_dict"])  # the frozen MiniLM reloads from its package
    cond = model.condition(["This man has a beard.", None])
    assert cond["encoder_hidden_states"].shape == (2, 16, 384)
    assert cond["encoder_attention_mask"][1].sum() == 2  # the null caption "" is [CLS] [SEP]


def test_mask_encoder_matches_a_hand_computation():
    torch.manual_seed(0)
    encoder = MaskEncoder(mask_size=2, dim=5)
    labels = torch.randint(0, 19, (4, 4))
    picked = labels[[1, 3]][:, [1, 3]].reshape(-1)  # nearest at 4 -> 2 samples pixels floor((i + 0.5)·2) = 1, 3
    tokens, mask = encoder([labels, None])
    expected = torch.stack([encoder.proj.bias + encoder.proj.weight[:, picked == c].sum(1) for c in range(19)])
    torch.testing.assert_close(tokens[0], expected)
    torch.testing.assert_close(tokens[1], encoder.proj.bias.expand(19, 5))  # null: the all-zero one-hot
    assert mask.shape == (2, 19) and bool(mask.all())
    odd = torch.randint(0, 19, (37, 23))  # same sampling as the io reader's nearest resize
    big = MaskEncoder(mask_size=8)
    assert torch.equal(big.one_hot([odd])[0].argmax(0), resize_mask(odd, 8).reshape(-1))
    with pytest.raises(InputError, match="fall outside 0..18"):
        encoder([torch.full((4, 4), 19)])


def _copy_scratch_encoder(source: TextEncoder, max_length: int) -> TextEncoder:
    """The same weights with a longer position table (its extra rows random: only pads can see them)."""
    kwargs = {**source.config, "max_length": max_length}
    del kwargs["_class_name"]
    grown = TextEncoder(**kwargs)
    state = source.state_dict()
    state["pos_emb.weight"] = torch.cat([state["pos_emb.weight"], grown.pos_emb.weight[source.max_length:]])
    grown.load_state_dict(state)
    return grown.eval()


def test_text_encoders_mask_their_pad_tokens(tmp_path):
    torch.manual_seed(0)
    captions = ["She has blond hair.", "This man has a beard and is in his fifties."]
    scratch = TextEncoder(dim=16, depth=2, heads=2, max_length=16).eval()
    minilm = PretrainedTextEncoder(max_length=16)
    with torch.no_grad():
        for short, long in ((scratch, _copy_scratch_encoder(scratch, 24)), (minilm, PretrainedTextEncoder(24))):
            (a, mask_a), (b, mask_b) = short(captions), long(captions)
            assert b.shape[1] == 24 and torch.equal(mask_b[:, :16], mask_a) and not mask_b[:, 16:].any()
            real = mask_a.bool()
            torch.testing.assert_close(a[real], b[:, :16][real], rtol=0, atol=1e-5)  # pads cannot leak in
            torch.testing.assert_close(short(None, batch_size=1)[0], short([""])[0])
    assert scratch.tokens_dropped(["word " * 20, "short"]) == [6, 0]  # 20 words + [CLS] [SEP] into 16
    assert minilm.dim == 384 and not minilm.state_dict()
    save_condition_encoder(minilm, tmp_path / "minilm")
    assert isinstance(load_condition_encoder(tmp_path / "minilm"), PretrainedTextEncoder)
    save_condition_encoder(scratch, tmp_path / "scratch")
    with torch.no_grad():
        torch.testing.assert_close(load_condition_encoder(tmp_path / "scratch").eval()(captions)[0],
                                   scratch(captions)[0])


def test_bad_vae_inputs_are_clear(ldm_run, tmp_path):
    with pytest.raises(InputError, match="VAE .*missing_vae: not found"):
        load_vae(tmp_path / "missing_vae")
    res = run_cli("train", *TINY_MASK, f"model.vae={tmp_path / 'missing_vae'}", f"hydra.run.dir={tmp_path / 'r'}",
                  cwd=tmp_path)
    assert res.returncode == 2 and "missing_vae: not found" in res.stderr and "Traceback" not in res.stderr
    model = load_latent_model(ldm_run / "diffusers")
    other = AutoencoderKL(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                          up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=4,
                          sample_size=16)
    with pytest.raises(InputError, match=r"VAE latent shape 4×8×8 does not match the LDM's"):
        LatentModel(other, model.unet, model.schedule, model.encoder)
    with pytest.raises(InputError, match="not found"):
        load_latent_model(tmp_path / "nothing")
