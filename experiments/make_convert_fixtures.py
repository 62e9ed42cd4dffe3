"""Write tests/fixtures/convert/: key/shape fixtures and reference outputs of original models that no package carries.

Runs the authors' own source (not vendored into facelab) from a git mirror of the original repository:
  python experiments/make_convert_fixtures.py --ddim /work/.mirror/ermongroup+ddim/repo \
      --cyclediff /work/.mirror/gongshuai1+CycleDiff/repo
For each model it records the config, every state-dict key with its shape, and ε of the original forward on seeded
random weights (`seeded_state`: the same function tests/test_convert.py uses), so the test compares the converted
facelab model with the original's output without needing the original code.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "convert"
DDIM_TINY = {"data": {"image_size": 16, "channels": 3},
             "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2],
                       "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0, "var_type": "fixedsmall",
                       "resamp_with_conv": True},
             "diffusion": {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                           "num_diffusion_timesteps": 1000}}
CYCLEDIFF_TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2,2",
                  "attention_resolutions": "16,8", "num_heads": 2, "use_scale_shift_norm": True, "learn_sigma": False,
                  "num_attributes": 20}


def seeded_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shapes[k], generator=g) * 0.1 for k in sorted(shapes)}


def _show(repo: Path, path: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(subprocess.run(["git", "--git-dir", str(repo / ".git") if (repo / ".git").exists() else str(repo),
                                    "show", f"HEAD:{path}"], check=True, capture_output=True, text=True).stdout)


def _ns(d):
    return types.SimpleNamespace(**{k: _ns(v) if isinstance(v, dict) else v for k, v in d.items()})


def _write(name: str, config: dict, model: torch.nn.Module, forward) -> None:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_state(shapes))
    g = torch.Generator().manual_seed(1)
    size = config["data"]["image_size"] if "data" in config else config["image_size"]
    x = torch.randn(2, 3, size, size, generator=g)
    t = torch.tensor([5, 803])
    extra = {"y": (torch.rand(2, 20, generator=g) > 0.5).float()} if "num_attributes" in config else {}
    with torch.no_grad():
        eps = forward(model.eval(), x, t, **extra)
    (OUT / f"{name}.json").write_text(json.dumps({"config": config, "shapes": shapes}, indent=1) + "\n")
    save_file({"x": x, "t": t, "eps": eps.contiguous(), **extra}, OUT / f"{name}.safetensors")
    print(name, len(shapes), "keys", list(eps.shape))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ddim", type=Path, required=True)
    parser.add_argument("--cyclediff", type=Path, required=True)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        _show(args.ddim, "models/diffusion.py", tmp / "ddim_orig" / "diffusion.py")
        for name in ("unet.py", "nn.py", "fp16_util.py", "__init__.py"):
            _show(args.cyclediff, f"diffusion/{name}", tmp / "cyclediff_orig" / name)
        sys.path.insert(0, str(tmp))
        from ddim_orig.diffusion import Model

        _write("ddim_tiny", DDIM_TINY, Model(_ns(DDIM_TINY)), lambda m, x, t: m(x, t))
        from cyclediff_orig.unet import UNetModel

        c = CYCLEDIFF_TINY
        size = c["image_size"]
        model = UNetModel(in_channels=3, model_channels=c["num_channels"], out_channels=3,
                          num_res_blocks=c["num_res_blocks"],
                          attention_resolutions=tuple(size // int(r) for r in c["attention_resolutions"].split(",")),
                          channel_mult=tuple(int(m) for m in c["channel_mult"].split(",")),
                          num_attributes=c["num_attributes"], num_heads=c["num_heads"],
                          use_scale_shift_norm=c["use_scale_shift_norm"])
        _write("cyclediff_tiny", c, model, lambda m, x, t, y: m(x, t, y=y))


if __name__ == "__main__":
    main()
