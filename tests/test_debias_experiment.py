"""experiments/debias/evaluate.py end to end on a tiny random model (every cell, 4 images, 2 seeds), and the zoo's
h-classifier EXTRAS pipeline (extract → train → install) on the same model (about 7 s and 14 s on a busy CPU)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from facelab.models.classifier import AttributeClassifier
from facelab.models.hclassifier import HNet, load_hclassifier, save_hclassifier
from facelab.models.pretrained import load_denoiser, model_fingerprint

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
GRID4 = [750, 500, 250, 0]  # sampler.steps=4, leading spacing


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_setup(tiny_model_dir, tmp_path_factory) -> dict:
    """The tiny model, random guide/eval attribute classifiers and a random (Male, skin_tone) h-classifier."""
    root = tmp_path_factory.mktemp("debias_experiment")
    for seed, name in ((0, "guide"), (1, "eval")):
        torch.manual_seed(seed)
        AttributeClassifier(["Male", "Smiling", "Wearing_Lipstick"], {"skin_tone": 3}, channels=(8, 16),
                            image_size=16).export(root / name)
    denoiser = load_denoiser(str(tiny_model_dir))
    net = HNet({"Male": 2, "skin_tone": 3}, 1024, GRID4, meta={"model": "tiny", "fingerprint": model_fingerprint(
        denoiser), "where": "after", "grid": GRID4, "h_shape": [16, 8, 8]})
    with torch.no_grad():
        net.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    save_hclassifier(net, root / "hclf")
    return {"model": str(tiny_model_dir), "hclf": str(root / "hclf"), "guide": str(root / "guide"),
            "eval": str(root / "eval")}


def test_evaluate_tiny(tiny_setup, tmp_path):
    script = load_script(EXPERIMENTS / "debias" / "evaluate.py", "debias_evaluate")
    argv = ["--model", tiny_setup["model"], "--hclf", tiny_setup["hclf"], "--eval-classifier", tiny_setup["eval"],
            "--guidance-classifier", tiny_setup["guide"], "--samples", "4", "--seeds", "2", "--batch-size", "2",
            "--steps", "4", "--calibrate-scales", "0.1", "10", "--calibration-samples", "4", "--batches", "1", "2",
            "--real-faces", "8", "--device", "cpu", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]
    results = script.main(argv)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    text = (tmp_path / "results.md").read_text()
    assert text.startswith(f"# Balancing Act on `{tiny_setup['model']}`: 4 images × 2 seeds")
    for heading in ("## Debiasing at Male = 0.5", "## Targets", "## Three classes", "## Batch invariance",
                    "## Loss fix", "## Scale calibration"):
        assert heading in text
    cells = results["cells"]
    assert {"vanilla", "sample", "distribution", "image", "target_0.3", "target_0.7", "skin", "N1", "N2",
            "N1_none", "N1_cumulative"} <= set(cells)
    assert cells["vanilla"]["time_ratio"]["mean"] == pytest.approx(1.0) and cells["vanilla"]["drift"]["mean"] == 0
    for key in ("vanilla", "sample", "image", "distribution"):  # every mode has M images per seed, pooled halves
        assert cells[key]["num_samples"] == 8 and len(cells[key]["per_seed"]) == 2
        fd = cells[key]["per_seed"][0]["fd"]["Male"]
        male = cells[key]["per_seed"][0]["fractions"]["Male"][1]
        assert fd == pytest.approx(2 ** 0.5 * abs(male - 0.5))
    assert [len(cells[key]["per_seed"][0]["runs"]) for key in ("sample", "image")] == [2, 2]
    assert len(cells["skin"]["fractions"]["skin_tone"]) == 3 and "skin_tone" in cells["skin"]["fd"]
    assert cells["distribution"]["hclf_fractions"]["Male"] and cells["vanilla"]["hclf_fractions"] == {}
    assert results["calibration"]["scale"] == results["scale"] in (0.1, 10)
    assert set(results["loss_fix"]) == {"logprob", "prob"}
    assert all(0 <= r["flipped_of_wrong"]["mean"] <= 1 for r in results["loss_fix"].values())
    # rerunning on the same run folder reuses every finished cell, and refuses cells run with other settings
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert "batch1_s0" not in runs and "batch2_s0" not in runs  # N = 1 and N = batch size are the cells above
    stamp = (tmp_path / "runs" / "vanilla_s0" / "metrics.json").stat().st_mtime
    again = script.main(argv)
    assert (tmp_path / "runs" / "vanilla_s0" / "metrics.json").stat().st_mtime == stamp
    assert again["cells"] == results["cells"] and sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs
    with pytest.raises(SystemExit, match="other settings"):
        script.main([*argv, "--scale", "7"])


def test_evaluate_refuses_unpaired_halves(tmp_path):
    script = load_script(EXPERIMENTS / "debias" / "evaluate.py", "debias_evaluate")
    with pytest.raises(SystemExit):
        script.parse(["--samples", "300", "--batch-size", "100"])


def test_zoo_extras_build_and_install_the_hclf(tiny_model_dir, tmp_path, monkeypatch):
    """The ddpm64_biased EXTRAS (h along trajectories → class-mean hclf_gender training → install as
    <zoo model>/hclf), shrunk."""
    zoo = load_script(EXPERIMENTS / "zoo" / "train_zoo.py", "train_zoo")
    (extract, extract_args, _), (train, train_args, install) = zoo.EXTRAS["ddpm64_biased"]
    tiny = [f"model.pretrained={tiny_model_dir}", "num_samples=6", "batch_size=3", "sampler.steps=4"]
    assert "model.direction=class_means" in train_args
    # a tiny model's 6 trajectories rarely show every class, which class means need: free heads here
    shrink = ["model.direction=free", "data.batch_size=2", "data.val_fraction=0.34", "trainer.max_steps=2",
              "trainer.val_check_interval=1", "trainer.accelerator=cpu", "trainer.enable_model_summary=false"]
    hspace = tmp_path / "outputs" / "zoo" / "tiny" / extract / "hspace"
    monkeypatch.setattr(zoo, "ROOT", tmp_path)
    monkeypatch.setattr(zoo, "EXTRAS", {"tiny": [
        (extract, [a for a in extract_args if not a.startswith(("model.", "num_samples", "batch_size"))] + tiny, None),
        (train, [a for a in train_args if not a.startswith("data.dataset.path")] + [f"data.dataset.path={hspace}",
                                                                                    *shrink], install)]})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("FACELAB_ROOT", str(tmp_path))
    (tmp_path / "facelab" / "zoo" / "tiny" / "hclf").mkdir(parents=True)  # a stale one is replaced
    zoo.extras("tiny")
    net = load_hclassifier(tmp_path / "facelab" / "zoo" / "tiny" / "hclf")
    assert net.heads == {"Male": 2, "skin_tone": 3} and net.times == GRID4
    assert net.meta["fingerprint"] == model_fingerprint(load_denoiser(str(tiny_model_dir)))
    assert net.meta["label_source"] == "classifier:attr64" and net.meta["source"] == "trajectory"
    weights = load_file(tmp_path / "facelab" / "zoo" / "tiny" / "hclf" / "model.safetensors")
    assert weights["weight"].dtype == torch.float16  # stored in half precision like the zoo's other weights
