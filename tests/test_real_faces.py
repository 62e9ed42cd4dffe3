"""Real-face helpers: the attribute classifier, the held-out evaluation classifier and the face parser trained on a
CelebA-HQ / CelebAMask-HQ folder (an exported fixture) at the resolution `data.resolution` names, declaring it in
their export, used by a method on a model of that resolution and refused by one of another; and method=hextract from
class folders of 256 px faces."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from conftest import TINY_UNET, compose, run_cli
from facelab.data.hspace import HSpaceDataset
from facelab.data.layouts import export
from facelab.data.synthetic import SEG_CLASSES, SyntheticFaces
from facelab.diffusion import ddim_invert
from facelab.io import InputError, save_image
from facelab.models.components.attributes import attribute_unet
from facelab.models.pretrained import load_denoiser, load_model
from facelab.sample import run_sample
from facelab.train import run_train

SIZE = 32  # the fast tests' data.resolution (the slow one trains at 256)
CLF_HEADS = ["Male", "Young", "Smiling", "Mouth_Slightly_Open", "Eyeglasses", "Wearing_Lipstick", "Bags_Under_Eyes",
             "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "No_Beard", "Pale_Skin", "Wearing_Hat",
             "Wearing_Earrings", "Wearing_Necklace"]  # conf/model/attr_clf.yaml's binary heads, all CelebA attributes
TRAIN = ["data=celebahq", "data.batch_size=4", "data.val_fraction=0.25", "trainer.max_steps=2",
         "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger=none"]
# experiment: (model kind and export folder, overrides shrinking it for SIZE px on a CPU)
HELPERS = {"attr_clf": ("classifier", ["model.channels=[8,16]", "model.categorical=null"]),
           "attr_clf_eval": ("classifier", ["model.channels=[8,16,16]", "model.categorical=null"]),
           "parser": ("parser", ["model.channels=[8,16]"])}
SAMPLE = ["sampler.steps=3", "method.edit_seeds=1", "batch_size=4", "progress=false", "device=cpu"]
# A 256 px UNet that runs in a fraction of a second on a CPU: attention only at 32 px (h = 16 × 32 × 32).
FAST256 = {**TINY_UNET, "sample_size": 256, "block_out_channels": (8, 16, 16, 16),
           "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
           "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D")}


def _unet_folder(folder, **unet):
    torch.manual_seed(0)
    UNet2DModel(**unet).save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder / "scheduler")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """paths.data_dir holding CelebAMask-HQ/: 12 faces as CelebA-HQ images, CelebAMask-HQ masks and attribute file."""
    root = tmp_path_factory.mktemp("data")
    export(SyntheticFaces(size=64, length=12, seed=5), root / "CelebAMask-HQ",
           layouts=["celebahq", "celebamask", "attr_txt"])
    return root


@pytest.fixture(scope="module")
def helpers(tmp_path_factory, data_dir):
    """{experiment: its exported model folder}, each trained for 2 steps on the layout at SIZE px."""
    out = {}
    for name, (kind, tiny) in HELPERS.items():
        run = tmp_path_factory.mktemp(name)
        run_train(compose("train", [f"+experiment={name}", *TRAIN, f"data.resolution={SIZE}",
                                    f"paths.data_dir={data_dir}", *tiny], run))
        out[name] = run / kind
    return out


def test_zoo_recipes_compose_as_before():
    """Without data=, the experiments still train on the zoo's synthetic faces (README "The zoo")."""
    expected = {"attr_clf": (0, 20000, [32, 64, 128, 128]), "attr_clf_eval": (1, 20000, [48, 96, 128, 192]),
                "parser": (1, 6000, [16, 32, 64, 128])}
    for name, (seed, length, channels) in expected.items():
        cfg = compose("train", [f"+experiment={name}"], "/nonexistent")
        data = cfg.data.dataset
        assert data._target_.endswith("SyntheticFaces") and (data.seed, data.length, data.cache) == (seed, length, True)
        assert list(cfg.model.channels) == channels and cfg.model.image_size == data.size == cfg.data.resolution == 64
        assert cfg.data.seed == seed and cfg.seed == seed


@pytest.mark.parametrize("name, preset", [("attr_clf", "attr_clf256"), ("attr_clf_eval", "attr_clf_eval256"),
                                          ("parser", "parser256")])
