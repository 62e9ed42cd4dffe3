"""The h-classifier: heads keyed by t, the t-conditioned head, training on h-space shards with per-t accuracy,
export and safe loading."""

import json
import pickle

import pytest
import pytorch_lightning as pl
import torch

from facelab.data.datamodule import FaceDataModule
from facelab.data.hspace import FORMAT, HSpaceDataset, ShardWriter
from facelab.io.errors import InputError
from facelab.models.hclassifier import HClassifier, HNet, load_hclassifier, save_hclassifier

GRID = [900, 500, 100]
H_SHAPE = [4, 2, 2]


def toy_shards(folder, n=48, seed=0):
    """Shards whose h carries the label along a different direction at every t (plus noise): per-t separable."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.arange(n) % 2, torch.arange(n) % 3], 1)
    directions = torch.randn(len(GRID), 16, generator=gen)
    skin = torch.randn(len(GRID), 3, 16, generator=gen)
    h = torch.randn(n, len(GRID), 16, generator=gen) * 0.3
    h += (2 * labels[:, 0, None, None] - 1) * directions + skin[:, labels[:, 1]].transpose(0, 1)
    meta = {"format": FORMAT, "model": "toy", "fingerprint": "f" * 64, "where": "after", "grid": GRID,
            "num_train_timesteps": 1000, "resolution": 16, "source": "synthetic", "sampler": {},
            "attributes": {"Male": 2, "skin_tone": 3}, "label_source": "toy", "inversion_eta": 0.0}
    writer = ShardWriter(folder, meta, shard_size=20, dtype=torch.float16)
    writer.add(h.reshape(n, len(GRID), *H_SHAPE), labels, [f"{i:03d}" for i in range(n)])
    writer.close()
    return folder


def fit(shards, tmp_path, **model_kwargs) -> tuple[HClassifier, pl.Trainer]:
    model = HClassifier(lr=0.05, **model_kwargs)
    data = FaceDataModule(HSpaceDataset(shards), val_fraction=0.25, batch_size=12)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=40, val_check_interval=10, check_val_every_n_epoch=None,
                         accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, datamodule=data)
    return model, trainer


def test_heads_are_keyed_by_t():
    torch.manual_seed(0)
    net = HNet({"Male": 2, "skin_tone": 3}, dim=16, times=[999, 500, 0])
    torch.nn.init.normal_(net.weight)
    torch.nn.init.normal_(net.bias)
    h = torch.randn(5, *H_SHAPE)
    for slot, t in enumerate([999, 500, 0]):
        logits = h.flatten(1) @ net.weight[slot].T + net.bias[slot]
        out = net(h, t)
        torch.testing.assert_close(torch.cat([out["Male"], out["skin_tone"]], 1), logits)
    # all times at once ([B, n, D] with times [n], in any order) agree with one time at a time
    stacked = net(torch.stack([h.flatten(1)] * 2, 1), [0, 999])["skin_tone"]
    torch.testing.assert_close(stacked[:, 0], net(h, 0)["skin_tone"])
    torch.testing.assert_close(stacked[:, 1], net(h, 999)["skin_tone"])
    probs = net.predict(h, 500, temperature=8.0)
    torch.testing.assert_close(probs["Male"], (net(h, 500)["Male"] / 8).softmax(1))
    assert net.head_time(500) == 500 and net.head_time(480) is None and net.head_time(480, "nearest") == 500
    with pytest.raises(InputError, match=r"no h-classifier head for t=\[480\]"):
        net(h, 480)


def test_conditioned_head_interpolates_linearly_in_t():
    torch.manual_seed(0)
    net = HNet({"Male": 2}, dim=16, times=GRID, kind="conditioned", anchors=4, num_train_timesteps=1000)
    torch.nn.init.normal_(net.weight)
    h = torch.randn(3, 16)
    anchor = lambda k: h @ net.weight[k].T + net.bias[k]  # noqa: E731 (anchors at 0, 333, 666, 999)
    torch.testing.assert_close(net(h, 333)["Male"], anchor(1))
    torch.testing.assert_close(net(h, 400)["Male"], anchor(1) * (1 - 67 / 333) + anchor(2) * 67 / 333)
    assert net.head_time(417) == 417  # any t, any grid


@pytest.mark.parametrize("head", ["per_t", "conditioned"])
def test_training_reaches_the_labels_and_writes_accuracy_per_t(head, tmp_path):
    shards = toy_shards(tmp_path / "hs")
    dataset = HSpaceDataset(shards)
    assert len(dataset) == 48 and len(dataset.paths) == 3 and dataset[47]["h"].shape == (3, 16)
    model, trainer = fit(shards, tmp_path / "run", head=head)
    assert set(model.accuracy) == {"Male", "skin_tone"} and list(model.accuracy["Male"]) == GRID
    assert min(model.accuracy["Male"].values()) == 1.0 and min(model.accuracy["skin_tone"].values()) >= 0.75
    lines = (tmp_path / "run" / "hclf_accuracy.csv").read_text().splitlines()
    assert lines[0] == "t,Male,skin_tone" and [line.split(",")[0] for line in lines[1:]] == ["100", "500", "900"]
    assert (tmp_path / "run" / "hclf_accuracy.png").stat().st_size > 0
    assert trainer.callback_metrics["val/acc/Male/t0500"] == 1.0

    exported = load_hclassifier(model.export(tmp_path / "run" / "hclf"))
    from_ckpt = load_hclassifier(next((tmp_path / "run" / "checkpoints").glob("*.ckpt")))
    assert (tmp_path / "run" / "hclf" / "hclf_accuracy.csv").is_file()
    assert exported.meta["grid"] == GRID and exported.meta["fingerprint"] == "f" * 64 and exported.kind == head
    h = torch.randn(4, *H_SHAPE)
    for t in GRID:
        for name, probs in exported.predict(h, t).items():
            torch.testing.assert_close(probs, from_ckpt.predict(h, t)[name])
            torch.testing.assert_close(probs, model.net.predict(h, t)[name])


def test_class_mean_heads_point_along_the_class_mean_difference(tmp_path):
    """direction=class_means: at every t the exported Male direction w_male − w_female is parallel to the difference
    of the training rows' class means (computed here from the rows), the heads still classify, and the checkpoint
    reads back the same heads."""
    shards = toy_shards(tmp_path / "hs")
    model, trainer = fit(shards, tmp_path / "run", direction="class_means")
    assert min(model.accuracy["Male"].values()) == 1.0 and min(model.accuracy["skin_tone"].values()) >= 0.75
    rows = [HSpaceDataset(shards)[i] for i in trainer.datamodule.train_set.indices]
    h, male = torch.stack([r["h"] for r in rows]).double(), torch.stack([r["labels"][0] for r in rows])
    difference = h[male == 1].mean(0) - h[male == 0].mean(0)  # [T, D]
    exported = load_hclassifier(model.export(tmp_path / "run" / "hclf"))
    direction = (exported.weight[:, 1] - exported.weight[:, 0]).double()
    torch.testing.assert_close(torch.cosine_similarity(direction, difference, dim=1), torch.ones(len(GRID),
                                                                                                 dtype=torch.float64))
    from_ckpt = load_hclassifier(next((tmp_path / "run" / "checkpoints").glob("*.ckpt")))
    x = torch.randn(4, *H_SHAPE)
    for t in GRID:
        torch.testing.assert_close(exported.predict(x, t)["Male"], from_ckpt.predict(x, t)["Male"])
    with pytest.raises(InputError, match="needs model.head=per_t"):
        HClassifier(direction="class_means", head="conditioned")
    with pytest.raises(InputError, match="model.direction='along'"):
        HClassifier(direction="along")


def test_attribute_subset_and_unknown_attribute(tmp_path):
    shards = toy_shards(tmp_path / "hs", n=16)
    model = HClassifier(attributes=["skin_tone"])
    model.build(HSpaceDataset(shards).meta)
    assert model.net.heads == {"skin_tone": 3} and model.columns == [1]
    with pytest.raises(InputError, match="label only"):
        HClassifier(attributes=["Smiling"]).build(HSpaceDataset(shards).meta)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_loading_is_safe_and_clear(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_hclassifier(tmp_path / "nothing")
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": _Evil()}))
    with pytest.raises(InputError, match="refused to load"):
        load_hclassifier(tmp_path / "evil.ckpt")
    folder = save_hclassifier(HNet({"Male": 2}, 16, GRID), tmp_path / "model" / "hclf")
    assert load_hclassifier(tmp_path / "model").times == GRID  # a model folder holding hclf/
    (folder / "config.json").write_text('{"_class_name": "AttributeNet"}')
    with pytest.raises(InputError, match="not an h-classifier"):
        load_hclassifier(folder)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "shard.safetensors").write_bytes(b"junk")
    with pytest.raises(InputError, match="not a safetensors"):
        len(HSpaceDataset(tmp_path / "junk"))  # folders are read on first use
    with pytest.raises(InputError, match="no h-space shards"):
        HSpaceDataset(tmp_path / "nothing").meta


def test_missing_shards_fail_the_training_run_clearly(tmp_path):
    from conftest import compose
    from facelab.train import run_train

    cfg = compose("train", ["+experiment=hclf_gender", f"data.dataset.path={tmp_path / 'none'}",
                            "trainer.accelerator=cpu", "logger=none", "trainer.enable_progress_bar=false"],
                  tmp_path / "run")
    with pytest.raises(InputError, match="no h-space shards .* method=hextract"):
        run_train(cfg)


def test_trains_from_the_cli_config_without_a_logger(tmp_path):
    """+experiment=hclf_gender with logger=none and direction=class_means: trains and exports."""
    from conftest import compose
    from facelab.train import run_train

    shards = toy_shards(tmp_path / "hs")
    cfg = compose("train", ["+experiment=hclf_gender", f"data.dataset.path={shards}", "data.batch_size=12",
                            "model.direction=class_means", "model.lr=0.05", "trainer.max_steps=20",
                            "trainer.val_check_interval=10", "trainer.accelerator=cpu", "logger=none",
                            "trainer.enable_progress_bar=false"], tmp_path / "run")
    run_train(cfg)
    net = load_hclassifier(tmp_path / "run" / "hclf")
    assert json.loads((tmp_path / "run" / "hclf" / "config.json").read_text())["direction"] == "class_means"
    assert net.heads == {"Male": 2} and net.directions is None  # exported as plain linear heads
