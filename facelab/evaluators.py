"""Evaluators: what scores a run's images for metrics.json, as objects built by Hydra from conf/eval/NAME.yaml.

Every evaluator has one small protocol:
  check(resolution, guidance_sources=())   raises an InputError before any sampling: the evaluator's network is one
                                           that guidance uses (`check_held_out`), or the run's images (resolution ×
                                           resolution px) cannot be scored meaningfully;
  score(images, **references) -> dict      plain floats, lists and dicts (JSON-ready; None where a score is undefined).
An evaluator built with its network set to null (`classifier: null`, `parser: null`) is off: `check` passes and
`score` returns {}.

  attributes  AttributeEvaluator  a held-out attribute classifier: class fractions per head, mean P(present) per binary
                                  head, Fairness Discrepancy against targets, flip / preservation rates against
                                  expected labels, the Fréchet distance in its features to real synthetic faces
  similarity  SimilarityEvaluator PSNR, SSIM and L1 to references over the whole image and inside / outside a region
  parsing     ParsingEvaluator    pixel accuracy and mIoU of a face parser's labels against reference label maps
  captions    CaptionEvaluator    accuracy of a classifier on the attributes each caption states

Resolution. A network that reads a fixed size S (AttributeNet.image_size, ParserNet.image_size) gets larger images
downsampled to S (antialiased bilinear, `resize_images`, as method=debias has always done; scores then carry
`resized_from`; the parser parses at S and resizes its logits back: `parsed_at`). Images smaller than S are refused
(upsampled, they would be scored as blurred faces the network never saw), by `check` before sampling, with one line
naming the option that turns the evaluator off (`key`=null, e.g. method.eval_classifier=null).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from torchmetrics.functional.image import structural_similarity_index_measure

from facelab.data.synthetic import SEG, SEG_CLASSES, SyntheticFaces
from facelab.io.errors import InputError
from facelab.io.images import resize_images
from facelab.metrics import images as image_metrics
from facelab.metrics.attributes import class_fractions, fairness_discrepancy, feature_frechet
from facelab.metrics.captions import caption_consistency
from facelab.metrics.parsing import mask_consistency

REDUCTIONS = ("per_image", "pooled")


def build_evaluators(cfg) -> dict:
    """{name: evaluator} of a config's `eval` group (conf/eval/*.yaml: one `_target_` per name), in order."""
    return {name: instantiate(spec) for name, spec in (cfg.get("eval") or {}).items()}


def guidance_networks(terms: Iterable) -> list[nn.Module]:
    """The classifier modules guidance terms read (their `classifier`), to pass to `check` as guidance sources."""
    return [term.classifier for term in terms if isinstance(getattr(term, "classifier", None), nn.Module)]


# --- the held-out guard -------------------------------------------------------------------------------------------
def _locate(kind: str, source):
    from facelab.models.pretrained import locate

    try:
        return locate(kind, source)
    except (OSError, ValueError):
        return None


def _resolved(kind: str, source) -> str:
    """The file or folder a model source names (a zoo name and its folder resolve alike), else the string itself."""
    found = _locate(kind, source)
    if found is None or found[0] == "hub":
        return str(source)
    return str(Path(found[1]).expanduser().resolve())


def check_held_out(evaluator_source, guidance_sources: Iterable, *, key: str = "method.eval_classifier",
                   kind: str = "classifier", evaluator: nn.Module | None = None) -> None:
    """Raise if the evaluator is one of the guidance's models: guidance must not see the evaluator.

    evaluator_source: the evaluator's source as configured (zoo name, folder, .ckpt; None with no `evaluator` = no
    evaluator: nothing to check); guidance_sources: the sources (strings or paths) and / or loaded modules guidance
    uses (None entries are skipped); key: the option naming the evaluator, for the message; kind: the model kind of
    the evaluator (facelab.models.pretrained); evaluator: the loaded evaluator, else loaded here when a weight
    comparison is needed. Two models are the same when their sources resolve to the same file or folder, or when
    their weights have the same fingerprint (facelab.models.pretrained.fingerprint: a copy under another name).
    """
    if evaluator_source is None and evaluator is None:
        return
    from facelab.models.pretrained import fingerprint, load_model

    shown = evaluator_source if evaluator_source is not None else type(evaluator).__name__
    target = None if evaluator_source is None else _resolved(kind, evaluator_source)
    state: dict = {}

    def refuse(why: str = "") -> InputError:
        return InputError(f"{key}={shown} is also a guidance classifier{why}; guidance must not see the evaluator")

    def evaluator_print() -> str | None:
        if "print" not in state:
            net = evaluator
            if net is None:
                try:
                    net = load_model(kind, evaluator_source, "cpu")
                except (InputError, OSError):
                    net = None
            state["print"] = None if net is None else fingerprint(net)
        return state["print"]

    for guide in guidance_sources:
        if guide is None:
            continue
        if isinstance(guide, nn.Module):
            named = getattr(guide, "source", None)
            if guide is evaluator or (named is not None and target is not None and _resolved(kind, named) == target):
                raise refuse()
            if evaluator_print() is not None and fingerprint(guide) == evaluator_print():
                raise refuse(f" ({named or type(guide).__name__} has the same weights)")
            continue
        if target is not None and _resolved(kind, guide) == target:
            raise refuse()
        if _locate(kind, guide) is None or evaluator_print() is None:
            continue
        try:
            net = load_model(kind, guide, "cpu")
        except (InputError, OSError):
            continue  # a broken guidance source is for the guidance to report
        if fingerprint(net) == evaluator_print():
            raise refuse(f" ({guide} has the same weights)")


