"""Measure method=directions on the zoo DDPM and synthetic faces; write results.json, results.md and figures here.

    python experiments/directions/evaluate.py [--seeds 100] [--faces 16] [--jacobian-faces 3] [--pca-samples 500]
                                              [--sections supervised conditional ...] [--runs DIR]

1. Supervised directions (Smiling, Eyeglasses, Male, Young; an index of 1000 samples scored by `attr64`):
   the held-out classifier's (`attr64_eval`) P(attribute) per scale on fresh seeds, and the mean |ΔP| of the other
   attributes at the largest scales (entanglement).
2. Conditional projection: each of those with the attribute it moves most besides its own projected out, and
   Wearing_Lipstick (women only in the prior) without Male: ΔP of the attribute, of the condition and of the others.
3. Real-image editing against ground truth: held-out synthetic faces, edit-friendly inversion (η = 1), each
   attribute's supervised and conditional direction toward the opposite value, compared with the renderer's
   counterfactual of the same identity.
4. Jacobian locality: share of the pixel-change energy inside the region for region-masked, unmasked and random
   (equal-norm) directions, against the region's area; and network passes / time of the block solver against the
   reference sequential power iteration on the same trajectory.
5. PCA: explained variance per step and, per top PC, the attribute whose held-out probability moves most.
Every edit is an ordinary facelab run (run_cell) under --runs; a finished cell with the same overrides is read back.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from facelab.data.synthetic import SEG, SyntheticFaces
from facelab.diffusion import DDIM, edit_friendly_invert
from facelab.directions.files import Directions
from facelab.directions.jacobian import masked_eps_fn, power_iteration_reference, top_singular
from facelab.directions.regions import REGIONS
from facelab.directions.trajectory import run_trajectory
from facelab.io.grids import save_grid
from facelab.io.images import read_image
from facelab.models.pretrained import load_denoiser
from facelab.sample import run_cell

HERE = Path(__file__).resolve().parent
ATTRIBUTES = ["Smiling", "Eyeglasses", "Male", "Young"]
SCALES = [-4, -2, -1, 0, 1, 2, 4]
FACES = {"seed": 0, "start": 900000}  # the default held-out faces of method=directions


def run(name: str, overrides: list[str], root: Path) -> tuple[dict, Path]:
    """One `method=directions` cell under root/name; a finished cell with the same overrides is read back."""
    out = root / name
    if not (out / "cell.json").is_file():
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(overrides)}", flush=True)
    return run_cell(out, ["method=directions", "progress=false", *overrides]), out


def discovered(root: Path, attribute: str, condition: str | None = None) -> Path:
    """The file of the supervised direction of `attribute`, or the conditional one with `condition` projected out
    (index 0; index 1 is the primal direction)."""
    if condition is None:
        _, run_dir = run(f"supervised_{attribute}", ["discover=supervised", f"attribute={attribute}",
                                                     "num_directions=1", "method.edit_seeds=1"], root)
    else:
        _, run_dir = run(f"conditional_{attribute}_{condition}", [
            "discover=conditional", f"attribute={attribute}", f"condition=[{condition}]", "num_directions=1",
            "method.edit_seeds=1"], root)
    return run_dir / "directions.safetensors"


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean() / 4))


def supervised(args, root: Path) -> dict:
    """P_eval(attribute) per scale, and the entanglement with the other attributes."""
    results = {}
    for attribute in ATTRIBUTES:
        applied, _ = run(f"apply_{attribute}", [f"apply={discovered(root, attribute)}", "index=0",
                                                f"scales=[{','.join(map(str, SCALES))}]", "seed=1000000",
                                                f"method.edit_seeds={args.seeds}", "batch_size=100"], root)
        curve = {s: applied["edits"]["0"][f"{s:g}"] for s in SCALES}
        p = [curve[s][attribute] for s in SCALES]
        others = [a for a in curve[0] if a != attribute]
        results[attribute] = {
            "p_attribute": dict(zip(map(str, SCALES), p)),
            "monotone": all(b >= a for a, b in zip(p, p[1:])),
            "crosses_half": min(p) < 0.5 < max(p),
            "mean_abs_dp_others_at_pm2": sum(abs(curve[2][a] - curve[-2][a]) for a in others) / len(others),
            "largest_other": max(others, key=lambda a: abs(curve[2][a] - curve[-2][a])),
            "curve": curve,
        }
        results[attribute]["largest_other_dp"] = curve[2][results[attribute]["largest_other"]] - \
            curve[-2][results[attribute]["largest_other"]]
    return results


def conditional(args, root: Path, supervised: dict) -> dict:
    """Each supervised direction before and after projecting out the attribute it moves most besides its own (and
    Wearing_Lipstick, women only in the prior, without Male): ΔP of the attribute, of the condition and the mean |ΔP|
    of all the others, scale −2 → +2."""
    pairs = [(a, supervised[a]["largest_other"]) for a in ATTRIBUTES] + [("Wearing_Lipstick", "Male")]
    results = {}
    for attribute, condition in pairs:
        applied, _ = run(f"apply_conditional_{attribute}_{condition}", [
            f"apply={discovered(root, attribute, condition)}", "index=[0,1]", "scales=[-2,2]", "seed=1000000",
            f"method.edit_seeds={args.seeds}", "batch_size=100"], root)
        row = {"condition": condition}
        for k, label in (("1", "primal"), ("0", "projected")):
            up, down = applied["edits"][k]["2"], applied["edits"][k]["-2"]
            others = [a for a in up if a not in (attribute, condition)]
            row[label] = {"dP_attribute": up[attribute] - down[attribute],
                          "dP_condition": up[condition] - down[condition],
                          "mean_abs_dP_others": sum(abs(up[a] - down[a]) for a in others) / len(others)}
        results[attribute] = row
    return results


def counterfactuals(args, root: Path, supervised: dict) -> dict:
    """Edit inverted held-out faces toward the opposite value of each attribute with its supervised and conditional
    directions; compare with the renderer's ground-truth counterfactual of the same face."""
    faces = SyntheticFaces(64, args.faces, FACES["seed"], start=FACES["start"])
    scale, results = 2.0, {"faces": args.faces, "scale": 2.0}
    for attribute in ATTRIBUTES:
        files = {"supervised": discovered(root, attribute),
                 "conditional": discovered(root, attribute, supervised[attribute]["largest_other"])}
        for label, file in files.items():
            _, run_dir = run(f"counterfactual_{label}_{attribute}", [
                f"apply={file}", "index=0", f"scales=[{-scale},0,{scale}]", "method.input=synthetic",
                f"method.edit_seeds={args.faces}"], root)
            rows = []
            for i in range(args.faces):
                item = faces[i]
                value = int(item["attributes"][faces.attribute_names.index(attribute)])
                target = faces.counterfactual(i, **{attribute: 1 - value})["image"]
                name = f"face{item['name']}"
                edit = read_image(run_dir / "edits" / f"{name}_0_{(-scale if value else scale):g}.png")
                recon = read_image(run_dir / "edits" / f"{name}_0_0.png")
                rows.append({"original_vs_cf": psnr(item["image"], target), "edit_vs_cf": psnr(edit, target),
                             "reconstruction": psnr(recon, item["image"])})
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            results[f"{label}_{attribute}"] = {
                **{f"psnr_{k}": round(v, 2) for k, v in mean.items()},
                "edit_closer_than_original": sum(r["edit_vs_cf"] > r["original_vs_cf"] for r in rows) / len(rows)}
    return results


