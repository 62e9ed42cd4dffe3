"""How well method=fuzzy's anomaly map A finds known damage, by how A is made; writes anomaly.json and anomaly.md here.

    python experiments/fuzzy/anomaly.py [--parts maps correction] [--stats-n 128 1000] [--test 32] [--draws 4]
                                        [--blur 6] [--images 16] [--quick]

Part `maps` scores every way of making A below; part `correction` runs method=fuzzy's fast default end to end with
the shipped map and with the new one (its options: method.projection_step=1000, zscore_set=[100,200,300],
method.anomaly_blur=--blur), ood_lambda 0.3 and 0.5. Statistics files and runs are kept under
outputs/experiments/fuzzy/anomaly/ and reused by a rerun; a part not run keeps its earlier results in anomaly.json.

Test set: `--test` held-out synthetic faces (seed 0 from 900000), damaged by seeded self_degrade (true per-channel
damage D_c). Statistics: clean zoo-training faces (seed 0 from 0), one projection draw per face, as fuzzy_stats.
Model: the zoo's ddpm64 as shipped. Every option is scored by exact pixel-level AUROC and AP of A: per channel
against D_c (the `auroc`/`ap` of method=fuzzy's metrics.json, the README's 0.655) and per pixel (A averaged over
channels) against "any channel damaged". Options:
  projection  `ancestral50`: the shipped default (projection_step 50; the zoo's statistics, N=128), or `x0`: one
              network call per depth, the clipped x̂0(x_d) (projection_step ≥ depth; statistics computed here)
  N           statistics over the first N of the clean faces (nested prefixes)
  depths      which projection depths are fused
  draws K     the mean of the per-draw clamped z-scores ẑ over K projection noises (same statistics: draws are iid)
  space       pixels (e_d per channel), or a feature map of the face parser (parser64) or the attribute classifier
              (attr64) at one level: the mean over channels of (φ(y) − φ(ŷ_d))², upsampled bilinear to the image,
              z-scored against its own clean-face statistics; `padim`: no projection, the mean over channels of the
              squared z-score of φ(y) against the clean faces' per-location feature statistics
  blur        a Gaussian blur (σ px) of the z-scores before clamping (pixel-space local mean)
  A smoothed  a Gaussian blur (σ px) of A itself, after the clamp (method=fuzzy's method.anomaly_blur)
Costs are network calls per image (UNet rows; feature-network rows) and measured seconds per image on this machine.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from facelab.diffusion.projection import load_stats, project, projection_errors
from facelab.fuzzy_stats import compute_stats
from facelab.guidance.fuzzy import gaussian_blur
from facelab.metrics.anomaly import auroc_ap, self_degrade
from facelab.models.classifier import load_classifier
from facelab.models.parser import load_parser
from facelab.models.pretrained import load_denoiser, model_fingerprint
from facelab.sample import run_cell
from facelab.sources import SyntheticSource
from facelab.utils import compose_config

HERE = Path(__file__).resolve().parent
RUNS = HERE.parents[1] / "outputs" / "experiments" / "fuzzy" / "anomaly"  # statistics files and correction runs
DEPTHS = [50, 100, 200, 300]  # x0 projection depths (a quick run: 400-600 localise worse)
ANCESTRAL = [300, 400, 500, 600]  # the shipped default zscore_set
CHOSEN = [100, 200, 300]  # the correction part's x0 depths (the best 3-call set of the maps part)
L, U = 1.0, 6.0  # the default clamp of the z-scores


def parser_levels(net, x):
    """The face parser's encoder feature maps at 64, 32, 16 and 8 px (SegNet's down blocks)."""
    h, out = net.stem(x), []
    for block in net.down:
        h = block(h, None)
        out.append(h)
    return out


def attr_levels(net, x):
    """The attribute classifier's encoder feature maps at 32, 16, 8 and 4 px (its stride-2 blocks)."""
    h, out = net.encoder.stem(x), []
    for block in net.encoder.blocks:
        h = block(h, None)
        out.append(h)
    return out