# --- shared pieces ------------------------------------------------------------------------------------------------
def _device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_images(images, name: str = "images") -> Tensor:
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point() \
            or images.shape[-1] != images.shape[-2] or len(images) == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InputError(f"{name}: expected square RGB images [N, 3, H, H] in [-1, 1] (N ≥ 1); got {shape}")
    return images


class Evaluator:
    """The protocol (module docstring); subclasses override what they need."""

    enabled = True

    def check(self, resolution: int, guidance_sources: Iterable = ()) -> None:
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise InputError(f"resolution={resolution!r}: expected the run's image size in pixels")

    def score(self, images: Tensor, **references) -> dict:
        raise NotImplementedError

    def to(self, device) -> Evaluator:
        return self


class _NetworkEvaluator(Evaluator):
    """An evaluator around one network of a model kind that reads `image_size` px images (loaded from a source or
    given as a module); null = off. `key` is the option naming the network: messages name it, and `key=null` turns
    the evaluator off."""

    kind = "classifier"

    def __init__(self, network, key: str, batch_size: int, device):
        from facelab.models.pretrained import load_model

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: the evaluator's batch size must be a positive integer")
        self.key, self.batch_size = key, batch_size
        self.device = _device(device)
        if network is None:
            self.net, self.source = None, None
        elif isinstance(network, nn.Module):
            self.net, self.source = network.to(self.device).eval().requires_grad_(False), getattr(network, "source",
                                                                                                   None)
        else:
            self.net, self.source = load_model(self.kind, str(network), self.device), str(network)

    @property
    def enabled(self) -> bool:
        return self.net is not None

    @property
    def image_size(self) -> int | None:
        return None if self.net is None else int(self.net.image_size)

    def to(self, device) -> _NetworkEvaluator:
        self.device = torch.device(device)
        if self.net is not None:
            self.net.to(self.device)
        return self

    def _refuse_size(self, resolution: int) -> None:
        if resolution < self.image_size:
            raise InputError(f"{self.key}={self.source} reads {self.image_size} px images: these {resolution} px ones "
                             f"would be scored upsampled (blurred); use one trained at ≤ {resolution} px, or "
                             f"{self.key}=null to skip it")

    def check(self, resolution: int, guidance_sources: Iterable = ()) -> None:
        super().check(resolution, guidance_sources)
        if not self.enabled:
            return
        check_held_out(self.source, guidance_sources, key=self.key, kind=self.kind, evaluator=self.net)
        self._refuse_size(resolution)

    def _inputs(self, images: Tensor) -> Tensor:
        """The images checked and refused if smaller than the network reads."""
        _check_images(images)
        self._refuse_size(images.shape[-1])
        return images

    def _resized(self, images: Tensor) -> dict:
        size = images.shape[-1]
        return {"resized_from": int(size)} if size != self.image_size else {}