def change_inside(run_dir: Path, name: str, index: int, scale: float, region: torch.Tensor) -> float:
    """Share of the pixel-change energy Σ_M|Δx|²/Σ|Δx|² of the edit at ±scale (both signs pooled)."""
    base = read_image(run_dir / "edits" / f"{name}_{index}_0.png")
    inside = total = 0.0
    for s in (-scale, scale):
        d = (read_image(run_dir / "edits" / f"{name}_{index}_{s:g}.png") - base).pow(2).sum(0)
        inside, total = inside + float((d * region).sum()), total + float(d.sum())
    return inside / max(total, 1e-12)


def jacobian(args, root: Path) -> dict:
    faces = SyntheticFaces(64, args.jacobian_faces, FACES["seed"], start=FACES["start"])
    scale, results = 1500, {}
    for region in ["mouth", "eye", "hair"]:
        rows = []
        for i in range(args.jacobian_faces):
            item, name = faces[i], f"face{faces[i]['name']}"
            mask = torch.isin(item["mask"], torch.tensor([SEG[c] for c in REGIONS[region]])).float()
            common = ["method.input=synthetic", "method.edit_seeds=1", f"seed={i}", f"scales=[{-scale},0,{scale}]",
                      "num_directions=1", "method.eval_classifier=null"]
            masked, masked_dir = run(f"jacobian_{region}_{i}", ["discover=jacobian", f"region={region}", *common], root)
            _, full_dir = run(f"jacobian_full_{region}_{i}", ["discover=jacobian", *common], root)
            found = Directions.load(masked_dir / "directions.safetensors")
            gen = torch.Generator().manual_seed(i)
            rand = torch.randn(found.basis.shape, generator=gen)
            rand = rand / rand.flatten(2).norm(dim=-1)[..., None, None, None]
            random = Directions(rand, found.scale, found.timesteps, found.meta)
            random.save(root / f"random_{region}_{i}.safetensors", overwrite=True)
            _, rand_dir = run(f"jacobian_random_{region}_{i}", [f"apply={root / f'random_{region}_{i}.safetensors'}",
                                                                 "index=0", *common], root)
            rows.append({"area": float(mask.mean()), "masked": change_inside(masked_dir, name, 0, scale, mask),
                         "unmasked": change_inside(full_dir, name, 0, scale, mask),
                         "random": change_inside(rand_dir, name, 0, scale, mask),
                         "passes": masked["network_passes"], "seconds": masked["discover_seconds"]})
        results[region] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    results["solver"] = solver_cost(args.solver_steps)
    return results


