"""`make demo`: run the zoo models through every method into one gallery, outputs/demo/<time>/index.html.

Each showcase is an ordinary `python -m facelab.sample ...` command line; a method adds its line to SHOWCASES.
`--figures` also copies each showcase's grid.png and metrics.json to experiments/demo/figures/ (the README's).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHOWCASES = {
    "ddim": ["method=ddim", "num_samples=16", "sampler.steps=50", "guidance=[record]"],
    "fuzzy_replace": ["method=fuzzy", "mode=replace", "mask_s=0.07", "num_samples=4"],
    "directions_pca": ["method=directions", "discover=pca", "num_samples=100", "method.edit_seeds=2",
                       "num_directions=3"],
    "fuzzy_zscore": ["method=fuzzy", "mode=zscore", "self_degrade=true", "num_samples=4"],
    "debias": ["method=debias", "target.Male=0.5", "num_samples=16", "batch_size=16", "method.real_faces.num=0"],
    "cyclediff": ["method=cyclediff", "attribute=[Smiling,Eyeglasses,reconstruction]", "num_samples=2"],
    "codiff": ["method=codiff", "num_samples=8", "batch_size=8", "return_influence_function=true"],
}


def main(figures: bool = False) -> Path:
    from facelab.io.gallery import render_overview

    demo = ROOT / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    for name, overrides in SHOWCASES.items():
        run_dir = demo / name
        cmd = [sys.executable, "-m", "facelab.sample", *overrides, f"hydra.run.dir={run_dir}"]
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "FACELAB_ROOT": str(ROOT)})
        print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        if figures:
            (HERE / "figures").mkdir(exist_ok=True)
            shutil.copy(run_dir / "grid.png", HERE / "figures" / f"{name}.png")
            shutil.copy(run_dir / "metrics.json", HERE / "figures" / f"{name}.json")
    index = render_overview(demo, list(SHOWCASES), "facelab demo: the zoo models through every method",
                            "Each section is one ordinary run: what the method does, the command that reproduces it, "
                            "its key metrics and its main grid; its own page has every image, plot and setting.")
    print(f"gallery: {index}")
    return index


if __name__ == "__main__":
    main(figures="--figures" in sys.argv[1:])
