"""Measure facelab.convert's equivalence to the original code: max |facelab − original| / max |original| of ε (and
of the variance channels for learn_sigma models) per format, on random weights and random (x, t).

    python experiments/convert_equivalence.py [--full]     # --full adds the full-width RePaint and P2 builds (slow)

guided-diffusion variants run openai's own UNetModel (guided-diffusion-sdk under .venv/refs); CycleDiff and ddim
compare with the original outputs recorded in tests/fixtures/convert (experiments/make_convert_fixtures.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from test_convert import FIXTURES, VARIANTS, original, rel, seeded_state  # noqa: E402

from facelab.convert import ddim  # noqa: E402
from facelab.convert import guided_diffusion as gd  # noqa: E402


def guided(name: str, flags: dict, size: int, seeds: int = 3) -> dict:
    model = original(flags)
    start = time.perf_counter()
    unet, _, _ = gd.build(model.state_dict(), flags)
    worst = {"eps": 0.0, "variance": 0.0}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        x, t = torch.randn(1, 3, size, size, generator=g), torch.randint(0, 1000, (1,), generator=g)
        kw = {"y": torch.randint(0, 1000, (1,), generator=g)} if flags.get("class_cond") else {}
        with torch.no_grad():
            ref, out = model(x, t, **kw), unet(x, t, class_labels=kw.get("y")).sample
        worst["eps"] = max(worst["eps"], rel(out[:, :3], ref[:, :3]))
        if ref.shape[1] == 6:
            worst["variance"] = max(worst["variance"], rel(out[:, 3:], ref[:, 3:]))
    return {"format": f"guided_diffusion/{name}", **worst, "seconds": round(time.perf_counter() - start, 1)}


def fixture(name: str) -> dict:
    fx = json.loads((FIXTURES / f"{name}.json").read_text())
    ref = load_file(FIXTURES / f"{name}.safetensors")
    state = seeded_state(fx["shapes"])
    if name.startswith("ddim"):
        unet, _ = ddim.build(state, fx["config"])
        kw = {}
    else:
        flags = {k: v for k, v in fx["config"].items() if k != "num_attributes"}
        unet, _, _ = gd.build(state, {**flags, "attributes": gd.CYCLEDIFF_ATTRIBUTES})
        kw = {"class_labels": 2 * ref["y"] - 1}
    with torch.no_grad():
        out = unet(ref["x"], ref["t"], **kw).sample
    return {"format": f"{name} (original's recorded output)", "eps": rel(out, ref["eps"]), "variance": None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    args = parser.parse_args()
    rows = [guided(name, flags, 32) for name, flags in VARIANTS.items()]
    rows += [fixture("cyclediff_tiny"), fixture("ddim_tiny")]
    if args.full:
        rows += [guided(name, gd.PRESETS[name], 256, seeds=1) for name in ("repaint_celeba256", "p2_celebahq")]
    for row in rows:
        var = "—" if not row["variance"] else f"{row['variance']:.1e}"
        print(f"| {row['format']} | {row['eps']:.1e} | {var} |")


if __name__ == "__main__":
    main()
