"""The LightningModule base (facelab.models.base) and the model loader registry (facelab.models.pretrained)."""
import ast
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import ROOT, TINY_TRAIN, TINY_UNET, compose
from facelab.io.errors import InputError
from facelab.models import pretrained
from facelab.models.base import DEFAULT_TOTAL_STEPS, linear_warmup
from facelab.models.components.seeding import keyed_generator, stream_generator
from facelab.models.ddpm import PixelDDPM
from facelab.models.parser import FaceParser


def lr_curve(module, steps: int = 5) -> list[list[float]]:
    """Each param group's learning rate over the first `steps` scheduler steps."""
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config.get("lr_scheduler", {}).get("scheduler")
    curve = []
    for _ in range(steps):
        curve.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return curve


def test_config_factories_match_the_python_defaults(tmp_path):
    """conf/model gives the optimiser and schedule a module builds without them: same groups, same LR curve."""
    cfg = compose("train", ["+experiment=ddpm_synthetic", *TINY_TRAIN, "model.attributes=[Smiling]",
                            "model.embedding_lr_scale=10", "model.warmup_steps=3", "model.weight_decay=0.01"], tmp_path)
    torch.manual_seed(0)
    configured = instantiate(cfg.model, _convert_="all")
    assert callable(configured.optimizer_factory) and callable(configured.lr_scheduler_factory)
    assert "optimizer" not in configured.hparams and "lr_scheduler" not in configured.hparams  # checkpoints stay data
    kwargs = {k: v for k, v in instantiate(cfg.model, _convert_="all", _partial_=True).keywords.items()
              if k not in ("optimizer", "lr_scheduler")}
    torch.manual_seed(0)
    direct = PixelDDPM(**kwargs)
    a, b = configured.configure_optimizers()["optimizer"], direct.configure_optimizers()["optimizer"]
    assert type(a) is type(b) is torch.optim.AdamW and len(a.param_groups) == 2
    for ga, gb in zip(a.param_groups, b.param_groups):
        assert {k: v for k, v in ga.items() if k != "params"} == {k: v for k, v in gb.items() if k != "params"}
    assert a.param_groups[1]["initial_lr"] == cfg.model.lr * 10 and a.param_groups[1]["weight_decay"] == 0.01
    assert lr_curve(configured) == lr_curve(direct)
    assert [row[0] for row in lr_curve(direct)] == pytest.approx([cfg.model.lr * min(1, (s + 1) / 3) for s in range(5)])


def test_scheduler_null_is_a_constant_rate_and_any_optimizer_fits(tmp_path):
    cfg = compose("train", ["+experiment=ddpm_synthetic", *TINY_TRAIN, "model.lr_scheduler=null",
                            "~model.optimizer.weight_decay", "model.optimizer._target_=torch.optim.SGD"], tmp_path)
    model = instantiate(cfg.model, _convert_="all")
    config = model.configure_optimizers()
    assert isinstance(config["optimizer"], torch.optim.SGD) and "lr_scheduler" not in config
    assert lr_curve(model) == [[cfg.model.lr]] * 5


@pytest.mark.parametrize("max_steps, expected", [(40, 40), (-1, DEFAULT_TOTAL_STEPS)])
def test_one_cycle_gets_the_runs_step_budget(max_steps, expected):
    class Trainer:  # what _step_budget reads
        pass

    model = FaceParser(channels=(8, 16), image_size=16, lr=0.01)
    model._trainer = Trainer()
    model._trainer.max_steps = max_steps
    scheduler = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR) and scheduler.total_steps == expected
    assert scheduler.optimizer.param_groups[0]["max_lr"] == 0.01


def test_generators_are_the_keyed_streams():
    model = PixelDDPM(unet=TINY_UNET, scheduler={"num_train_timesteps": 1000}, seed=5)
    a, b = model.generator(0, 3, 1), keyed_generator("cpu", 5, 0, 0, 3, 1)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert torch.equal(torch.rand(3, generator=stream_generator(7, "cpu", 1)),
                       torch.rand(3, generator=torch.Generator().manual_seed(7 * 1000003 + 1)))


def test_linear_warmup():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = linear_warmup(opt, 4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


# --- the loader registry -------------------------------------------------------------------------------------------
ZOO = {"denoiser": {"cyclediff64", "ddpm64", "ddpm64_biased"}, "vae": {"ldm_mask64", "ldm_text64", "vae64"},
       "latent": {"ldm_mask64", "ldm_text64"}, "codiff": {"codiff64"},
       "classifier": {"attr64", "attr64_eval", "attr64_noisy"}, "parser": {"parser64"},
       "hclassifier": {"ddpm64_biased"}}


@pytest.mark.parametrize("kind", sorted(ZOO))
def test_every_kind_names_models_the_same_way(kind, tmp_path):
    assert ZOO[kind] <= set(pretrained.zoo(kind))
    for name in ZOO[kind]:
        form, folder = pretrained.locate(kind, name)
        assert form == "zoo" and Path(folder).is_relative_to(pretrained.ZOO_DIR / name)
        assert pretrained.locate(kind, folder)[0] == "folder"  # the same folder by its path
    assert pretrained.locate(kind, tmp_path / "run" / "last.ckpt") == ("checkpoint", tmp_path / "run" / "last.ckpt")
    assert pretrained.locate(kind, tmp_path / "nothing") is None
    with pytest.raises(InputError, match="nothing"):
        pretrained.load_model(kind, tmp_path / "nothing")
    with pytest.raises(InputError, match="no such checkpoint file"):
        pretrained.load_model(kind, tmp_path / "missing.ckpt")
    expected_hub = ("hub", "org/name") if kind == "denoiser" else None
    assert pretrained.locate(kind, "org/name") == expected_hub


def test_registry_entry_points_agree_with_the_named_loaders():
    from facelab.models.classifier import load_classifier
    from facelab.models.hclassifier import find_hclassifier
    from facelab.models.vae import load_vae

    for a, b in ((pretrained.load_model("vae", "vae64"), load_vae("vae64")),
                 (pretrained.load_model("classifier", "attr64"), load_classifier("attr64"))):
        assert not a.training and not any(p.requires_grad for p in a.parameters())
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert find_hclassifier("attr64") is None and find_hclassifier("ddpm64_biased").name == "hclf"
    with pytest.raises(ValueError, match="unknown model kind"):
        pretrained.model_kind("sampler")


def test_models_and_directions_import_nothing_above_them():
    """facelab.models never imports methods, guidance or the entry points; facelab.directions never imports methods."""
    above = {"models": ("facelab.methods", "facelab.guidance", "facelab.sample", "facelab.train", "facelab.runner",
                        "facelab.directions"),
             "directions": ("facelab.methods", "facelab.sample", "facelab.train", "facelab.runner")}
    for package, forbidden in above.items():
        for path in (ROOT / "facelab" / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
                bad = [n for n in names if n.startswith(forbidden)]
                assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