def test_one_resolution_knob_sets_data_and_model(name, preset):
    cfg = compose("train", [f"+experiment={name}", "data=celebahq", "data.resolution=256", f"model={preset}"], "/x")
    assert cfg.data.dataset._target_ == "facelab.data.layouts.CelebAHQ"
    assert cfg.data.dataset.size == cfg.model.image_size == 256
    assert "length" not in cfg.data.dataset and "cache" not in cfg.data.dataset  # the synthetic faces' keys stay there
    assert len(cfg.model.channels) == 6  # two levels more than at 64 px
    if name != "parser":
        assert cfg.model.categorical is None  # CelebA's attributes are binary


def test_helpers_train_on_the_layout_and_declare_their_resolution(helpers, data_dir):
    faces = torch.stack([torch.from_numpy(np.array(Image.open(data_dir / "CelebAMask-HQ" / "CelebA-HQ-img" /
                                                                f"{i}.jpg").resize((SIZE, SIZE), Image.BICUBIC)))
                         for i in range(4)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    for name, folder in helpers.items():
        kind = HELPERS[name][0]
        assert json.loads((folder / "config.json").read_text())["image_size"] == SIZE
        net = load_model(kind, folder)
        assert net.image_size == SIZE and net.source == str(folder)
        if kind == "classifier":
            assert net.attributes == CLF_HEADS and net.categorical == {}
            probs = net.predict(faces)
            assert set(probs) == set(CLF_HEADS) and all(p.shape == (4, 2) for p in probs.values())
        else:
            assert net.classes == SEG_CLASSES and net.parse(faces).shape == (4, SIZE, SIZE)


def test_categorical_heads_without_labels_are_refused(tmp_path, data_dir):
    cfg = compose("train", ["+experiment=attr_clf", *TRAIN, f"data.resolution={SIZE}", f"paths.data_dir={data_dir}",
                            "model.channels=[8,16]"], tmp_path / "run")
    with pytest.raises(InputError, match=r"model.categorical heads \['skin_tone'\] .* set model.categorical=null"):
        run_train(cfg)
    assert not (tmp_path / "run" / "classifier").exists() and not (tmp_path / "run" / "metrics.json").exists()


def test_helpers_serve_a_method_of_their_resolution(helpers, tmp_path):
    model = _unet_folder(tmp_path / "model", **{**TINY_UNET, "sample_size": SIZE})
    run = tmp_path / "supervised"
    metrics = run_sample(compose("sample", [
        "method=directions", "discover=supervised", "attribute=Smiling", f"model.pretrained={model}", *SAMPLE,
        f"method.classifier={helpers['attr_clf']}", f"method.eval_classifier={helpers['attr_clf_eval']}",
        "method.idx_size=8", "method.num_examples=2", "num_directions=1", "scales=[0,1]"], run))
    assert set(metrics["edits"]["0"]["1"]) == set(CLF_HEADS)  # scored by the held-out classifier's heads
    run = tmp_path / "region"
    metrics = run_sample(compose("sample", [
        "method=directions", "discover=jacobian", "region=skin", f"method.parser={helpers['parser']}",
        f"model.pretrained={model}", *SAMPLE, "method.eval_classifier=null", "method.num_eigvecs=1",
        "method.max_iters=2", "num_directions=1", "scales=[0,1]"], run))
    assert metrics["mask"] == f"parser:{helpers['parser']}"


def test_classifiers_guide_and_score_cyclediff(helpers, tmp_path):
    root = tmp_path / "model"
    torch.manual_seed(0)
    attribute_unet({**TINY_UNET, "sample_size": SIZE}, ["Male", "Smiling", "Eyeglasses", "Young"]).save_pretrained(
        root / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(root / "scheduler")
    metrics = run_sample(compose("sample", [
        "method=cyclediff", f"model.pretrained={root}", f"method.classifier={helpers['attr_clf']}",
        f"method.eval_classifier={helpers['attr_clf_eval']}", "attribute=[Smiling]", "num_samples=2", "batch_size=2",
        "progress=false", "device=cpu", "method.t0=999", "sampler.steps=3"], tmp_path / "run"))
    assert metrics["classifier"] == str(helpers["attr_clf"]) and metrics["classifier_input"] == "clean_blend"
    assert metrics["eval_classifier"] == str(helpers["attr_clf_eval"]) and list(metrics["edits"]) == ["Smiling"]


@pytest.mark.parametrize("knob, overrides, says", [
    ("attr_clf", ["discover=supervised", "attribute=Smiling", "method.eval_classifier=null"],
     f"method.classifier=.* reads {SIZE} px images, the model makes 16 px"),
    ("attr_clf_eval", ["discover=pca", "num_samples=4"],
     f"method.eval_classifier=.* reads {SIZE} px images: these 16 px ones would be scored upsampled"),
])
def test_helpers_are_refused_by_a_model_of_lower_resolution(helpers, tiny_model_dir, tmp_path, knob, overrides, says):
    key = "method.classifier" if knob == "attr_clf" else "method.eval_classifier"
    out = tmp_path / "run"
    with pytest.raises(InputError, match=says):
        run_sample(compose("sample", ["method=directions", f"model.pretrained={tiny_model_dir}", *SAMPLE, *overrides,
                                      f"{key}={helpers[knob]}"], out))
    assert not list(out.rglob("*.png")) and not (out / "metrics.json").exists()


def test_hextract_from_class_folders_at_256_px(tmp_path):
    model = _unet_folder(tmp_path / "model", **FAST256)
    faces = SyntheticFaces(size=256, length=4, seed=7)
    for i in range(4):  # Male/0/ and Male/1/, two faces each
        save_image(faces[i]["image"], tmp_path / "Male" / str(i // 2) / f"face{i}.png")
    base = [f"model.pretrained={model}", "method=hextract", "sampler.steps=2", "batch_size=2", "progress=false",
            "device=cpu"]
    metrics = run_sample(compose("sample", [*base, "method.source=class_folders", f"method.root={tmp_path / 'Male'}"],
                                 tmp_path / "run"))
    dataset = HSpaceDataset(tmp_path / "run" / "hspace")
    assert metrics["num_images"] == 4 and metrics["class_counts"] == {"Male": [2, 2]}
    assert dataset.meta["h_shape"] == [16, 32, 32] and dataset.meta["attributes"] == {"Male": 2}
    assert [dataset[i]["labels"].tolist() for i in range(4)] == [[0], [0], [1], [1]]
    # h against an inversion of the PNGs read independently of facelab's readers, in the run's batches
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "Male" / str(i // 2) / f"face{i}.png")))
                          for i in range(4)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    denoiser = load_denoiser(str(model), "cpu")
    hs = torch.cat([ddim_invert(denoiser, denoiser.schedule, batch, metrics["grid"], capture_h="after",
                                progress=False).hs for batch in pixels.split(2)], 1)
    for i in range(4):  # to one float16 step of |h| < 8 (the float32 paths differ by ~1e-4 at 256 px)
        torch.testing.assert_close(dataset[i]["h"].float(), hs[:, i].flatten(1), atol=5e-3, rtol=1e-3)
    # the same folders as a labelled source (+source=class_folders)
    metrics = run_sample(compose("sample", [*base, "+source=class_folders", f"source.root={tmp_path / 'Male'}",
                                            "method.attributes=[Male]"], tmp_path / "run2"))
    assert metrics["class_counts"] == {"Male": [2, 2]}
    assert torch.equal(HSpaceDataset(tmp_path / "run2" / "hspace")[3]["h"], dataset[3]["h"])


@pytest.mark.slow
def test_helpers_at_256_px_as_a_user_types_them(tmp_path, data_dir):
    """The README's commands: the three helpers trained at 256 px on the layout (their presets at full width, 2
    steps), then used by method=directions on a 256 px model."""
    folders = {}
    for name, preset in [("attr_clf", "attr_clf256"), ("attr_clf_eval", "attr_clf_eval256"), ("parser", "parser256")]:
        run = tmp_path / name
        result = run_cli("train", f"+experiment={name}", "data=celebahq", "data.resolution=256", f"model={preset}",
                         f"paths.data_dir={data_dir}", *TRAIN[1:], "data.batch_size=2", f"hydra.run.dir={run}",
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        folders[name] = run / HELPERS[name][0]
        config = json.loads((folders[name] / "config.json").read_text())
        assert config["image_size"] == 256 and len(config["channels"]) == 6
        assert load_model(HELPERS[name][0], folders[name]).image_size == 256
    model = _unet_folder(tmp_path / "model", **FAST256)
    metrics = run_sample(compose("sample", [
        "method=directions", "discover=supervised", "attribute=Smiling", f"model.pretrained={model}", *SAMPLE,
        f"method.classifier={folders['attr_clf']}", f"method.eval_classifier={folders['attr_clf_eval']}",
        "method.idx_size=4", "method.num_examples=2", "num_directions=1", "scales=[0,1]"], tmp_path / "directions"))
    assert set(metrics["edits"]["0"]["1"]) == set(CLF_HEADS)
    metrics = run_sample(compose("sample", [
        "method=directions", "discover=jacobian", "region=skin", f"method.parser={folders['parser']}",
        f"model.pretrained={model}", *SAMPLE, "method.eval_classifier=null", "method.num_eigvecs=1",
        "method.max_iters=2", "num_directions=1", "scales=[0,1]"], tmp_path / "region"))
    assert metrics["mask"] == f"parser:{folders['parser']}"