def solver_cost(steps: int = 10, k: int = 3) -> dict:
    """Block Krylov solver vs the reference's sequential power iteration on one inverted face's trajectory."""
    denoiser = load_denoiser("ddpm64")
    face = SyntheticFaces(64, 1, FACES["seed"], start=FACES["start"])[0]
    grid = denoiser.schedule.timesteps(steps).tolist()
    gen = torch.Generator().manual_seed(0)
    x_T, noises = edit_friendly_invert(denoiser, denoiser.schedule, face["image"][None], grid, eta=1.0,
                                       generator=gen, clip=True, progress=False)
    traj = run_trajectory(denoiser, x_T, noises, DDIM(steps, eta=1.0, spacing=None, clip=True), record_x=True)
    mask = torch.isin(face["mask"], torch.tensor([SEG[c] for c in REGIONS["mouth"]])).float()
    out = {}
    for label, solver in (("block", top_singular), ("reference", power_iteration_reference)):
        passes, start, sigmas = 0, time.perf_counter(), []
        for i, t in enumerate(grid):
            h, f = masked_eps_fn(denoiser, traj.x_ts[:, i], t, mask)
            result = solver(f, h, k=k, generator=torch.Generator().manual_seed(i))
            passes, sigmas = passes + result.passes, sigmas + [result.sigma]
        out[label] = {"passes": passes, "seconds": round(time.perf_counter() - start, 1),
                      "sigma": torch.stack(sigmas).T.tolist()}
    ref, blk = torch.tensor(out["reference"]["sigma"]), torch.tensor(out["block"]["sigma"])
    out["max_rel_sigma_difference"] = float(((ref - blk).abs() / blk).max())
    out["pass_ratio"] = out["reference"]["passes"] / out["block"]["passes"]
    out["time_ratio"] = out["reference"]["seconds"] / out["block"]["seconds"]
    return out


