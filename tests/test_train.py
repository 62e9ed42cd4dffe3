import json
import time

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_TRAIN, compose
from facelab.io.checkpoints import load_checkpoint
from facelab.models.pretrained import load_denoiser
from facelab.train import run_train


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_ddpm_experiment_composes(logger, tmp_path):
    cfg = compose("train", ["+experiment=ddpm_synthetic", f"logger={logger}"], tmp_path)
    assert cfg.model._target_ == "facelab.models.ddpm.PixelDDPM"
    assert cfg.model.unet.sample_size == cfg.data.dataset.size == 64
    OmegaConf.to_container(cfg.model, resolve=True)


def test_train_checkpoint_export_grid_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    cfg = compose("train", ["+experiment=ddpm_synthetic", "trainer.max_steps=2", *TINY_TRAIN], out)
    metrics = run_train(cfg)
    assert "train/loss" in metrics and (out / "metrics.json").is_file()
    last = out / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(last)  # our own checkpoints load with weights_only=True
    assert ckpt["global_step"] == 2
    assert (out / "samples" / "step_000002.png").is_file()
    assert len(list((out / "csv").glob("*/metrics.csv"))) == 1
    # the exported diffusers folder and the checkpoint give the same EMA denoiser
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    a, b = load_denoiser(str(out / "diffusers")), load_denoiser(str(last))
    assert torch.allclose(a(x, t), b(x, t), atol=1e-6)

    out2 = tmp_path / "resumed"
    cfg2 = compose("train", ["+experiment=ddpm_synthetic", "trainer.max_steps=4", f"ckpt_path={last}",
                             *TINY_TRAIN], out2)
    run_train(cfg2)
    resumed = load_checkpoint(out2 / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 4
    assert int(resumed["state_dict"]["ema.updates"]) == 4  # EMA state continued, not restarted
    assert json.loads((out2 / "metrics.json").read_text())


def test_missing_resume_checkpoint_is_clear(tmp_path):
    from facelab.io.errors import InputError

    cfg = compose("train", ["+experiment=ddpm_synthetic", f"ckpt_path={tmp_path / 'none.ckpt'}", *TINY_TRAIN],
                  tmp_path / "run")
    with pytest.raises(InputError, match="none.ckpt"):
        run_train(cfg)


@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_other_loggers_write_their_runs(logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account, no network
    out = tmp_path / "run"
    cfg = compose("train", ["+experiment=ddpm_synthetic", "trainer.max_steps=2", f"logger={logger}", *TINY_TRAIN],
                  out)
    run_train(cfg)
    if logger == "wandb":
        runs = list((out / "wandb").glob("offline-run-*"))
        deadline = time.time() + 20  # wandb's service process flushes the offline log after finish() returns
        while time.time() < deadline:
            records = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
            if b"ddpm_synthetic" in records and b"val/loss" in records:  # resolved config and metrics
                break
            time.sleep(0.5)
        assert b"ddpm_synthetic" in records and b"val/loss" in records
    else:
        assert list((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_init_from_starts_fine_tuning_at_the_given_weights(tiny_model_dir):
    from conftest import TINY_UNET
    from facelab.models.ddpm import PixelDDPM

    model = PixelDDPM(unet=TINY_UNET, scheduler={"num_train_timesteps": 1000}, init_from=str(tiny_model_dir))
    source = load_denoiser(str(tiny_model_dir)).unet.state_dict()
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, source[name])
        torch.testing.assert_close(model.ema.module.state_dict()[name], source[name])


def test_bad_input_inside_a_config_built_dataset_is_one_line(tmp_path):
    from conftest import run_cli

    result = run_cli("train", "data=class_folders", f"paths.data_dir={tmp_path / 'none'}", "trainer.max_steps=1",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "class folder root not found" in result.stderr
    assert "Traceback" not in result.stderr and "InstantiationException" not in result.stderr


def test_zoo_names_are_the_pixel_ddpms():
    """Latent models (a unet/ beside a vae/) are not pixel DDPMs: load_denoiser refuses them by name clearly."""
    from facelab.io.errors import InputError
    from facelab.models.pretrained import zoo_names

    assert {"ddpm64", "ddpm64_biased", "cyclediff64"} <= set(zoo_names())
    assert not {"ldm_mask64", "ldm_text64", "vae64"} & set(zoo_names())
    with pytest.raises(InputError, match="model.pretrained=ldm_mask64: not a zoo model"):
        load_denoiser("ldm_mask64")