class Moments:
    """Per-element mean and population std over batches (float64 sums: enough for these sizes)."""

    def __init__(self):
        self.n, self.s, self.s2 = 0, 0.0, 0.0

    def update(self, x):
        x = x.double()
        self.n, self.s, self.s2 = self.n + len(x), self.s + x.sum(0), self.s2 + (x ** 2).sum(0)

    def get(self):
        mean = self.s / self.n
        return mean, (self.s2 / self.n - mean ** 2).clamp(min=0).sqrt()


def feature_dists(nets, y_levels, yhat, size):
    """{space: [B, size, size]} squared feature distances of y (its feature maps `y_levels` {net: [level]}) and
    yhat [B,3,H,W], upsampled; levels 1 and 2 (the finest and coarsest levels localise worse: a quick run)."""
    out = {}
    for name, (net, levels) in nets.items():
        for k, (a, b) in enumerate(zip(y_levels[name], levels(net, yhat))):
            if k not in (1, 2):
                continue
            d = ((a - b) ** 2).mean(1, keepdim=True)
            out[f"{name}{k}"] = F.interpolate(d, size=size, mode="bilinear", align_corners=False)[:, 0]
    return out


def zhat(z, blur=0.0):
    """ẑ: the z-scores (blurred by σ = blur px first, if blur) clamped to [L, U] and scaled to [0, 1]."""
    z = gaussian_blur(z, blur)
    return (z.clamp(L, U) - L) / (U - L)


def scores(a, hit):
    """AUROC/AP per channel (a [B,C,H,W] or [B,1,H,W] broadcast) and per pixel (channel mean)."""
    a3 = a.expand_as(hit)
    auroc, ap = auroc_ap(a3, hit)
    auroc_px, ap_px = auroc_ap(a3.mean(1), hit.any(1))
    return {"auroc": round(auroc, 4), "ap": round(ap, 4), "auroc_pixel": round(auroc_px, 4), "ap_pixel": round(ap_px, 4)}


def pixel_stats(n: int, root: Path) -> Path:
    """The x0-projection statistics over n clean faces, by `python -m facelab.fuzzy_stats` (kept under root)."""
    out = root / f"stats_x0_N{n}.safetensors"
    if not out.is_file():
        compute_stats(compose_config("fuzzy_stats", [f"N={n}", "projection_step=1000", f"zscore_set={DEPTHS}",
                                                     "batch_size=50", "progress=false", f"out={out}"], root))
    return out


def ancestral_stats() -> Path:
    """The shipped convention's statistics (stride-50 ancestral projection, depths 300-600, N=128): the zoo's file
    before this study, as experiments/zoo/train_zoo.py made it (copied here, else recomputed the same way)."""
    out = RUNS / "stats_ancestral50_N128.safetensors"
    if not out.is_file():
        compute_stats(compose_config("fuzzy_stats", ["N=128", "batch_size=32", "projection_step=50",
                                                     f"zscore_set={ANCESTRAL}", "progress=false", f"out={out}"], RUNS))
    return out


