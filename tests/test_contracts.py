"""Contract tests: every config of every group composes, and every method runs under every sampler it supports (tiny
settings, zoo models) or refuses it with one line naming the sampler."""
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from facelab.io.errors import InputError
from facelab.sample import run_sample
from facelab.utils import CONF_DIR, compose_config

GROUPS = ("method", "sampler", "guidance", "source", "eval")
SAMPLER_STEPS = {"ddim": ["sampler.steps=3"], "ddpm": ["sampler.steps=3"], "dpmpp_2m": ["sampler.steps=3"],
                 "repaint": ["sampler.steps=6", "sampler.jump_length=2", "sampler.jump_n_sample=2"]}
# each method's tiny run on the zoo models
TINY = {
    "generate": ["num_samples=1"],
    "fuzzy": ["mode=replace", "num_samples=1"],
    "debias": ["target.Male=0.5", "num_samples=2", "batch_size=2", "method.real_faces.num=0",
               "method.head_lookup=nearest"],
    "directions": ["discover=pca", "num_samples=4", "batch_size=4", "method.edit_seeds=1", "num_directions=1",
                   "method.num_svectors=2"],
    "cyclediff": ["attribute=[Smiling]", "num_samples=1", "batch_size=1"],
    "codiff": ["num_samples=1", "batch_size=1"],
    "ldm": ["text=This woman is smiling.", "num_samples=1", "batch_size=1"],
    "hextract": ["num_samples=2", "batch_size=2", "method.shard_size=2"],
}
REFUSED = {("cyclediff", "repaint"), ("codiff", "repaint"), ("ldm", "repaint"), ("hextract", "repaint"),
           ("directions", "repaint")}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,name", [(g, n) for g in GROUPS for n in options(g)])
def test_every_config_composes(group, name, tmp_path):
    choice = f"{group}={name}" if group in ("method", "sampler") else f"+{group}=[{name}]" if group == "eval" \
        else f"{group}=[{name}]" if group == "guidance" else f"+{group}={name}"
    cfg = compose_config("sample", [choice], tmp_path)
    if group == "sampler":
        assert instantiate(cfg.sampler).name == name
    if group == "method":
        assert cfg.method._target_.startswith("facelab.methods.") and cfg.num_samples >= 1


@pytest.mark.parametrize("name", options("experiment"))
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_config("train", [f"+experiment={name}"], tmp_path)
    assert cfg.model._target_ and cfg.trainer


@pytest.mark.parametrize("sampler", sorted(SAMPLER_STEPS))
@pytest.mark.parametrize("method", sorted(TINY))
def test_method_runs_under_sampler(method, sampler, tmp_path):
    overrides = [f"method={method}", *TINY[method], f"sampler={sampler}", *SAMPLER_STEPS[sampler],
                 "progress=false", "device=cpu"]
    cfg = compose_config("sample", overrides, tmp_path / "run")
    if (method, sampler) in REFUSED:
        with pytest.raises(InputError, match=f"sampler={sampler}"):
            run_sample(cfg)
        assert not (tmp_path / "run" / "metrics.json").exists()
        return
    metrics = run_sample(cfg)
    assert (Path(tmp_path) / "run" / "metrics.json").is_file()
    numbers = [v for v in metrics.values() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers)


def _images(folder: Path):
    from facelab.api import read_run

    return read_run(folder, {}).images


def test_fuzzy_composes_with_debiasing_and_a_direction_edit(tmp_path):
    """Fuzzy correction + distribution debiasing, and a direction edit during fuzzy correction: each term changes the
    corrected faces (same seed, same inputs)."""
    base = ["method=fuzzy", "mode=replace", "num_samples=1", "sampler.steps=10", "progress=false", "device=cpu"]
    run_sample(compose_config("sample", ["method=directions", *TINY["directions"], "progress=false", "device=cpu"],
                              tmp_path / "pca"))
    runs = {
        "plain": [*base],
        "hedit": [*base, "guidance=[hedit]", f"guidance.hedit.file={tmp_path / 'pca' / 'directions.safetensors'}",
                  "guidance.hedit.scale=20"],
        "plain_biased": [*base, "model.pretrained=ddpm64_biased"],
        "debias": [*base, "model.pretrained=ddpm64_biased", "guidance=[debias]", "target.Male=0.5",
                   "guidance.debias.head_lookup=nearest"],
    }
    images = {}
    for name, overrides in runs.items():
        run_sample(compose_config("sample", overrides, tmp_path / name))
        images[name] = _images(tmp_path / name)
    assert not torch.equal(images["plain"], images["hedit"])
    assert not torch.equal(images["plain_biased"], images["debias"])