def pca(args, root: Path) -> dict:
    found, run_dir = run("pca", ["discover=pca", f"num_samples={args.pca_samples}", "num_directions=5",
                                 "scales=[-5,0,5]", "seed=1000000", f"method.edit_seeds={args.seeds // 2}",
                                 "batch_size=100"], root)
    ev = found["explained_variance"]
    pcs = {}
    for k, by_scale in found["edits"].items():
        moved = {a: by_scale["5"][a] - by_scale["-5"][a] for a in by_scale["0"]}
        top = max(moved, key=lambda a: abs(moved[a]))
        pcs[k] = {"attribute": top, "dP": round(moved[top], 3), "explained_t900": round(ev[int(k)][0], 3),
                  "explained_t0": round(ev[int(k)][-1], 3)}
    return {"num_samples": args.pca_samples, "explained_top5_per_step": [round(sum(ev[k][i] for k in range(5)), 3)
                                                                           for i in range(len(ev[0]))], "pcs": pcs}


def figures(root: Path, faces: int, sections: list[str]) -> None:
    """README pictures: supervised edits of two fresh seeds; inverted faces, their Male edits and the counterfactuals."""
    out = HERE / "figures"
    if "supervised" in sections:
        rows = [read_image(root / f"apply_{a}" / "edits" / f"seed{seed}_0_{s:g}.png")
                for seed in (1000000, 1000001) for a in ATTRIBUTES for s in SCALES]
        save_grid(torch.stack(rows), out / "supervised.png", nrow=len(SCALES), upscale=2)
    if "counterfactual" in sections:
        data, cells = SyntheticFaces(64, faces, FACES["seed"], start=FACES["start"]), []
        for i in range(min(faces, 6)):
            item, male = data[i], int(data[i]["attributes"][data.attribute_names.index("Male")])
            edits = root / "counterfactual_supervised_Male" / "edits"
            name = f"face{item['name']}"
            cells += [item["image"], read_image(edits / f"{name}_0_0.png"),
                      read_image(edits / f"{name}_0_{(-2 if male else 2):g}.png"),
                      data.counterfactual(i, Male=1 - male)["image"]]
        save_grid(torch.stack(cells), out / "counterfactual.png", nrow=4, upscale=2)


