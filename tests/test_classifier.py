import json

import pytest
import torch

from conftest import run_cli
from facelab.io.errors import InputError
from facelab.models.classifier import AttributeNet, load_classifier

TINY_CLF = ["data.dataset.size=32", "data.dataset.length=48", "data.batch_size=8", "data.val_fraction=0.25",
            "model.channels=[8,16]", "trainer.max_steps=4", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false"]


def test_train_export_and_load_agree(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "+experiment=attr_clf", *TINY_CLF, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val/acc"] <= 1 and "val/acc/Male" in metrics
    exported, from_ckpt = load_classifier(run / "classifier"), load_classifier(run / "checkpoints" / "last.ckpt")
    assert exported.meta["data_identity"] == {"seed": 0, "start": 0, "length": 48}
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    a, b = exported.predict(x), from_ckpt.predict(x)
    assert set(a) == set(exported.attributes) | {"skin_tone"} and a["skin_tone"].shape == (3, 3)
    for name in a:
        torch.testing.assert_close(a[name], b[name])


def test_predict_is_sigmoid_and_softmax():
    torch.manual_seed(0)
    net = AttributeNet(["Male", "Smiling"], {"skin_tone": 3}, channels=(8, 16), image_size=16).eval()
    x = torch.randn(4, 3, 16, 16)
    logits, probs = net(x), net.predict(x, temperature=2.0)
    torch.testing.assert_close(probs["Male"][:, 1], torch.sigmoid(logits["Male"] / 2))
    torch.testing.assert_close(probs["skin_tone"], (logits["skin_tone"] / 2).softmax(1))
    torch.testing.assert_close(probs["Smiling"].sum(1), torch.ones(4))


def test_bad_inputs_are_clear():
    net = AttributeNet(["Male"], channels=(8, 16), image_size=16)
    with pytest.raises(InputError, match="reads 16 px"):
        net(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="noise-aware"):
        AttributeNet(["Male"], channels=(8, 16), image_size=16, noise_aware=True)(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="not a zoo classifier"):
        load_classifier("no_such_classifier")


def test_unknown_attribute_fails_before_training(tmp_path):
    result = run_cli("train", "+experiment=attr_clf", *TINY_CLF, "model.attributes=[Male,Laughing]",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "Laughing" in result.stderr
    assert "Traceback" not in result.stderr


def test_noise_aware_training_runs(tmp_path):
    run = tmp_path / "run"
    result = run_cli("train", "+experiment=attr_clf", *TINY_CLF, "model.noise_aware=true",
                     "model.scheduler={num_train_timesteps:1000,beta_schedule:linear}", f"hydra.run.dir={run}",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    net = load_classifier(run / "classifier")
    assert net.noise_aware and net.predict(torch.zeros(2, 3, 32, 32), t=torch.tensor([10, 900]))["Male"].shape == (2, 2)
