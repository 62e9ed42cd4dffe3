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
back (sampler=repaint) is refused. A discovery writes `directions.safetensors` and previews its directions; both write a
grid per face (rows = directions, columns = scales), every image as edits/{face}_{direction}_{scale}.png, and the
held-out evaluation classifier's attribute probabilities per direction and scale in metrics.json.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from facelab.diffusion import DDIM, Denoiser, Sampler
from facelab.directions import discover as maths
from facelab.directions.files import Directions
from facelab.directions.index import check_heads, index_samples
from facelab.directions.jacobian import trajectory_jacobian
from facelab.directions.regions import parser_labels, region_classes, region_mask, region_parser
from facelab.directions.trajectory import INVERSIONS, Start, decode_scales, decoding_grid, run_trajectory, start_of
from facelab.evaluators import AttributeEvaluator, SimilarityEvaluator
from facelab.guidance.base import refuse_guidance
from facelab.io.errors import InputError
from facelab.io.images import save_image
from facelab.models.classifier import load_classifier
from facelab.models.pretrained import load_denoiser, model_fingerprint
from facelab.runner import Runner
from facelab.sources import ImageFolderSource, ImageMaskSource, SeedSource, Source, SyntheticSource, build, named_as

DISCOVER = ("pca", "jacobian", "supervised", "conditional")
INPUTS = ("samples", "synthetic", "images")
KNOBS = {"samples": {"source.seed": "seed", "source.count": "method.edit_seeds"},  # errors of the default sources
         "synthetic": {"source.count": "method.edit_seeds", "source.seed": "method.faces.seed"},
         "images": {"source.path": "gt_path", "source.label_maps": "mask_path"}}
# default `scales` per method, measured on the zoo model (the reference's ±5, ±50-100 and ±1 were for the 256 px
# model; on ddpm64 Jacobian singular values are ~0.02 and supervised edits cross P = 0.5 at about 2)
NATURAL_SCALES = {"pca": [-5, -2.5, 0, 2.5, 5], "jacobian": [-1500, -750, 0, 750, 1500],
                  "supervised": [-4, -2, 0, 2, 4], "conditional": [-4, -2, 0, 2, 4]}


@dataclass(frozen=True)
class Options:
    """cfg.method, checked once (conf/method/directions.yaml documents every knob)."""

    discover: str | None
    apply: str | None
    index: list[int]
    scales: list[float] | None
    num_directions: int
    region: str | list[str] | None
    attribute: str | None
    condition: list[str]
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
    pca: str
    num_svectors: int
    index_offset: int
    num_eigvecs: int
    tol: float
    max_iters: int
    parser: str | None
    classifier: str
    idx_size: int
    num_examples: int
    balance_gender: bool
    index_eta: float
    eval_classifier: str | None

    @classmethod
    def from_cfg(cls, node: DictConfig) -> Options:
        values = OmegaConf.to_container(node, resolve=True)
        v = {f.name: values[f.name] for f in fields(cls)}
        if v["discover"] not in (None, *DISCOVER):
            raise InputError(f"discover={v['discover']}: use one of {', '.join(DISCOVER)}")
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
        v["condition"] = [v["condition"]] if isinstance(v["condition"], str) else list(v["condition"] or [])
        for key, allowed in (("input", INPUTS), ("inversion", INVERSIONS), ("pca", ("per_t", "joint"))):
            if v[key] not in allowed:
                raise InputError(f"method.{key}={v[key]}: use {' or '.join(allowed)}")
        if v["discover"] in ("supervised", "conditional") and not v["attribute"]:
            raise InputError(f"discover={v['discover']} needs attribute=NAME (e.g. attribute=Smiling)")
        if v["discover"] == "conditional" and not v["condition"]:
            raise InputError("discover=conditional needs condition=[NAME,...] (e.g. condition=[Male])")
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


@dataclass
class Setup:
    """What the discoverers and apply share: the run, its options, the model, the sampler and the faces."""

    cfg: DictConfig
    opts: Options
    runner: Runner
    denoiser: Denoiser
    sampler: Sampler
    grid: list[int]
    start: Start | None = None
    label_origin: str = "mask_path"  # where the faces' label maps come from

    @property
    def resolution(self) -> int:
        return self.denoiser.unet.config.sample_size


