"""Direction discovery as method=directions runs it: each discoverer builds a `Directions` for the run's model, sampler
grid and faces from the discovery knobs of conf/method/directions.yaml, and records what it measured in `metrics`.

  pca          per-step PCA of h over `num_samples` sampled trajectories (pca=joint: one PCA over all steps)
  jacobian     top singular vectors of the (region-masked) ε Jacobian w.r.t. h along one face's own trajectory; the
               region comes from the face's label maps, else the face parser `parser` run on the face
  supervised   mean h of the top minus the bottom `num_examples` of an indexed set scored by a classifier
  conditional  the supervised direction with the `condition` directions projected out exactly
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

from facelab.diffusion import DDIM, Denoiser, Sampler
from facelab.io.errors import InputError
from facelab.models.classifier import load_classifier

from . import discover as maths
from .files import DISCOVERY_METHODS, Directions
from .index import check_heads, index_samples
from .jacobian import METHODS as JACOBIAN_SOLVERS
from .jacobian import trajectory_jacobian
from .regions import parser_labels, region_classes, region_mask, region_parser
from .trajectory import Start, run_trajectory

# default `scales` per method, measured on the zoo model (the reference's ±5, ±50-100 and ±1 were for the 256 px
# model; on ddpm64 Jacobian singular values are ~0.02 and supervised edits cross P = 0.5 at about 2)
NATURAL_SCALES = {"pca": [-5, -2.5, 0, 2.5, 5], "jacobian": [-1500, -750, 0, 750, 1500],
                  "supervised": [-4, -2, 0, 2, 4], "conditional": [-4, -2, 0, 2, 4]}


@dataclass(frozen=True)
class Knobs:
    """The discovery knobs of cfg.method (conf/method/directions.yaml), checked once (`from_cfg`)."""

    discover: str | None
    h_space: str
    region: str | list[str] | None
    attribute: str | None
    condition: list[str]
    pca: str
    num_svectors: int
    index_offset: int
    num_eigvecs: int
    jacobian_solver: str
    tol: float | None
    max_iters: int
    parser: str | None
    classifier: str
    idx_size: int
    num_examples: int
    balance_gender: bool
    index_eta: float

    @classmethod
    def from_cfg(cls, node) -> Knobs:
        values = OmegaConf.to_container(node, resolve=True)
        v = {f.name: values[f.name] for f in fields(cls)}
        if v["discover"] not in (None, *DISCOVERY_METHODS):
            raise InputError(f"discover={v['discover']}: use one of {', '.join(DISCOVERY_METHODS)}")
        v["condition"] = [v["condition"]] if isinstance(v["condition"], str) else list(v["condition"] or [])
        if v["jacobian_solver"] not in JACOBIAN_SOLVERS:
            raise InputError(f"method.jacobian_solver={v['jacobian_solver']}: use one of {', '.join(JACOBIAN_SOLVERS)}")
        if v["tol"] is None:
            v["tol"] = 0.2 if v["jacobian_solver"] == "golub_kahan" else 1e-5
        if v["pca"] not in ("per_t", "joint"):
            raise InputError(f"method.pca={v['pca']}: use per_t or joint")
        if v["discover"] in ("supervised", "conditional") and not v["attribute"]:
            raise InputError(f"discover={v['discover']} needs attribute=NAME (e.g. attribute=Smiling)")
        if v["discover"] == "conditional" and not v["condition"]:
            raise InputError("discover=conditional needs condition=[NAME,...] (e.g. condition=[Male])")
        return cls(**v)


@dataclass
class Setup:
    """What the discoverers share: their knobs, the model, the sampler and its grid, the faces' start, and the run's
    sample count, seed, index cache, batches (Runner.batches), device and progress setting. `pictures` collects the
    images a discovery shows ({file stem: image}; the method writes them)."""

    knobs: Knobs
    denoiser: Denoiser
    sampler: Sampler
    grid: list[int]
    start: Start
    num_samples: int
    seed: int
    cache_dir: Path
    batches: Callable[..., Iterable[tuple[int, int]]]
    device: torch.device
    progress: bool = False
    label_origin: str = "mask_path"  # where the faces' label maps come from
    pictures: dict[str, Tensor] = field(default_factory=dict)

    @property
    def resolution(self) -> int:
        return self.denoiser.unet.config.sample_size


def discover(setup: Setup, metrics: dict, model: dict) -> Directions:
    """The directions of setup.knobs.discover, their metadata completed with `model` and the run's grid and sampler."""
    knobs, sampler = setup.knobs, setup.sampler
    directions = DISCOVERERS[knobs.discover](setup, metrics)
    directions.meta.update(model, timesteps=setup.grid, eta=getattr(sampler, "eta", None), method=knobs.discover,
                           seed=setup.seed, sampler=sampler.name)
    return directions