def table(results: dict) -> str:
    lines = ["# Semantic directions in h-space: measured", "",
             "Produced by `python experiments/directions/evaluate.py`; zoo `ddpm64`, 10 DDIM steps, η = 1 (index and edits), h = mid-block",
             "output (128×8×8). Discovery classifier `attr64`; every probability below is from the held-out `attr64_eval`.",
             "", "## Supervised directions: held-out P(attribute) against scale", "",
             "| direction | " + " | ".join(f"{s:g}" for s in SCALES) + " | monotone | crosses 0.5 | mean abs dP of the others, −2 → +2 | most entangled (dP) |",
             "|---|" + "---|" * (len(SCALES) + 4)]
    for a, r in results["supervised"].items():
        lines.append(f"| {a} | " + " | ".join(f"{v:.2f}" for v in r["p_attribute"].values()) +
                     f" | {'yes' if r['monotone'] else 'no'} | {'yes' if r['crosses_half'] else 'no'} | "
                     f"{r['mean_abs_dp_others_at_pm2']:.3f} | {r['largest_other']} ({r['largest_other_dp']:+.2f}) |")
    lines += ["", "## Conditional projection (scale −2 → +2)", "",
              "Each supervised direction before (primal) and after projecting out the attribute it moves most besides "
              "its own; others = mean |dP| over the remaining attributes.", "",
              "| direction | condition projected out | dP(attribute) primal → projected | dP(condition) primal → "
              "projected | others primal → projected |", "|---|---|---|---|---|"]
    for a, r in results["conditional"].items():
        p, c = r["primal"], r["projected"]
        lines.append(f"| {a} | {r['condition']} | {p['dP_attribute']:+.3f} → {c['dP_attribute']:+.3f} | "
                     f"{p['dP_condition']:+.3f} → {c['dP_condition']:+.3f} | {p['mean_abs_dP_others']:.3f} → "
                     f"{c['mean_abs_dP_others']:.3f} |")
    cf = results["counterfactual"]
    lines += ["", f"## Editing inverted faces against the ground-truth counterfactual ({cf['faces']} held-out faces, "
              f"edit-friendly inversion, scale ±{cf['scale']:g} toward the opposite value)", "",
              "| attribute | direction | reconstruction at scale 0 vs input | original vs counterfactual | "
              "edit vs counterfactual | faces where the edit is closer |", "|---|---|---|---|---|---|"]
    for key, r in cf.items():
        if isinstance(r, dict):
            label, attribute = key.split("_", 1)
            lines.append(f"| {attribute} | {label} | {r['psnr_reconstruction']:.1f} dB | "
                         f"{r['psnr_original_vs_cf']:.1f} dB | {r['psnr_edit_vs_cf']:.1f} dB | "
                         f"{r['edit_closer_than_original']:.0%} |")
    j = results["jacobian"]
    lines += ["", "## Jacobian directions: share of the pixel change inside the region", "",
              "| region | area | region-masked | unmasked | random Δh (equal norm) | passes per face | s per face |",
              "|---|---|---|---|---|---|---|"]
    for region in ("mouth", "eye", "hair"):
        r = j[region]
        lines.append(f"| {region} | {r['area']:.3f} | {r['masked']:.3f} | {r['unmasked']:.3f} | {r['random']:.3f} | "
                     f"{r['passes']:.0f} | {r['seconds']:.0f} |")
    s = j["solver"]
    lines += ["", "| solver (k = 3, 10 steps, mouth mask, one face) | network passes | seconds |", "|---|---|---|",
              f"| block Krylov (facelab) | {s['block']['passes']} | {s['block']['seconds']} |",
              f"| sequential power iteration (reference) | {s['reference']['passes']} | {s['reference']['seconds']} |",
              f"| ratio reference / facelab | {s['pass_ratio']:.1f}× | {s['time_ratio']:.1f}× |",
              "", f"Largest relative difference of the singular values found by the two: {s['max_rel_sigma_difference']:.3f}."]
    p = results["pca"]
    lines += ["", f"## PCA ({p['num_samples']} samples, per-step)", "",
              "Explained variance of the top 5 PCs per step (t = 900 … 0): " +
              ", ".join(f"{v:.2f}" for v in p["explained_top5_per_step"]), "",
              "| PC | attribute moving most (held-out, scale −5 → +5) | dP |", "|---|---|---|"]
    for k, r in p["pcs"].items():
        lines.append(f"| {k} | {r['attribute']} | {r['dP']:+.2f} |")
    return "\n".join(lines) + "\n"


SECTIONS = ("supervised", "conditional", "counterfactual", "jacobian", "pca")


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=100, help="fresh seeds per supervised edit curve")
    parser.add_argument("--faces", type=int, default=16, help="held-out faces for the counterfactual study")
    parser.add_argument("--jacobian-faces", type=int, default=3)
    parser.add_argument("--pca-samples", type=int, default=500)
    parser.add_argument("--solver-steps", type=int, default=10, help="grid steps of the solver comparison")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run these; the others are kept from results.json")
    parser.add_argument("--runs", type=Path, help="run folder (default outputs/experiments/directions/<time>); "
                                                  "finished cells of an earlier invocation are reused")
    args = parser.parse_args()
    root = args.runs or HERE.parents[1] / "outputs" / "experiments" / "directions" / time.strftime("%Y-%m-%d_%H-%M-%S")
    path = HERE / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    steps = {"supervised": supervised, "jacobian": jacobian, "pca": pca,  # conditional and counterfactual
             "conditional": lambda a, r: conditional(a, r, results["supervised"]),  # use the supervised results
             "counterfactual": lambda a, r: counterfactuals(a, r, results["supervised"])}
    for section in SECTIONS:
        if section in args.sections:
            results[section] = steps[section](args, root)
    figures(root, args.faces, args.sections)
    path.write_text(json.dumps(results, indent=2))
    (HERE / "results.md").write_text(table(results))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
