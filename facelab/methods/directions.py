"""`method=directions`: discover semantic directions in h-space and apply them to sampled or real faces.

  discover=pca          per-step PCA of h over `num_samples` samples (method.pca=joint: one PCA over all steps)
  discover=jacobian     top singular vectors of the (region-masked) ε Jacobian w.r.t. h along one face's own trajectory;
                        the region comes from ground-truth label maps, mask_path, or else the face parser
                        `method.parser` run on the face (a sample's own final image)
  discover=supervised   mean h of the top minus the bottom `num_examples` of an indexed set scored by a classifier
  discover=conditional  the supervised direction with the `condition` directions projected out exactly
  apply=FILE            decode with Δh_t = scale·direction_t added at every step, same x_T and per-step noise
Faces: method.input (samples: seeds; synthetic: held-out faces; images: gt_path, label maps mask_path) or +source=NAME;
images are inverted (method.inversion), which inverts the DDIM(η) step: sampler=ddim. Decoding runs the configured
sampler (method.sampler: DDIM, 10 steps, η = 1, the per-step noise fixed per face) over its grid; a grid that jumps
back (sampler=repaint) is refused. A discovery (facelab.directions.discoverers) writes `directions.safetensors`; both
write a grid per face (rows = directions, columns = scales), every image as edits/{face}_{direction}_{scale}.png, and
the held-out evaluation classifier's attribute probabilities per direction and scale in metrics.json.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from facelab.directions.discoverers import NATURAL_SCALES, Knobs, Setup, discover
from facelab.directions.files import Directions
from facelab.directions.trajectory import INVERSIONS, decode_scales, decoding_grid, start_of
from facelab.evaluators import AttributeEvaluator, SimilarityEvaluator
from facelab.guidance.base import refuse_guidance
from facelab.io.errors import InputError
from facelab.models.pretrained import load_denoiser, model_fingerprint
from facelab.runner import Runner
from facelab.sources import ImageFolderSource, ImageMaskSource, SeedSource, Source, SyntheticSource, build, named_as

INPUTS = ("samples", "synthetic", "images")
KNOBS = {"samples": {"source.seed": "seed", "source.count": "method.edit_seeds"},  # errors of the default sources
         "synthetic": {"source.count": "method.edit_seeds", "source.seed": "method.faces.seed"},
         "images": {"source.path": "gt_path", "source.label_maps": "mask_path"}}


@dataclass(frozen=True)
class Options:
    """cfg.method's faces and apply knobs, checked once (conf/method/directions.yaml documents every knob; the
    discovery knobs are facelab.directions.discoverers.Knobs)."""

    discover: str | None
    apply: str | None
    index: list[int]
    scales: list[float] | None
    num_directions: int
    gt_path: str | None
    label_path: str | None
    h_space: str
    input: str
    edit_seeds: int
    inversion: str
    faces: dict
    t_idx: int
    global_at_idx: bool | None
    window: int | None
    apply_svals: bool
    asyrp: bool
    eval_classifier: str | None

    @classmethod
    def from_cfg(cls, node: DictConfig) -> Options:
        values = OmegaConf.to_container(node, resolve=True)
        v = {f.name: values[f.name] for f in fields(cls)}
        if not v["discover"] and not v["apply"]:
            raise InputError("method=directions needs discover=pca|jacobian|supervised|conditional or apply=FILE")
        if v["scales"] is not None:
            try:
                v["scales"] = [float(s) for s in (v["scales"] if isinstance(v["scales"], list) else [v["scales"]])]
            except (TypeError, ValueError):
                raise InputError(f"scales={v['scales']}: give numbers, e.g. scales=[-5,0,5]") from None
        index = v["index"] if isinstance(v["index"], list) else [v["index"]]
        if v["apply"] and not all(isinstance(i, int) and not isinstance(i, bool) for i in index):  # no int(1.5) = 1
            raise InputError(f"index={v['index']}: give direction numbers, e.g. index=0 or index=[0,2]")
        v["index"] = index
        for key, allowed in (("input", INPUTS), ("inversion", INVERSIONS)):
            if v[key] not in allowed:
                raise InputError(f"method.{key}={v[key]}: use {' or '.join(allowed)}")
        return cls(**v)

    def default_source(self, seed: int) -> Source:
        """The faces method.input names: seeds seed.., held-out synthetic faces (method.faces) or gt_path's images."""
        if self.input == "samples":
            return SeedSource(seed, self.edit_seeds)
        if self.input == "synthetic":
            return SyntheticSource(self.edit_seeds, self.faces["seed"], self.faces["start"] + seed)
        if not self.gt_path:
            raise InputError("method.input=images needs gt_path=DIR (a folder of images at the model's size)")
        return ImageMaskSource(self.gt_path, label_maps=self.label_path) if self.label_path else \
            ImageFolderSource(self.gt_path)


