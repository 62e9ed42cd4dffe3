"""Why h-space guidance barely moves the faces on the zoo model: does the trained h-classifier point where the classes
differ? Writes results_alignment.md / .json here.

    python -m facelab.sample method=hextract model.pretrained=ddpm64_biased num_samples=512 method.faces.seed=3 \
        'method.attributes=[Male,skin_tone]' '+method.faces.priors.skin_tone=[0.34,0.33,0.33]' method.out=DIR
    git archive 16b6cb4 facelab/zoo/ddpm64_biased/hclf | tar x -C /tmp/free   # the free head studied here
    python experiments/debias/alignment.py DIR --hclf /tmp/free/facelab/zoo/ddpm64_biased/hclf [--samples 100]
        [--scales 1 3 10] [--runs RUNS]

Guidance runs at the original's temperature 8 (the default when this study ran). The zoo's h-classifier is since
the class-mean head on trajectories that this study led to (heads.py, results.md).

1. Per timestep, the cosine between the zoo h-classifier's Male direction (w_male − w_female) and the class-mean
   difference of h (μ_male − μ_female) on the inverted faces in DIR (above: the first 512 of the zoo h-classifier's
   own 2000 training faces, so the alignment is measured where the head was fitted).
2. A mean-difference head: the zoo h-classifier with its Male head replaced, at every t, by its own component along
   μ_male − μ_female (the same logits at the class means, nothing in other directions), centred between the class
   means; then distribution guidance toward Male = 0.3 with each head, same seed, scored by the held-out evaluator
   (cells as in core.py: `method=debias`, --samples images), at --scales (its steps are cos× shorter).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from evaluate import HERE, ROOT, Cells
from facelab.data.hspace import shard_paths
from facelab.models.hclassifier import load_hclassifier, save_hclassifier

TARGET = 0.3


def class_means(folder: Path, grid: list[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """μ_female, μ_male [T, D] of the shards' h (Male is their label column 0) and the number of faces."""
    sums, counts = 0, torch.zeros(2)
    for path in shard_paths(folder):
        with safe_open(path, "pt") as file:
            if json.loads(file.metadata()["meta"])["grid"] != grid:
                raise SystemExit(f"{path}: h on another grid than the h-classifier's")
        shard = load_file(path)
        h, male = shard["h"].float().flatten(2), shard["labels"][:, 0]
        sums = sums + torch.stack([h[male == k].sum(0) for k in (0, 1)])
        counts += torch.stack([(male == k).sum() for k in (0, 1)])
    if (counts == 0).any():
        raise SystemExit(f"{folder}: needs faces of both classes of Male")
    means = sums / counts[:, None, None]
    return means[0], means[1], int(counts.sum())


def mean_difference_head(source: str, female: torch.Tensor, male: torch.Tensor, out: Path) -> tuple[Path, list]:
    """The h-classifier `source` with its Male head replaced by the class-mean difference (see the docstring);
    returns the exported folder and the per-t cosine of the trained head with the mean difference."""
    net = load_hclassifier(source)
    if list(net.heads)[0] != "Male" or net.heads["Male"] != 2:  # then its logits are outputs 0 (female), 1 (male)
        raise SystemExit(f"{source}: expected a binary Male head first, got {net.heads}")
    trained = net.weight[:, 1] - net.weight[:, 0]
    diff, mid = male - female, (male + female) / 2
    cosine = F.cosine_similarity(trained, diff, dim=1)
    # the trained head's component along the mean difference: the same logits at the class means, no other direction
    d = diff * ((trained * diff).sum(1) / diff.pow(2).sum(1))[:, None]
    with torch.no_grad():
        net.weight[:, 1], net.weight[:, 0] = d / 2, -d / 2
        net.bias[:, 1], net.bias[:, 0] = -(d * mid).sum(1) / 2, (d * mid).sum(1) / 2
    save_hclassifier(net, out)
    return out, cosine.tolist()


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hspace", type=Path, help="shards of inverted faces (method=hextract on ddpm64_biased)")
    parser.add_argument("--hclf", default="ddpm64_biased", help="the trained h-classifier (zoo model holding hclf/)")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0], help="the trained head runs at the first")
    parser.add_argument("--runs", type=Path, help="run folder (finished cells are reused)")
    args = parser.parse_args(argv)
    root = args.runs or ROOT / "outputs" / "experiments" / "debias_alignment" / time.strftime("%Y-%m-%d_%H-%M-%S")
    grid = load_hclassifier(args.hclf).times
    female, male, faces = class_means(args.hspace, grid)
    head, cosine = mean_difference_head(args.hclf, female, male, root / "mean_difference_hclf")
    cells = Cells(root, ["model.pretrained=ddpm64_biased", "method.real_faces.num=0", "seed=0",
                         f"num_samples={args.samples}", f"batch_size={args.samples}"])
    runs = {("none (vanilla)", None): cells("vanilla", ["mode=vanilla", "method.hclf=null"])}
    heads = [("trained", args.hclf, args.scales[0])] + [("mean difference", head, scale) for scale in args.scales]
    for label, hclf, scale in heads:
        runs[label, scale] = cells(f"distribution_{label.replace(' ', '_')}_s{scale:g}", [
            "mode=distribution", f"method.scale={scale:g}", f"target.Male={TARGET}", f"method.hclf={hclf}",
            "method.temperature=8"])
    rows = []
    for (label, scale), run in runs.items():
        m = json.loads((run / "metrics.json").read_text())
        guided = scale is not None
        rows.append({"head": label, "scale": scale, "male_fraction": m["fractions"]["Male"][1],
                     "hclf_read": m["attributes"]["Male"]["hclf_fractions"][1] if guided else None,
                     "dh_over_h": m["dh_norm_mean"] / m["h_norm_mean"] if guided else None})
    results = {"faces": faces, "grid": grid, "cosine": cosine, "samples": args.samples, "target": TARGET,
               "runs": str(root), "rows": rows}
    every = range(0, len(grid), 7)
    lines = ["# Does the h-classifier point where the classes differ?", "",
             f"Cosine of the zoo h-classifier's Male direction with μ_male − μ_female of h over {faces} inverted "
             f"faces of its training set (mean over t {sum(cosine) / len(cosine):.2f}):", "",
             "| t | " + " | ".join(str(grid[i]) for i in every) + " |", "|---|" + "---|" * len(every),
             "| cos | " + " | ".join(f"{cosine[i]:.2f}" for i in every) + " |", "",
             f"Distribution guidance toward Male = {TARGET}, {args.samples} images (seed 0), held-out evaluator:", "",
             "| head | scale | evaluator's Male fraction | h-classifier's final read | mean ‖Δh‖ / ‖h‖ |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        row = [r["head"], fmt(r["scale"], "g"), fmt(r["male_fraction"], ".2f"), fmt(r["hclf_read"], ".3f"),
               fmt(r["dh_over_h"], ".2f")]
        lines.append("| " + " | ".join(row) + " |")
    (HERE / "results_alignment.json").write_text(json.dumps(results, indent=2))
    (HERE / "results_alignment.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
