"""Does weighting low t help the noise-aware classifier (issue #21)? Train `+experiment=attr_clf_noisy` twice for the
same short budget, uniform t (model.t_power=1) and low-t weighted (t = ⌊T·u^p⌋), and score both and the zoo's
attr64_noisy (3000 uniform steps) on held-out faces per t; write noisy_t.json and a section of results.md.

    python experiments/cyclediff/noisy_t.py [--steps 600] [--power 3] [--faces 512] [--runs DIR]

The two trainings run side by side (one process each, one thread); a finished training (its classifier/ export) is
reused. Held-out faces: synthetic, seed 0 from index 900000 (the classifiers trained on indices < 20000), noised to
each --times t with one fixed noise per face; accuracy of each --attributes head (logit > 0 vs the renderer's label).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from facelab.diffusion import Schedule
from facelab.models.classifier import load_classifier
from facelab.sources import SyntheticSource

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SECTION = "## Noise-aware classifier: low-t weighting (noisy_t.py)"
_spec = importlib.util.spec_from_file_location("cyclediff_cfg", HERE / "cfg.py")
cfg_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cfg_script)


def train(runs: Path, steps: int, powers: dict[str, float]) -> dict[str, Path]:
    """{name: exported classifier folder}, training the missing ones side by side."""
    folders = {name: runs / name / "classifier" for name in powers}
    jobs = [subprocess.Popen([sys.executable, "-m", "facelab.train", "+experiment=attr_clf_noisy",
                              f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                              "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false",
                              "trainer.accelerator=cpu", f"+model.t_power={power:g}", f"hydra.run.dir={runs / name}"],
                             cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "FACELAB_ROOT": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=open(runs / f"{name}.log", "w"))
            for name, power in powers.items() if not (folders[name] / "config.json").is_file()]
    for job in jobs:
        if job.wait():
            raise SystemExit(f"a training failed: see {runs}/*.log")
    return folders


@torch.no_grad()
def accuracy_per_t(source, faces: int, times: list[int], attributes: list[str]) -> dict:
    """{str(t): {attribute: accuracy}} of one noise-aware classifier on the held-out faces."""
    net = load_classifier(source)
    inputs = SyntheticSource(faces, 0, 900000).load(net.image_size)
    labels = inputs.label_columns(attributes).float()
    noise = torch.randn(inputs.images.shape, generator=torch.Generator().manual_seed(0))
    schedule = Schedule.from_config(net.meta["scheduler"])
    out = {}
    for t in times:
        x_t = schedule.q_sample(inputs.images, t, noise)
        logits = net(x_t, torch.full((len(x_t),), t))
        out[str(t)] = {a: float(((logits[a] > 0).float() == labels[:, j]).float().mean())
                       for j, a in enumerate(attributes)}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--power", type=float, default=3.0, help="t_power of the low-t run")
    parser.add_argument("--faces", type=int, default=512)
    parser.add_argument("--times", type=int, nargs="+", default=[0, 50, 100, 200, 400, 700])
    parser.add_argument("--attributes", nargs="+", default=["Smiling", "Eyeglasses", "Male"])
    parser.add_argument("--reference", default="attr64_noisy", help="the zoo's classifier, scored alongside")
    parser.add_argument("--runs", type=Path, default=ROOT / "outputs" / "experiments" / "cyclediff_noisy_t")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    args.runs.mkdir(parents=True, exist_ok=True)
    folders = train(args.runs, args.steps, {"uniform": 1.0, f"t_power_{args.power:g}": args.power})
    sources = {f"{name} ({args.steps} steps)": folder for name, folder in folders.items()}
    sources[f"{args.reference} (zoo, 3000 uniform steps)"] = args.reference
    results = {"steps": args.steps, "power": args.power, "faces": args.faces, "times": args.times,
               "attributes": args.attributes,
               "accuracy": {name: accuracy_per_t(src, args.faces, args.times, args.attributes)
                            for name, src in sources.items()}}
    (args.out / "noisy_t.json").write_text(json.dumps(results, indent=2))
    lines = [SECTION, "", f"Held-out accuracy per t on {args.faces} faces (one fixed noise per face), the low-t run "
             f"drawing t = ⌊1000·u^{args.power:g}⌋ (density ∝ t^{1 / args.power - 1:.2f}); same budget, one thread "
             "each.", ""]
    header = ["classifier", "attribute", *(f"t = {t}" for t in args.times)]
    rows = [[name, a, *(acc[str(t)][a] for t in args.times)] for name, acc in results["accuracy"].items()
            for a in args.attributes]
    lines += cfg_script.evaluate.table(header, rows)
    cfg_script.write_section(args.out / "results.md", "\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
