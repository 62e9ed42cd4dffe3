"""Balancing Act h-classifiers (`linears.{k}` of Linear(D → 2), head k ↔ t = grid[k] on the original's 50-step grid)
-> facelab's h-classifier folder: the same logits as the plain linears at every grid t, and method=debias on the
original's grid (sampler.spacing=floored) guides with every head exactly."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import compose
from facelab.convert import convert_file, detect_format
from facelab.convert.__main__ import main as convert_main
from facelab.convert.hclf import PRESETS, original_grid
from facelab.io.errors import InputError
from facelab.models.hclassifier import load_hclassifier
from facelab.sample import run_sample


def release(heads: int = 49, dim: int = 32, classes: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict in the release's layout."""
    gen = torch.Generator().manual_seed(seed)
    linears = [torch.nn.Linear(dim, classes) for _ in range(heads)]
    state = {}
    for k, linear in enumerate(linears):
        state[f"linears.{k}.weight"] = torch.randn(linear.weight.shape, generator=gen)
        state[f"linears.{k}.bias"] = torch.randn(linear.bias.shape, generator=gen)
    return state


def test_original_grid():
    grid = original_grid()
    assert grid[:4] == [0, 20, 40, 61] and grid[-2:] == [978, 999] and len(grid) == 50
    assert grid == [int(s + 1e-6) for s in np.linspace(0, 1, 50) * 999]  # the original's own expression


def test_converted_heads_give_the_plain_linears_logits(tmp_path):
    state = release()
    torch.save(state, tmp_path / "gender.pt")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({**PRESETS["ba_gender"], "h_shape": [8, 2, 2]}))
    assert detect_format(state) == "hclf"
    dest = convert_file(tmp_path / "gender.pt", tmp_path / "hclf", config=tmp_path / "small.yaml")
    net = load_hclassifier(dest)
    assert net.heads == {"Male": 2} and net.times == original_grid()[:-1] and net.meta["where"] == "after"
    h = torch.randn(5, 8, 2, 2)
    for k, t in enumerate(original_grid()[:-1]):
        want = F.linear(h.flatten(1), state[f"linears.{k}.weight"], state[f"linears.{k}.bias"])
        assert torch.allclose(net(h, t)["Male"], want, atol=1e-5), t
    assert net.head_time(999) is None and net.head_time(41, "nearest") == 40
    recipe = json.loads((dest / "recipe.json").read_text())
    assert recipe["format"] == "hclf" and len(recipe["sha256"]) == 64


def test_full_size_preset_fits_and_bad_inputs(tmp_path, capsys):
    torch.save(release(dim=512 * 8 * 8), tmp_path / "race.pt")
    net = load_hclassifier(convert_file(tmp_path / "race.pt", tmp_path / "race", config="ba_race"))
    assert net.dim == 32768 and net.heads == {"race": 2} and len(net.times) == 49

    torch.save(release(dim=32), tmp_path / "small.pt")
    assert convert_main([str(tmp_path / "small.pt"), str(tmp_path / "bad"), "--config", "ba_gender"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "bad").exists()
    assert "linears.0.weight is [2, 32] in the file, the config expects [2, 32768]" in err
    torch.save(release(heads=50, dim=32), tmp_path / "fifty.pt")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({**PRESETS["ba_gender"], "h_shape": [32]}))
    assert convert_main([str(tmp_path / "fifty.pt"), str(tmp_path / "bad"), "--config", str(tmp_path / "small.yaml")]) == 2
    assert "50 heads (linears.0 … linears.49) but the config's grid has 49 head times" in capsys.readouterr().err
    with pytest.raises(Exception, match="linears.3.bias is missing"):
        from facelab.convert.hclf import heads

        heads({k: v for k, v in release(dim=32).items() if k != "linears.3.bias"}, {"h_shape": [32]})


def test_debias_reads_every_converted_head_exactly_on_the_floored_grid(tiny_model_dir, tmp_path):
    """The tiny model's h is 16×8×8; a release-layout classifier on it, converted, then method=debias with the default
    head_lookup=exact: facelab's leading grid has no head for 960, the floored grid guides at all 49 head times."""
    torch.save(release(dim=16 * 8 * 8), tmp_path / "gender.pt")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**PRESETS["ba_gender"], "h_shape": [16, 8, 8]}))
    dest = convert_file(tmp_path / "gender.pt", tmp_path / "hclf", config=tmp_path / "tiny.yaml")
    assert load_hclassifier(dest).meta["sampler"] == {"steps": 50, "spacing": "floored"}
    common = ["method=debias", f"model.pretrained={tiny_model_dir}", f"method.hclf={dest}", "target.Male=0.5",
              "method.eval_classifier=null", "method.real_faces.num=0", "num_samples=2", "batch_size=2",
              "progress=false", "sampler.steps=50"]
    with pytest.raises(InputError, match=r"no head for t=960"):
        run_sample(compose("sample", common, tmp_path / "leading"))
    out = tmp_path / "floored"
    metrics = run_sample(compose("sample", [*common, "sampler.spacing=floored"], out))
    with open(out / "trajectory.csv") as file:
        guided = [int(row["t"]) for row in csv.DictReader(file)]
    assert guided == original_grid()[:-1][::-1] and metrics["guided_steps"] == 49  # 978, 958, …, 20, 0; not 999