def run(cfg: DictConfig, runner: Runner) -> dict:
    refuse_guidance(cfg, "method=directions", "it decodes every face with and without its directions from the same "
                    "x_T and noise, unguided (guidance=[hedit] applies a direction file in method=generate)")
    opts = Options.from_cfg(cfg.method)
    composed = cfg.get("source") is not None
    source, knobs = (build(cfg.source), {}) if composed else (opts.default_source(cfg.seed), KNOBS[opts.input])
    with named_as(knobs):
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
    index_classifier = opts.classifier if opts.discover in ("supervised", "conditional") else \
        found and found.meta.get("params", {}).get("classifier")
    evaluator.check(denoiser.unet.config.sample_size, [index_classifier])
    calls = runner.count_calls(denoiser.unet)
    setup = Setup(cfg, opts, runner, denoiser, sampler, grid,
                  label_origin="ground_truth" if isinstance(source, SyntheticSource) else "mask_path")
    with named_as(knobs):
        inputs = source.load(setup.resolution)
    setup.start = start_of(denoiser, sampler, inputs, opts.inversion,
                           torch.Generator(runner.device).manual_seed(int(cfg.seed)), runner.progress)
    metrics: dict = {}
    eta, directions = getattr(sampler, "eta", None), found
    if opts.discover:
        with runner.timed("discover"):
            directions = DISCOVERERS[opts.discover](setup, metrics)
            directions.meta.update(model, timesteps=grid, eta=eta, method=opts.discover, seed=cfg.seed,
                                   sampler=sampler.name)
            path = directions.save(runner.out / "directions.safetensors")
        metrics.update(discover_seconds=runner.seconds["discover"], directions_file=str(path))
    indices = list(range(min(opts.num_directions, len(directions)))) if opts.discover else opts.index
    scales = opts.scales or NATURAL_SCALES[directions.meta.get("method", "pca")]
    with runner.timed("apply"):
        metrics |= apply_directions(setup, directions, indices, scales, evaluator)
    return metrics | {"apply_seconds": runner.seconds["apply"], "scales": scales, "indices": indices,
                      "method": directions.meta.get("method"), "steps": len(grid), "eta": eta,
                      "sampler": sampler.name, "network_calls": calls.count}


# ----------------------------------------------------------------------------------------------- discovery
def index(setup: Setup, seeds: list[int], sampler, classifier=None) -> dict:
    """The (cached) index of the trajectories of `seeds` (directions.index), in the run's batches."""
    return index_samples(setup.denoiser, sampler, setup.opts.h_space, seeds,
                         setup.runner.batches(len(seeds), desc="indexing samples"), classifier,
                         Path(setup.cfg.paths.cache_dir) / "directions")


def discover_pca(setup: Setup, metrics: dict) -> Directions:
    opts, num_samples = setup.opts, setup.cfg.num_samples
    hs = index(setup, list(range(opts.index_offset, opts.index_offset + num_samples)), setup.sampler)["hs"]
    basis, std, ratio = {"per_t": maths.pca_per_t, "joint": maths.pca_joint}[opts.pca](hs, opts.num_svectors)
    metrics["explained_variance"] = ratio.tolist()
    return Directions(basis, std, setup.grid, {"params": {"num_samples": num_samples, "pca": opts.pca}},
                      {"explained_variance": ratio})


def discover_jacobian(setup: Setup, metrics: dict) -> Directions:
    opts, start = setup.opts, setup.start
    classes = region_classes(opts.region)
    parser = region_parser(opts.parser, setup.runner.device) if classes and start.labels is None else None
    traj = run_trajectory(setup.denoiser, start.x_T[:1], start.noises[:, :1], start.sampler, where=opts.h_space,
                          record_x=True)
    image = (traj.x0 if start.images is None else start.images)[0]  # a sample's own final image
    mask = origin = None
    if classes:
        labels = start.labels[0] if parser is None else parser_labels(parser, image)
        origin = setup.label_origin if parser is None else f"parser:{opts.parser}"
        mask = region_mask(labels, classes, opts.region, origin, start.names[0])
    sigma, v, passes = trajectory_jacobian(setup.denoiser, traj.x_ts[0][:, None], setup.grid, mask,
                                           k=opts.num_eigvecs, where=opts.h_space, tol=opts.tol,
                                           max_iters=opts.max_iters, progress=setup.runner.progress,
                                           generator=torch.Generator().manual_seed(int(setup.cfg.seed)))
    metrics.update(network_passes=passes, singular_values=sigma.tolist(), source=start.names[0], mask=origin)
    if mask is not None:
        mask = mask.to(image.device)
        save_image(image * mask + (1 - mask) * -1, setup.runner.out / "masked_source.png")
    params = {"region": opts.region, "mask": origin, "source": start.names[0], "num_eigvecs": opts.num_eigvecs}
    return Directions(v, sigma, setup.grid, {"params": params, "global_at_idx": True})