def correction(root: Path, images: int, blur: float, n: int) -> dict:
    """method=fuzzy's fast default (mode=zscore, self_degrade) with the shipped map and with the new one, each an
    ordinary run (run_cell; AUROC/AP of A and PSNR/SSIM against the clean faces from its metrics.json)."""
    common = ["method=fuzzy", "model.pretrained=ddpm64", "mode=zscore", "self_degrade=true", f"num_samples={images}",
              f"batch_size={images}", "progress=false"]
    shipped = ["method.projection_step=50", f"zscore_set={ANCESTRAL}", f"zscore_path={ancestral_stats()}",
               "method.anomaly_blur=0"]
    new = ["method.projection_step=1000", f"zscore_set={CHOSEN}", f"zscore_path={pixel_stats(n, root)}",
           f"method.anomaly_blur={blur:g}"]
    cells = {"shipped map (ancestral50, depths 300-600, N=128), ood_lambda 0.3": shipped,
             f"x0 map (depths 100-300, N={n}, A smoothed σ={blur:g}), ood_lambda 0.3": new,
             f"x0 map (depths 100-300, N={n}, A smoothed σ={blur:g}), ood_lambda 0.5": [*new, "ood_lambda=0.5"]}
    keys = ("auroc", "ap", "auroc_pixel_max", "ap_pixel_max", "psnr_inside_after", "psnr_outside_after",
            "psnr_all_after", "ssim_inside_after", "projection_calls_per_image", "network_calls_per_image",
            "seconds_per_image")
    rows = {}
    for k, (label, extra) in enumerate(cells.items()):
        print(f"[{time.strftime('%H:%M:%S')}] correction: {label}", flush=True)
        metrics = run_cell(root / "correction" / f"cell{k}", [*common, *extra])
        rows[label] = {key: metrics[key] for key in keys}
        rows.setdefault("no correction (the damaged input)", {key: metrics[key.replace("_after", "_before")]
                                                              for key in keys if key.endswith("_after")})
    return {"images": images, "runs": str(root / "correction"), "cells": rows}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stats-n", type=int, nargs="+", default=[128, 1000])
    parser.add_argument("--feature-n", type=int, default=128, help="clean faces for the feature-space statistics")
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the script runs")
    parser.add_argument("--parts", nargs="+", choices=["maps", "correction"], default=["maps", "correction"])
    parser.add_argument("--blur", type=float, default=6.0, help="the new map's A smoothing σ in the correction part")
    parser.add_argument("--images", type=int, default=16, help="faces of the correction part")
    args = parser.parse_args()
    root = RUNS
    if args.quick:
        args.stats_n, args.feature_n, args.test, args.draws, root = [8, 12], 8, 4, 2, root / "quick"
    earlier = HERE / "anomaly.json"
    results = json.loads(earlier.read_text()) if earlier.is_file() and not args.quick else {}
    if "maps" in args.parts:
        results.update(maps(args, root))
    if "correction" in args.parts:
        results["correction"] = correction(root, 2 if args.quick else args.images, args.blur, max(args.stats_n))
    if not args.quick:
        earlier.write_text(json.dumps(results, indent=2))
        (HERE / "anomaly.md").write_text(markdown(results))
    print(markdown(results))
    return results