# --- attributes -----------------------------------------------------------------------------------------------------
class AttributeEvaluator(_NetworkEvaluator):
    """A held-out attribute classifier (conf/eval/attributes.yaml).

    score(images, targets=None, expected=None, flipped=()):
      fractions         {head: class fractions} of the hard labels (argmax) of every head;
      probabilities     {binary head: mean P(present)};
      targets           {head: a class distribution (a number m for a binary head: [1 − m, m])}: attributes {head:
                        {target, fractions, fd}} and fd_mean, the Fairness Discrepancy per target and its mean;
      expected          {head: expected labels [N]} (e.g. y_src with the edit's flips): preservation (the accuracy over
                        the heads not in `flipped`) and preserved {head: accuracy}; with `flipped` also flip_rate (the
                        fraction of images whose flipped heads all read as expected);
      frechet           the Fréchet distance in the classifier's features to `real_faces.num` synthetic faces rendered
                        at its size (num 0 = skip), with frechet_real_faces.
    `last` keeps the latest evaluation: labels {head: [N]} and features [N, D] (CPU tensors; e.g. for labels.csv).
    A noise-aware classifier reads the clean images at t = 0.
    """

    def __init__(self, classifier="attr64_eval", batch_size: int = 50, real_faces: Mapping | None = None,
                 key: str = "method.eval_classifier", name: str = "eval.attributes", device="auto"):
        super().__init__(classifier, key, batch_size, device)
        self.name = name
        real = {"num": 500, "seed": 1, "start": 950000, "priors": {}, **dict(real_faces or {})}
        unknown = set(real) - {"num", "seed", "start", "priors"}
        if unknown:
            raise InputError(f"{name}.real_faces: unknown keys {sorted(unknown)} (num, seed, start, priors)")
        if isinstance(real["num"], bool) or not isinstance(real["num"], int) or real["num"] < 0 or real["num"] == 1:
            raise InputError(f"{name}.real_faces.num={real['num']!r}: the Fréchet distance needs at least 2 real "
                             f"faces ({name}.real_faces.num=0 skips it)")
        self.real_faces = {**real, "priors": dict(real["priors"] or {})}
        self._reference: Tensor | None = None
        self.last: dict = {}

    @property
    def heads(self) -> dict[str, int]:
        return {} if self.net is None else self.net.heads

    def check(self, resolution: int, guidance_sources: Iterable = (), targets: Mapping | None = None,
              num_images: int | None = None) -> None:
        """Also: the targets name heads of the classifier, and the Fréchet distance gets at least 2 images."""
        super().check(resolution, guidance_sources)
        if not self.enabled:
            return
        self._targets(targets)
        if self.real_faces["num"] and num_images is not None and num_images < 2:
            raise InputError(self._too_few(num_images))

    def _too_few(self, n: int) -> str:
        return (f"{self.name}.real_faces.num={self.real_faces['num']}, {n} image(s): the Fréchet distance needs at "
                f"least 2 of each (or {self.name}.real_faces.num=0 to skip it)")

    def _targets(self, targets: Mapping | None) -> dict[str, Tensor]:
        from facelab.guidance.debias import target_distributions

        targets = {name: value for name, value in (targets or {}).items() if value is not None}
        for name in targets:
            if name not in self.heads:
                raise InputError(f"target.{name}: the evaluation classifier {self.key}={self.source} has no head "
                                 f"{name} (it predicts {', '.join(self.heads)})")
        return target_distributions(targets, self.heads, "distribution") if targets else {}

    def _t(self, x: Tensor) -> Tensor | None:
        return torch.zeros(len(x), dtype=torch.long, device=x.device) if self.net.noise_aware else None

    @torch.no_grad()
    def evaluate(self, images: Tensor) -> dict:
        """Hard labels {head: [N]}, P(present) {binary head: [N]} and features [N, D] of images (CPU), in chunks of
        batch_size, resized to the classifier's size (method=debias's `evaluate`)."""
        images = self._inputs(images)
        labels, present, features = {}, {}, []
        for chunk in images.split(self.batch_size):
            x = resize_images(chunk.to(self.device), self.image_size)
            t = self._t(x)
            for head, probs in self.net.predict(x, t).items():
                labels.setdefault(head, []).append(probs.argmax(1).cpu())
                if probs.shape[1] == 2:
                    present.setdefault(head, []).append(probs[:, 1].cpu())
            features.append(self.net.features(x, t).cpu())
        self.last = {"labels": {head: torch.cat(v) for head, v in labels.items()},
                     "present": {head: torch.cat(v) for head, v in present.items()},
                     "features": torch.cat(features)}
        return self.last

    @torch.no_grad()
    def reference_features(self) -> Tensor:
        """Features [num, D] of the real synthetic faces (rendered at the classifier's size; computed once)."""
        if self._reference is None:
            real = self.real_faces
            faces = SyntheticFaces(size=self.image_size, length=real["num"], seed=real["seed"], start=real["start"],
                                   priors=real["priors"])
            chunks = []
            for first in range(0, real["num"], self.batch_size):
                x = torch.stack([faces[i]["image"] for i in range(first, min(first + self.batch_size, real["num"]))])
                x = x.to(self.device)
                chunks.append(self.net.features(x, self._t(x)).cpu())
            self._reference = torch.cat(chunks)
        return self._reference

    def _expected(self, expected: Mapping, flipped: Sequence[str], n: int) -> dict:
        flipped = [flipped] if isinstance(flipped, str) else list(flipped)
        for head in [*expected, *flipped]:
            if head not in self.heads:
                raise InputError(f"expected.{head}: the evaluation classifier {self.key}={self.source} has no head "
                                 f"{head} (it predicts {', '.join(self.heads)})")
        missing = [head for head in flipped if head not in expected]
        if missing:
            raise InputError(f"flipped {missing}: give their expected labels too")
        columns = {}
        for head, value in expected.items():
            value = torch.as_tensor(value).flatten()
            if len(value) != n:
                raise InputError(f"expected.{head}: {len(value)} labels for {n} images")
            columns[head] = value.long().cpu()
        return {"columns": columns, "flipped": flipped}

    def score(self, images: Tensor, targets: Mapping | None = None, expected: Mapping | None = None,
              flipped: Sequence[str] = ()) -> dict:
        if not self.enabled:
            return {}
        images = _check_images(images)
        goals = self._targets(targets)
        wanted = self._expected(expected, flipped, len(images)) if expected else None
        if flipped and wanted is None:
            raise InputError("flipped attributes need their expected labels (expected={head: labels})")
        if self.real_faces["num"] and len(images) < 2:
            raise InputError(self._too_few(len(images)))
        found = self.evaluate(images)
        labels = found["labels"]
        out: dict = {"fractions": {head: class_fractions(labels[head], k).tolist() for head, k in self.heads.items()},
                     "probabilities": {head: float(p.mean()) for head, p in found["present"].items()},
                     **self._resized(images)}
        if goals:
            out["attributes"] = {name: {"target": r.tolist(),
                                        "fractions": class_fractions(labels[name], len(r)).tolist(),
                                        "fd": fairness_discrepancy(r, labels[name])} for name, r in goals.items()}
            out["fd_mean"] = sum(entry["fd"] for entry in out["attributes"].values()) / max(len(goals), 1)
        if wanted:
            correct = {head: labels[head] == value for head, value in wanted["columns"].items()}
            kept = [head for head in correct if head not in wanted["flipped"]]
            if wanted["flipped"]:
                out["flip_rate"] = float(torch.stack([correct[h] for h in wanted["flipped"]], 1).all(1).float().mean())
            if kept:
                out["preservation"] = float(torch.stack([correct[h] for h in kept], 1).float().mean())
                out["preserved"] = {head: float(correct[head].float().mean()) for head in kept}
        if self.real_faces["num"]:
            out["frechet"] = feature_frechet(found["features"], self.reference_features())
            out["frechet_real_faces"] = int(self.real_faces["num"])
        return out