def discover_supervised(setup: Setup, metrics: dict) -> Directions:
    opts, attribute = setup.opts, setup.opts.attribute
    conditions = opts.condition if opts.discover == "conditional" else []
    heads = {c: f"condition=[{c}]" for c in conditions} | ({"Male": "method.balance_gender=true"}
                                                            if opts.balance_gender else {})
    classifier = load_classifier(opts.classifier, setup.runner.device)
    check_heads(classifier, {**heads, attribute: f"attribute={attribute}"}, opts.classifier, setup.resolution)
    sampler = replace(setup.sampler, eta=opts.index_eta) if isinstance(setup.sampler, DDIM) else setup.sampler
    found = index(setup, list(range(opts.index_offset, opts.index_offset + opts.idx_size)), sampler, classifier)
    try:
        vectors, kept = maths.supervised_directions(found, attribute, conditions, opts.num_examples,
                                                    opts.balance_gender)
    except ValueError as err:
        raise InputError(f"{err} (method.idx_size={opts.idx_size})") from None
    if kept is not None:
        metrics["kept_norm_fraction"] = kept
    params = {"attribute": attribute, "idx_size": opts.idx_size, "num_examples": opts.num_examples,
              "classifier": opts.classifier, "balance_gender": opts.balance_gender}
    basis, scale = maths.as_directions(vectors)
    return Directions(basis, scale, setup.grid, {"params": params | ({"condition": conditions} if conditions else {})})


DISCOVERERS = {"pca": discover_pca, "jacobian": discover_jacobian, "supervised": discover_supervised,
               "conditional": discover_supervised}


# ----------------------------------------------------------------------------------------------- apply
def apply_directions(setup: Setup, directions: Directions, indices: list[int], scales: list[float],
                     evaluator: AttributeEvaluator) -> dict:
    """Decode every face at every (direction, scale), one batch of scales per face; write images, grids and scores."""
    opts, start, runner, out = setup.opts, setup.start, setup.runner, setup.runner.out
    global_at_idx = directions.meta.get("global_at_idx", False) if opts.global_at_idx is None else opts.global_at_idx
    window = None if opts.window is None or opts.window >= len(setup.grid) else int(opts.window)
    rows, results = {}, {"edits": {}}
    for first, _ in runner.batches(len(indices), 1, desc="directions"):
        k = indices[first]
        delta = directions.delta(k, opts.t_idx, global_at_idx, window, opts.apply_svals)
        rows[k] = images = decode_scales(setup.denoiser, start, delta, scales, opts.h_space, opts.asyrp)
        for b, name in enumerate(start.names):
            for j, scale in enumerate(scales):
                save_image(images[b, j], out / "edits" / f"{name}_{k}_{scale:g}.png")
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
                [("input", save_image(start.images[b].cpu(), out / "inputs" / f"{name}.png"))])
        runner.grid(torch.cat([rows[k][b] for k in indices]), f"grid_{name}.png", name,
                    f"{name}: rows = directions {indices}, columns = scales {scales}", nrow=len(scales), upscale=2,
                    rows=[f"direction {k}" for k in indices], cols=cols)
    if start.images is not None and 0.0 in scales:  # scale 0 must reproduce the inverted input
        decoded = rows[indices[0]][:, scales.index(0.0)]
        similarity = SimilarityEvaluator().score(decoded, start.images.cpu())
        results |= {"reconstruction_psnr": round(similarity["psnr"], 2),
                    "reconstruction_ssim": round(similarity["ssim"], 4)}
    return results
