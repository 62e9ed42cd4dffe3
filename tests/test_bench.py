"""The sampling-overhead benchmark runs end to end on a tiny UNet, and facelab matches diffusers' DDIMPipeline."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "sampling_overhead.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sampling_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def tiny_model(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    folder = tmp_path / "tiny"
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True).save_pretrained(
        folder / "scheduler")
    return folder


def test_bench_main_tiny(bench, tiny_model, tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "bench" / "results.json"
    try:
        r = bench.main(["--model", str(tiny_model), "--batch", "2", "--steps", "5", "--repeats", "1",
                        "--stub-repeats", "2", "--device", "cpu", "--profile", "always", "--out", str(out),
                        "--quiet"])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert (out.parent / "results.md").read_text().startswith("# Sampling overhead: DDIM-5")
    for key in ("device", "torch", "diffusers", "batch", "resolution", "steps", "median_s",
                "figure1_overhead", "figure2_facelab_over_diffusers", "stub_loop_us_per_step", "correctness"):
        assert key in r, key
    assert (r["device"], r["batch"], r["resolution"], r["steps"], r["rounds"]) == ("cpu", 2, 16, 5, 1)
    assert r["timesteps"] == [800, 600, 400, 200, 0, -1]
    assert set(r["median_s"]) == {"bare", "facelab", "diffusers"}
    assert all(v > 0 for v in r["median_s"].values())
    assert r["figure1_overhead"]["median_of_ratios"] > 0 and r["figure2_facelab_over_diffusers"]["median_of_ratios"] > 0
    assert 0 < r["profile"]["inside_unet_s"] <= r["profile"]["total_s"]
    assert (out.parent / "profile.txt").read_text().startswith("one facelab run")
    assert r["correctness"]["image_max_abs_diff"] < 1e-4
    assert r["correctness"]["raw_x0_max_abs_diff"] < 1e-4 * max(1.0, r["correctness"]["raw_x0_max_abs"])