# --- similarity -----------------------------------------------------------------------------------------------------
def _region(region, like: Tensor) -> Tensor | None:
    """A boolean region broadcastable to images [N, C, H, W]: [N or 1, 1 or C, H, W] or [N or 1, H, W]."""
    if region is None:
        return None
    region = torch.as_tensor(region)
    if region.dtype != torch.bool:
        if region.is_complex() or ((region != 0) & (region != 1)).any():
            raise InputError(f"region: expected a boolean (or 0/1) mask; got {region.dtype} values other than 0 and 1")
        region = region != 0
    if region.dim() == 3:
        region = region[:, None]
    n, c, h, w = like.shape
    if region.dim() != 4 or region.shape[0] not in (1, n) or region.shape[1] not in (1, c) \
            or tuple(region.shape[-2:]) != (h, w):
        raise InputError(f"region: expected a mask [N, 1 or {c}, {h}, {w}] or [N, {h}, {w}] for images "
                         f"{tuple(like.shape)}; got {tuple(region.shape)}")
    return region.to(like.device)


def region_psnr(x: Tensor, reference: Tensor, region: Tensor | None = None, reduction: str = "per_image") \
        -> float | None:
    """PSNR in dB of images in [−1, 1] (peak-to-peak 2: 10·log10(4 / MSE)), None for an empty region.

    pooled: one MSE over every element of `region` (default all) of the whole batch (method=fuzzy's definition);
    per_image: each image's MSE over its region elements (metrics.images.psnr for the whole image), PSNR per image,
    averaged over the images with a nonempty region (method=cyclediff and method=directions).
    """
    if reduction == "pooled":
        squared = (x - reference) ** 2
        if region is not None:
            if not region.any():
                return None
            squared = squared[region.expand_as(squared)]
        return (10 * torch.log10(4 / squared.mean().clamp(min=1e-12))).item()
    if region is None:
        return float(image_metrics.psnr(x, reference).mean())
    return _per_image(((x.float() - reference.float()) ** 2), region,
                      lambda mse: 10 * torch.log10(4 / mse.clamp_min(1e-12)))