def maps(args, root: Path) -> dict:
    """Every option's AUROC/AP of A on the test faces (the module docstring)."""
    torch.set_grad_enabled(False)
    denoiser = load_denoiser("ddpm64", "cpu")
    size, fingerprint = denoiser.unet.config.sample_size, model_fingerprint(denoiser)
    nets = {"parser": (load_parser("parser64"), parser_levels), "attr": (load_classifier("attr64"), attr_levels)}
    clock = {"unet": 0.0, "features": 0.0}

    def timed(key, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        clock[key] += time.perf_counter() - t0
        return out

    # --- statistics over clean training faces (seed 0 from 0) -------------------------------------------------------
    started = time.time()
    # feature spaces: one x0 projection per face, its own noise
    gen = torch.Generator().manual_seed(1)
    faces = SyntheticSource(args.feature_n, seed=0, start=0).dataset(size)
    feat, padim = {}, {}
    for first in range(0, args.feature_n, 32):
        y = torch.stack([faces[i]["image"] for i in range(first, min(first + 32, args.feature_n))])
        yhat = project(denoiser, y, DEPTHS, torch.randn(y.shape, generator=gen), gen, True, 1000)
        y_levels = {name: levels(net, y) for name, (net, levels) in nets.items()}
        dists = [feature_dists(nets, y_levels, yhat[:, k], size) for k in range(len(DEPTHS))]
        for space in dists[0]:
            feat.setdefault(space, Moments()).update(torch.stack([d[space] for d in dists], 1))
        for name in nets:
            for k, f in enumerate(y_levels[name]):
                padim.setdefault(f"{name}{k}", Moments()).update(f)
        print(f"[{time.time() - started:6.0f}s] feature statistics {first + len(y)}/{args.feature_n}", flush=True)

    # --- test faces -------------------------------------------------------------------------------------------------
    source = SyntheticSource(args.test, seed=0, start=900000)
    clean = source.load(size).images
    y, hit = self_degrade(clean, torch.Generator().manual_seed(2))
    tgen = torch.Generator().manual_seed(3)
    errs, fdists = [], []
    y_levels = {name: levels(net, y) for name, (net, levels) in nets.items()}
    for _ in range(args.draws):
        yhat = timed("unet", project, denoiser, y, DEPTHS, torch.randn(y.shape, generator=tgen), tgen, True, 1000)
        errs.append(projection_errors(y, yhat))
        dd = [timed("features", feature_dists, nets, y_levels, yhat[:, k], size) for k in range(len(DEPTHS))]
        fdists.append({space: torch.stack([d[space] for d in dd], 1) for space in dd[0]})
    x0_unet_s = clock["unet"] / (args.test * args.draws * len(DEPTHS))  # per image and network call
    feat_s = clock["features"] / (args.test * args.draws * len(DEPTHS))
    errs = torch.stack(errs, 1)  # [B, K, D, C, H, W]
    print(f"[{time.time() - started:6.0f}s] test projections", flush=True)

    t0 = time.perf_counter()
    anc = project(denoiser, y, ANCESTRAL, torch.randn(y.shape, generator=tgen), tgen, True, 50)
    anc_s = (time.perf_counter() - t0) / args.test
    zoo_mean, zoo_std, zoo_meta = load_stats(ancestral_stats(), fingerprint, size, "ddpm64", ANCESTRAL, True, 50)
    anc_z = (projection_errors(y, anc).double() - zoo_mean) / zoo_std.clamp(min=1e-6)
    print(f"[{time.time() - started:6.0f}s] test projections, ancestral", flush=True)
    t0 = time.time()
    snaps = {n: load_stats(pixel_stats(n, root), fingerprint, size, "ddpm64", DEPTHS, True, 1000)[:2]
             for n in args.stats_n}
    stats_seconds = time.time() - t0  # 0 where earlier runs' files are reused

    rows = []

    def add(label, a, calls, seconds, **extra):
        row = {"option": label, **scores(a.float(), hit), "unet_calls": calls, "s_per_image": round(seconds, 3), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # shipped default
    add("shipped: ancestral50, depths 300-600, N=128 (zoo), K=1", zhat(anc_z).mean(1), 36, anc_s)
    for blur in (1.0, 2.0):
        add(f"ancestral50, blur σ={blur:g}", zhat(anc_z, blur).mean(1), 36, anc_s)

    def pixel_z(n):
        mean, std = snaps[n]
        return (errs.double() - mean) / std.clamp(min=1e-6)  # [B, K, D, C, H, W]

    def pick(depths):
        return [DEPTHS.index(d) for d in depths]

    cost = x0_unet_s
    prefixes = sorted(snaps)
    full = max(prefixes)
    z_full = pixel_z(full)
    # (a) statistics size N, x0 projection, default depths, one draw
    shallow = [50, 100, 200, 300]
    for n, blur in itertools.product(prefixes, (0.0, 3.0)):
        z = pixel_z(n) if n != full else z_full
        add(f"x0, depths 50-300, N={n}, K=1, blur σ={blur:g}", zhat(z[:, :1, pick(shallow)], blur).mean((1, 2)),
            4, 4 * cost, N=n, blur=blur)
    # single depths
    for d in DEPTHS:
        add(f"x0, depth {d}, N={full}, K=1", zhat(z_full[:, 0, pick([d])]).mean(1), 1, cost)
    # (b) ensembles over depths and draws
    depth_sets = {"50-200": [50, 100, 200], "100-300": [100, 200, 300], "50-300": [50, 100, 200, 300],
                  "200-300": [200, 300]}
    for (label, ds), k in itertools.product(depth_sets.items(), sorted({1, 2, 4, args.draws} & {*range(args.draws + 1)})):
        add(f"x0, depths {label}, N={full}, K={k}", zhat(z_full[:, :k, pick(ds)]).mean((1, 2)), k * len(ds),
            k * len(ds) * cost, depths=ds, draws=k)
    # blur of the pixel z-scores
    for (label, ds), blur, k in itertools.product(depth_sets.items(), (1.0, 2.0, 3.0, 4.0, 6.0), sorted({1, min(4, args.draws), args.draws})):
        add(f"x0, depths {label}, N={full}, K={k}, blur σ={blur:g}", zhat(z_full[:, :k, pick(ds)], blur).mean((1, 2)),
            k * len(ds), k * len(ds) * cost, depths=ds, draws=k, blur=blur)

    # smoothing A itself (the blur after the clamp: what method=fuzzy's anomaly_blur does)
    for (label, ds), blur, k in itertools.product(depth_sets.items(), (2.0, 3.0, 4.0, 6.0), (1, args.draws)):
        add(f"x0, depths {label}, N={full}, K={k}, A smoothed σ={blur:g}",
            gaussian_blur(zhat(z_full[:, :k, pick(ds)]).mean((1, 2)), blur), k * len(ds), k * len(ds) * cost, depths=ds,
            draws=k, smooth=blur)
    add("shipped + A smoothed σ=3", gaussian_blur(zhat(anc_z).mean(1), 3.0), 36, anc_s)

    # (c) feature spaces: distance of y and its projection, z-scored against clean statistics
    for space, m in feat.items():
        mean, std = m.get()
        z = (torch.stack([f[space] for f in fdists], 1).double() - mean) / std.clamp(min=1e-12)  # [B, K, D, H, W]
        for (label, ds), k in itertools.product(depth_sets.items(), (1, args.draws)):
            add(f"feature {space}, depths {label}, K={k}", zhat(z[:, :k, pick(ds)]).mean((1, 2))[:, None],
                k * len(ds), k * len(ds) * (cost + 2 * feat_s), space=space, depths=ds, draws=k)
        if space == "parser2":
            pixel_a = zhat(z_full[:, :1, pick(shallow)], 3.0).mean((1, 2))
            add(f"x0 pixels (depths 50-300, blur σ=3) + feature {space} (depths 50-300), K=1, mean",
                (pixel_a + zhat(z[:, :1, pick(shallow)]).mean((1, 2))[:, None]) / 2, 4, 4 * (cost + 2 * feat_s))
    # PaDiM-style: no projection, per-location feature z-scores of the input itself
    for space, m in padim.items():
        mean, std = m.get()
        name, level = space[:-1], int(space[-1])
        f = y_levels[name][level]
        d = (((f.double() - mean) / std.clamp(min=1e-6)) ** 2).mean(1, keepdim=True)
        d = F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        add(f"padim {space} (no projection)", d / (1 + d), 0, feat_s, space=space)

    return {"model": "ddpm64", "test_faces": args.test, "stats_faces": args.stats_n, "draws": args.draws,
            "feature_stats_faces": args.feature_n, "depths": DEPTHS, "zoo_stats_N": zoo_meta["N"],
            "damaged_fraction": hit.float().mean().item(), "seconds_per_unet_call": round(x0_unet_s, 4),
            "seconds_per_feature_pair": round(feat_s, 4), "stats_seconds": round(stats_seconds, 1), "rows": rows}


COLUMNS = "| option | AUROC | AP | AUROC pixel | AP pixel | UNet calls / image | s / image |\n|---|---:|---:|---:|---:|---:|---:|"


def row_line(r: dict) -> str:
    return (f"| {r['option']} | {r['auroc']:.3f} | {r['ap']:.3f} | {r['auroc_pixel']:.3f} | {r['ap_pixel']:.3f} | "
            f"{r['unet_calls']} | {r['s_per_image']:.2f} |")


def findings(rows: list[dict]) -> list[str]:
    """One line per question of the study, each from the rows (per-channel AUROC)."""
    def top(prefix):
        found = [r for r in rows if r["option"].startswith(prefix)]
        return max(found, key=lambda r: r["auroc"]) if found else None

    lines = []
    ns = sorted((r["N"], r["auroc"]) for r in rows if "N" in r and r.get("blur") == 0.0)
    if ns:
        lines.append("- statistics size (x0, depths 50-300, no smoothing): " +
                     ", ".join(f"N={n}: {a:.3f}" for n, a in ns))
    draws = [(r["draws"], r["auroc"]) for r in rows if r["option"].startswith("x0, depths 100-300") and
             "blur" not in r and "smooth" not in r]
    if draws:
        lines.append("- noise draws K (x0, depths 100-300, no smoothing): " +
                     ", ".join(f"K={k}: {a:.3f}" for k, a in draws))
    single = [r for r in rows if r["option"].startswith("x0, depth ")]
    if single:
        lines.append("- single depths (x0): " + ", ".join(f"{r['option'].split(',')[1].strip()}: {r['auroc']:.3f}"
                                                        for r in single))
    for label, prefix in (("blurred z-scores", "x0, depths 100-300, N=1000, K=1, blur"),
                          ("smoothed A", "x0, depths 100-300, N=1000, K=1, A smoothed"),
                          ("feature space (projection distance)", "feature"), ("feature space (PaDiM)", "padim")):
        best = top(prefix)
        if best:
            lines.append(f"- best {label}: {best['option']}: {best['auroc']:.3f} (AP {best['ap']:.3f})")
    combined = [r for r in rows if "+ feature" in r["option"]]
    if combined:
        lines.append(f"- {combined[0]['option']}: {combined[0]['auroc']:.3f} (AP {combined[0]['ap']:.3f})")
    return lines


def markdown(results: dict) -> str:
    lines = []
    if "rows" in results:
        rows = results["rows"]
        best = max(rows, key=lambda r: r["auroc"])
        cheap = max((r for r in rows if r["unet_calls"] <= 4), key=lambda r: r["auroc"])
        lines += [f"Anomaly map A of method=fuzzy on `{results['model']}` (the zoo's, unchanged): {results['test_faces']} "
                  f"held-out synthetic faces with seeded self_degrade damage ({results['damaged_fraction']:.1%} of "
                  f"the values); statistics over {results['stats_faces']} clean training faces (features: "
                  f"{results['feature_stats_faces']}). AUROC / AP: per channel against the damaged channels (the "
                  "metric of results.md); pixel: A averaged over channels against any damaged channel. s / image: "
                  f"this 2-core CPU, shared (≈ {results['seconds_per_unet_call']} s per UNet call and image).", "",
                  "Headline (the shipped map; the best at ≤ 4 UNet calls; the best):", "", COLUMNS, row_line(rows[0]),
                  row_line(cheap), row_line(best), "", *findings(rows), "",
                  "Every option (`python experiments/fuzzy/anomaly.py`; options in its docstring):", "", COLUMNS]
        lines += [row_line(r) for r in rows]
        lines.append("")
    if "correction" in results:
        part = results["correction"]
        lines += [f"Correction with each map: method=fuzzy's fast sampler (DDIM η=1, 50 steps), mode=zscore, "
                  f"self_degrade, {part['images']} held-out faces: the faces and damage of results.md's correction table "
                  f"(ordinary runs: {part['runs']}); PSNR (dB) / SSIM against the clean face. The first row is "
                  "results.md's fast default, re-run. The third is the new default (the zoo's statistics are "
                  "stats_x0_N1000). s / image: a shared 2-core CPU, noisy.", "",
                  "| run | AUROC | AP | PSNR inside | PSNR outside | PSNR whole | SSIM inside | projection calls / image "
                  "| network calls / image | s / image |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        formats = {"auroc": ".3f", "ap": ".3f", "psnr_inside_after": ".2f", "psnr_outside_after": ".2f",
                   "psnr_all_after": ".2f", "ssim_inside_after": ".3f", "projection_calls_per_image": "g",
                   "network_calls_per_image": "g", "seconds_per_image": ".2f"}
        for label, m in part["cells"].items():
            lines.append(f"| {label} | " + " | ".join(format(m[key], fmt) if key in m else ""
                                                      for key, fmt in formats.items()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