def indexed(setup: Setup, seeds: list[int], sampler, classifier=None) -> dict:
    """The (cached) index of the trajectories of `seeds` (directions.index), in the run's batches."""
    return index_samples(setup.denoiser, sampler, setup.knobs.h_space, seeds,
                         setup.batches(len(seeds), desc="indexing samples"), classifier, setup.cache_dir)


def discover_pca(setup: Setup, metrics: dict) -> Directions:
    knobs, num_samples = setup.knobs, setup.num_samples
    hs = indexed(setup, list(range(knobs.index_offset, knobs.index_offset + num_samples)), setup.sampler)["hs"]
    basis, std, ratio = {"per_t": maths.pca_per_t, "joint": maths.pca_joint}[knobs.pca](hs, knobs.num_svectors)
    metrics["explained_variance"] = ratio.tolist()
    return Directions(basis, std, setup.grid, {"params": {"num_samples": num_samples, "pca": knobs.pca}},
                      {"explained_variance": ratio})


def discover_jacobian(setup: Setup, metrics: dict) -> Directions:
    """On the first face: its region mask (shown as pictures["masked_source"]), then the Jacobian's top directions."""
    knobs, start = setup.knobs, setup.start
    classes = region_classes(knobs.region)
    parser = region_parser(knobs.parser, setup.device) if classes and start.labels is None else None
    traj = run_trajectory(setup.denoiser, start.x_T[:1], start.noises[:, :1], start.sampler, where=knobs.h_space,
                          record_x=True)
    image = (traj.x0 if start.images is None else start.images)[0]  # a sample's own final image
    mask = origin = None
    if classes:
        labels = start.labels[0] if parser is None else parser_labels(parser, image)
        origin = setup.label_origin if parser is None else f"parser:{knobs.parser}"
        mask = region_mask(labels, classes, knobs.region, origin, start.names[0])
    sigma, v, passes = trajectory_jacobian(setup.denoiser, traj.x_ts[0][:, None], setup.grid, mask,
                                           k=knobs.num_eigvecs, where=knobs.h_space, tol=knobs.tol,
                                           method=knobs.jacobian_solver,
                                           max_iters=knobs.max_iters, progress=setup.progress,
                                           generator=torch.Generator().manual_seed(int(setup.seed)))
    metrics.update(network_passes=passes, singular_values=sigma.tolist(), source=start.names[0], mask=origin)
    if mask is not None:
        mask = mask.to(image.device)
        setup.pictures["masked_source"] = image * mask + (1 - mask) * -1
    params = {"region": knobs.region, "mask": origin, "source": start.names[0], "num_eigvecs": knobs.num_eigvecs}
    return Directions(v, sigma, setup.grid, {"params": params, "global_at_idx": True})


def discover_supervised(setup: Setup, metrics: dict) -> Directions:
    knobs, attribute = setup.knobs, setup.knobs.attribute
    conditions = knobs.condition if knobs.discover == "conditional" else []
    heads = {c: f"condition=[{c}]" for c in conditions} | ({"Male": "method.balance_gender=true"}
                                                            if knobs.balance_gender else {})
    classifier = load_classifier(knobs.classifier, setup.device)
    check_heads(classifier, {**heads, attribute: f"attribute={attribute}"}, knobs.classifier, setup.resolution)
    sampler = replace(setup.sampler, eta=knobs.index_eta) if isinstance(setup.sampler, DDIM) else setup.sampler
    found = indexed(setup, list(range(knobs.index_offset, knobs.index_offset + knobs.idx_size)), sampler, classifier)
    try:
        vectors, kept = maths.supervised_directions(found, attribute, conditions, knobs.num_examples,
                                                    knobs.balance_gender)
    except ValueError as err:
        raise InputError(f"{err} (method.idx_size={knobs.idx_size})") from None
    if kept is not None:
        metrics["kept_norm_fraction"] = kept
    params = {"attribute": attribute, "idx_size": knobs.idx_size, "num_examples": knobs.num_examples,
              "classifier": knobs.classifier, "balance_gender": knobs.balance_gender}
    basis, scale = maths.as_directions(vectors)
    return Directions(basis, scale, setup.grid, {"params": params | ({"condition": conditions} if conditions else {})})


DISCOVERERS = {"pca": discover_pca, "jacobian": discover_jacobian, "supervised": discover_supervised,
               "conditional": discover_supervised}