def _per_image(values: Tensor, region: Tensor, transform=None) -> float | None:
    """The mean over images with a nonempty region of transform(the mean of `values` over the image's region)."""
    mask = region.expand_as(values)
    count = mask.flatten(1).sum(1)
    valid = count > 0
    if not valid.any():
        return None
    mean = (values * mask).flatten(1).sum(1)[valid] / count[valid]
    return float((transform(mean) if transform else mean).mean())


def region_ssim(x: Tensor, reference: Tensor, region: Tensor | None = None, reduction: str = "per_image") \
        -> float | None:
    """SSIM (Gaussian window 11, σ 1.5, data range 2), None for an empty region.

    pooled: the mean of the SSIM map over the region's pixels of the whole batch (method=fuzzy's definition; the map
    covers the border too); per_image: metrics.images.ssim averaged over the images for the whole image (the border
    of half a window excluded, method=cyclediff's), else each image's mean of the map over its region, averaged over
    the images with a nonempty region.
    """
    if region is not None and not region.any():
        return None
    if reduction == "per_image" and region is None:
        return float(image_metrics.ssim(x, reference).mean())
    _, full = structural_similarity_index_measure(x, reference, data_range=2.0, return_full_image=True)
    if reduction == "pooled":
        return full.mean().item() if region is None else full[region.expand_as(full)].mean().item()
    return _per_image(full, region)


def region_l1(x: Tensor, reference: Tensor, region: Tensor | None = None, reduction: str = "per_image") \
        -> float | None:
    """Mean absolute difference (pooled over the region's elements of the batch, or per image and averaged)."""
    if region is not None and not region.any():
        return None
    if reduction == "pooled":
        diff = (x - reference).abs()
        return (diff.mean() if region is None else diff[region.expand_as(diff)].mean()).item()
    if region is None:
        return float(image_metrics.l1(x, reference).mean())
    return _per_image((x.float() - reference.float()).abs(), region)