def run(cfg: DictConfig, runner: Runner) -> dict:
    refuse_guidance(cfg, "method=directions", "it decodes every face with and without its directions from the same "
                    "x_T and noise, unguided (guidance=[hedit] applies a direction file in method=generate)")
    knobs, opts = Knobs.from_cfg(cfg.method), Options.from_cfg(cfg.method)
    composed = cfg.get("source") is not None
    source, names = (build(cfg.source), {}) if composed else (opts.default_source(cfg.seed), KNOBS[opts.input])
    with named_as(names):
        source.check()
    found = Directions.load(opts.apply) if opts.apply and not opts.discover else None
    denoiser = load_denoiser(cfg.model.pretrained, runner.device)
    sampler = runner.sampler()
    grid = decoding_grid(sampler, denoiser.schedule, not isinstance(source, SeedSource), opts.asyrp)
    model = {"model": str(cfg.model.pretrained), "fingerprint": model_fingerprint(denoiser), "h_space": opts.h_space}
    if found is not None:
        found.check(model["fingerprint"], opts.h_space, grid, opts.apply, denoiser.schedule)
    evaluator = AttributeEvaluator(opts.eval_classifier, cfg.batch_size, {"num": 0}, key="method.eval_classifier",
                                   name="method.eval_classifier", device=runner.device)
    index_classifier = knobs.classifier if opts.discover in ("supervised", "conditional") else \
        found and found.meta.get("params", {}).get("classifier")
    evaluator.check(denoiser.unet.config.sample_size, [index_classifier])
    calls = runner.count_calls(denoiser.unet)
    with named_as(names):
        inputs = source.load(denoiser.unet.config.sample_size)
    start = start_of(denoiser, sampler, inputs, opts.inversion, cfg.seed, runner.progress)
    metrics: dict = {}
    eta, directions = getattr(sampler, "eta", None), found
    if opts.discover:
        setup = Setup(knobs, denoiser, sampler, grid, start, cfg.num_samples, cfg.seed,
                      Path(cfg.paths.cache_dir) / "directions", runner.batches, runner.device, runner.progress,
                      label_origin="ground_truth" if isinstance(source, SyntheticSource) else "mask_path")
        with runner.timed("discover"):
            directions = discover(setup, metrics, model)
            path = directions.save(runner.out / "directions.safetensors")
        for stem, image in setup.pictures.items():
            runner.save_images(image[None], ".", names=[stem])
        metrics.update(discover_seconds=runner.seconds["discover"], directions_file=str(path))
    indices = list(range(min(opts.num_directions, len(directions)))) if opts.discover else opts.index
    scales = opts.scales or NATURAL_SCALES[directions.meta.get("method", "pca")]
    with runner.timed("apply"):
        metrics |= apply_directions(runner, opts, denoiser, start, grid, directions, indices, scales, evaluator)
    return metrics | {"apply_seconds": runner.seconds["apply"], "scales": scales, "indices": indices,
                      "method": directions.meta.get("method"), "steps": len(grid), "eta": eta,
                      "sampler": sampler.name, "network_calls": calls.count}


def apply_directions(runner: Runner, opts: Options, denoiser, start, grid: list[int], directions: Directions,
                     indices: list[int], scales: list[float], evaluator: AttributeEvaluator) -> dict:
    """Decode every face at every (direction, scale), one batch of scales per face; write images, grids and scores."""
    global_at_idx = directions.meta.get("global_at_idx", False) if opts.global_at_idx is None else opts.global_at_idx
    window = None if opts.window is None or opts.window >= len(grid) else int(opts.window)
    rows, results = {}, {"edits": {}}
    for first, _ in runner.batches(len(indices), 1, desc="directions"):
        k = indices[first]
        delta = directions.delta(k, opts.t_idx, global_at_idx, window, opts.apply_svals)
        rows[k] = images = decode_scales(denoiser, start, delta, scales, opts.h_space, opts.asyrp)
        for b, name in enumerate(start.names):
            runner.save_images(images[b], "edits", names=[f"{name}_{k}_{scale:g}" for scale in scales])
        if evaluator.enabled:
            results["edits"][str(k)] = {f"{scale:g}": {a: round(p, 4) for a, p in
                                                       evaluator.score(images[:, j])["probabilities"].items()}
                                        for j, scale in enumerate(scales)}
    every = torch.cat([rows[k][b] for b in range(len(start.names)) for k in indices])
    cols = [f"scale {scale:g}" for scale in scales]
    runner.grid(every, "grid.png", "all faces", f"rows = (face, direction), columns = scales {scales}",
                nrow=len(scales), upscale=2, cols=cols,
                rows=[f"{name} · direction {k}" for name in start.names for k in indices])
    for b, name in enumerate(start.names):
        if start.images is not None:
            runner.gallery.section(name).append(
                [("input", runner.save_images(start.images[b:b + 1].cpu(), "inputs", names=[name])[0])])
        runner.grid(torch.cat([rows[k][b] for k in indices]), f"grid_{name}.png", name,
                    f"{name}: rows = directions {indices}, columns = scales {scales}", nrow=len(scales), upscale=2,
                    rows=[f"direction {k}" for k in indices], cols=cols)
    if start.images is not None and 0.0 in scales:  # scale 0 must reproduce the inverted input
        decoded = rows[indices[0]][:, scales.index(0.0)]
        similarity = SimilarityEvaluator().score(decoded, start.images.cpu())
        results |= {"reconstruction_psnr": round(similarity["psnr"], 2),
                    "reconstruction_ssim": round(similarity["ssim"], 4)}
    return results