class SimilarityEvaluator(Evaluator):
    """PSNR, SSIM and L1 of images to references in [−1, 1] (conf/eval/similarity.yaml).

    reduction: per_image (each image's score, averaged: metrics.images, method=cyclediff and method=directions) or
    pooled (one score over all pixels of the batch: method=fuzzy); clamp: clamp the images (not the references) to
    [−1, 1] first (method=fuzzy does).
    score(images, reference, region=None) -> {psnr, ssim, l1} over the whole image and, with a region (a boolean mask
    [N, 1 or C, H, W] or [N, H, W]), region_fraction and {psnr, ssim, l1}_inside / _outside (None where empty).
    """

    def __init__(self, reduction: str = "per_image", clamp: bool = False, name: str = "eval.similarity"):
        if reduction not in REDUCTIONS:
            raise InputError(f"{name}.reduction={reduction!r}: use one of {', '.join(REDUCTIONS)}")
        self.reduction, self.clamp, self.name = reduction, bool(clamp), name

    def score(self, images: Tensor, reference: Tensor, region: Tensor | None = None) -> dict:
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point() or not len(images):
            raise InputError(f"images: expected images [N, C, H, W] in [-1, 1]; got "
                             f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
        if not isinstance(reference, Tensor) or reference.shape != images.shape:
            shape = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
            raise InputError(f"reference: expected the images' shape {tuple(images.shape)}; got {shape}")
        region = _region(region, images)
        x = images.clamp(-1, 1) if self.clamp else images
        reference = reference.to(x.device)
        fns = {"psnr": region_psnr, "ssim": region_ssim, "l1": region_l1}
        out = {key: fn(x, reference, None, self.reduction) for key, fn in fns.items()}
        if region is not None:
            out["region_fraction"] = region.expand(len(x), *region.shape[1:]).float().mean().item()
            for where, part in (("inside", region), ("outside", ~region)):
                out.update({f"{key}_{where}": fn(x, reference, part, self.reduction) for key, fn in fns.items()})
        return out


# --- parsing ------------------------------------------------------------------------------------------------------
class ParsingEvaluator(_NetworkEvaluator):
    """A face parser's labels of the images against reference label maps (conf/eval/parsing.yaml).

    score(images, labels) with labels int [N, H', W'] in CelebAMask-HQ numbering (SEG; resized nearest to the images'
    size) -> pixel_acc, miou (over the classes present in either) and iou {class: IoU} from the batch's summed
    confusion matrix (metrics.parsing.mask_consistency); a parser with other class names is renumbered into SEG.
    """

    kind = "parser"

    def __init__(self, parser="parser64", batch_size: int = 50, key: str = "eval.parsing.parser", device="auto"):
        super().__init__(parser, key, batch_size, device)
        if self.net is not None:
            unknown = [c for c in self.net.classes if c not in SEG]
            if unknown:
                raise InputError(f"{key}={self.source}: classes {unknown} are not CelebAMask-HQ classes")
            self.numbering = torch.tensor([SEG[c] for c in self.net.classes])

    @torch.no_grad()
    def parse(self, images: Tensor) -> Tensor:
        """Labels int64 [N, H, W] (SEG numbering, CPU) of images, in chunks of batch_size, at the images' size."""
        images = self._inputs(images)
        x = torch.cat([self.net.parse(chunk.to(self.device)).cpu() for chunk in images.split(self.batch_size)])
        return x if self.net.classes == SEG_CLASSES else self.numbering[x]

    def score(self, images: Tensor, labels: Tensor) -> dict:
        if not self.enabled:
            return {}
        images = _check_images(images)
        if not isinstance(labels, Tensor) or labels.dim() != 3 or len(labels) != len(images):
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise InputError(f"labels: expected {len(images)} label maps [N, H, W]; got {shape}")
        parsed = self.parse(images)
        result = mask_consistency(parsed, labels.cpu(), len(SEG_CLASSES))
        return {"pixel_acc": result["pixel_acc"], "miou": result["miou"], "iou": result["iou"],
                **self._resized(images)}

    def _resized(self, images: Tensor) -> dict:  # parse() reads at its size and gives labels at the images' size
        return {"parsed_at": self.image_size} if images.shape[-1] != self.image_size else {}


# --- captions -----------------------------------------------------------------------------------------------------
class CaptionEvaluator(_NetworkEvaluator):
    """Caption consistency (conf/eval/captions.yaml): the accuracy of a held-out attribute classifier's argmax on the
    attributes each caption states (metrics.captions.caption_consistency).

    score(images, captions) -> accuracy (None when no caption states an attribute the classifier predicts),
    per_attribute {head: accuracy}, count (stated (caption, attribute) pairs scored).
    """

    def __init__(self, classifier="attr64_eval", batch_size: int = 50, key: str = "method.eval_classifier",
                 device="auto"):
        super().__init__(classifier, key, batch_size, device)

    @torch.no_grad()
    def predict(self, images: Tensor) -> dict[str, Tensor]:
        """Class probabilities {head: [N, K]} (CPU) of images resized to the classifier's size."""
        images = self._inputs(images)
        probs: dict[str, list[Tensor]] = {}
        for chunk in images.split(self.batch_size):
            x = resize_images(chunk.to(self.device), self.image_size)
            t = torch.zeros(len(x), dtype=torch.long, device=x.device) if self.net.noise_aware else None
            for head, p in self.net.predict(x, t).items():
                probs.setdefault(head, []).append(p.cpu())
        return {head: torch.cat(p) for head, p in probs.items()}

    def score(self, images: Tensor, captions: Sequence[str]) -> dict:
        if not self.enabled:
            return {}
        images = _check_images(images)
        if isinstance(captions, str) or not isinstance(captions, Sequence) or len(captions) != len(images) \
                or not all(isinstance(c, str) for c in captions):
            got = "one string" if isinstance(captions, str) else f"{len(captions)} items" \
                if isinstance(captions, Sequence) else type(captions).__name__
            raise InputError(f"captions: expected {len(images)} strings, one per image; got {got}")
        result = caption_consistency(self.predict(images), list(captions))
        accuracy = result["accuracy"]
        return {**result, "accuracy": None if accuracy != accuracy else accuracy, **self._resized(images)}


# --- scores of an edit and of a correction (method=cyclediff, method=fuzzy) ---------------------------------------
def score_edit(inputs, y_src: Tensor, flips: list[str], edited: Tensor, truth: list, attributes: list[str],
               similarity: SimilarityEvaluator, evaluator: AttributeEvaluator) -> dict:
    """One attribute edit of `inputs` (facelab.sources.Inputs, y_src ∈ {−1, 1}^[N, A]): PSNR/SSIM to the ground truth
    (`truth`: each input's counterfactual or None; the input itself for reconstruction, flips = []), and by the
    evaluator the flip rate (all flipped attributes read as intended) and the preservation rate (the other attributes
    read as expected: the counterfactual's ground truth, else y_src with the flips), each also for the unedited input
    as a baseline."""
    entry, found = {}, [i for i, item in enumerate(truth) if item is not None]
    if not flips:
        entry.update(similarity.score(edited, inputs.images))
    elif found:
        reference = torch.stack([truth[i]["image"] for i in found])
        ours, theirs = similarity.score(edited[found], reference), similarity.score(inputs.images[found], reference)
        entry.update(ground_truths=len(found), psnr=ours["psnr"], ssim=ours["ssim"], psnr_input=theirs["psnr"],
                     ssim_input=theirs["ssim"])
    if not evaluator.enabled:
        return entry
    expected = (y_src > 0).long()
    expected[:, [attributes.index(a) for a in flips]] ^= 1
    names = inputs.faces.attribute_names if inputs.faces is not None else []
    if set(attributes) <= set(names):  # the renderer's consequences of a flip (no beard on a woman) are expected too
        for i in found:
            expected[i] = truth[i]["attributes"][[names.index(a) for a in attributes]]
    expected = {a: expected[:, j] for j, a in enumerate(attributes)}
    for suffix, images in (("", edited), ("_input", inputs.images)):
        score = evaluator.score(images, expected=expected, flipped=flips)
        if flips:
            entry[f"flip_rate{suffix}"] = score["flip_rate"]
        entry[f"preservation{suffix}"] = score.get("preservation")
        if not suffix:
            entry["preserved"] = score.get("preserved", {})
    return entry


def correction_metrics(results: Mapping[str, Tensor]) -> dict:
    """PSNR and SSIM of a correction of damaged images against the clean ones, inside / outside the damaged pixels
    and over the whole image, before and after (pooled over the run's pixels, images clamped). results: `clean`,
    `gt_image` (the damaged input), `inpainted` (the correction) [N, C, H, W] and `degradation` (bool, the damage)."""
    similarity = SimilarityEvaluator(reduction="pooled", clamp=True)
    inside = results["degradation"].any(1, keepdim=True)
    metrics = {"degraded_fraction": inside.float().mean().item()}
    for when, key in (("before", "gt_image"), ("after", "inpainted")):
        score = similarity.score(results[key], results["clean"], inside)
        for where, suffix in (("inside", "_inside"), ("outside", "_outside"), ("all", "")):
            for metric in ("psnr", "ssim"):
                metrics[f"{metric}_{where}_{when}"] = score[metric + suffix]
    return metrics


# --- target edits (method=codiff_edit) -------------------------------------------------------------------------------
def target_edit_scores(edited: Tensor, inputs: Tensor, similarity: SimilarityEvaluator, evaluator: AttributeEvaluator,
                       parser: ParsingEvaluator, reference: Tensor | None = None, by_alpha: Mapping | None = None,
                       masks: Tensor | None = None, expected: Sequence[Mapping] | None = None,
                       changed: Sequence[str] = (), captions: Sequence[str] | None = None) -> dict:
    """An edit of `inputs` to targets, scored by held-out evaluators: `to_input` (similarity); with the ground-truth
    counterfactuals `reference`, PSNR/SSIM to them (and the input's own; `by_alpha`: {α label: the images at that α}
    → by_alpha_psnr); with the target label maps `masks`, the parser's mIoU (and the input's); by the evaluator, flip
    rate and preservation against the renderer's `expected` attributes per face (`changed` flipped), else against the
    attributes the `captions` state (caption_flips), and identity_cosine (of its features, edit vs input)."""
    from facelab.data.synthetic import ATTRIBUTES

    entry = {"to_input": similarity.score(edited, inputs)}
    if reference is not None:
        ours, theirs = similarity.score(edited, reference), similarity.score(inputs, reference)
        entry.update(psnr=ours["psnr"], ssim=ours["ssim"], psnr_input=theirs["psnr"], ssim_input=theirs["ssim"])
        if by_alpha is not None:
            entry["by_alpha_psnr"] = {a: similarity.score(x, reference)["psnr"] for a, x in by_alpha.items()}
    if masks is not None and parser.enabled:
        entry["miou"] = parser.score(edited, masks)["miou"]
        entry["miou_input"] = parser.score(inputs, masks)["miou"]
    if evaluator.enabled:
        if expected is not None:  # synthetic: the renderer's changes (none for hair_shape)
            wanted = {a: torch.tensor([e[a] for e in expected]) for a in ATTRIBUTES if a in evaluator.heads}
            for suffix, images in (("", edited), ("_input", inputs)):
                score = evaluator.score(images, expected=wanted, flipped=[a for a in changed if a in wanted])
                entry[f"flip_rate{suffix}"] = score.get("flip_rate")
                entry[f"preservation{suffix}"] = score.get("preservation")
        elif captions is not None:  # real faces: the caption's attributes that the input lacks
            entry.update(caption_flips(evaluator, edited, inputs, captions))
        features = [evaluator.evaluate(x)["features"] for x in (edited, inputs)]
        entry["identity_cosine"] = float(torch.nn.functional.cosine_similarity(*features).mean())
    return entry


def caption_flips(evaluator: AttributeEvaluator, images: Tensor, inputs: Tensor, captions: Sequence[str]) -> dict:
    """Without ground truth: the attributes each caption states that the evaluator reads otherwise on the input; the
    flip rate is the fraction of faces whose edit shows all of them, preservation the other stated ones kept."""
    from facelab.metrics.captions import stated_attributes

    after, before = (evaluator.evaluate(x)["labels"] for x in (images, inputs))
    flipped, kept = [], []
    for i, caption in enumerate(captions):
        stated = {a: v for a, v in stated_attributes(caption).items() if a in after}
        wanted = [a for a, v in stated.items() if int(before[a][i]) != v]
        if wanted:
            flipped.append(all(int(after[a][i]) == stated[a] for a in wanted))
        kept += [int(after[a][i]) == v for a, v in stated.items() if a not in wanted]
    return {"flip_rate": sum(flipped) / len(flipped) if flipped else None, "faces_to_flip": len(flipped),
            "caption_preservation": sum(kept) / len(kept) if kept else None}


@torch.no_grad()
def wanted_probabilities(classifier, images: Tensor, wanted: Mapping[str, int]) -> dict[str, Tensor]:
    """P(attribute = wanted value) per image under an attribute classifier (a method's own guidance classifier too,
    e.g. to pick an edit strength), for the attributes it predicts; {} without a classifier or attributes."""
    if classifier is None or not wanted:
        return {}
    x = resize_images(images.to(next(classifier.parameters()).device), classifier.image_size)
    t = torch.zeros(len(x), dtype=torch.long, device=x.device) if classifier.noise_aware else None
    probs = classifier.predict(x, t)
    return {a: probs[a][:, v].cpu() for a, v in wanted.items() if a in probs and probs[a].shape[1] > v}


def changed_by_caption(classifier, image: Tensor, caption: str | None) -> dict:
    """A caption's stated attributes that the classifier reads otherwise on the face `image` ([3, H, W])."""
    from facelab.metrics.captions import stated_attributes

    if classifier is None or caption is None:
        return {}
    stated = {a: v for a, v in stated_attributes(caption).items() if a in classifier.heads}
    read = wanted_probabilities(classifier, image[None], stated)
    return {a: stated[a] for a, p in read.items() if p[0] <= 0.5}


def choose_alpha(alphas: Sequence[float], wanted_p: Mapping[str, Tensor], default: float = 1.0) -> tuple[int, str]:
    """An edit strength from wanted_probabilities of the images at each α: (index into alphas, reason), the smallest α
    whose image shows every wanted attribute (P > 0.5); else the α with the highest least P; with nothing to check,
    the α nearest `default`."""
    if not wanted_p:
        return min(range(len(alphas)), key=lambda j: (abs(alphas[j] - default), alphas[j])), "no attribute to check"
    least = torch.stack(list(wanted_p.values())).min(0).values
    reached = [j for j in range(len(alphas)) if least[j] > 0.5]
    return (reached[0], "reached") if reached else (int(least.argmax()), "not reached")
