"""Inputs as sources: one protocol for the faces a method reads, whatever they come from.

    source = instantiate(cfg.source)      # conf/source/NAME.yaml, built by Hydra from its `_target_`
    source.check()                        # cheap: knobs, folders, file matching (no image is read)
    inputs = source.load(resolution)      # Inputs at the model's size R

Sources (conf/source/*.yaml):
  synthetic      SyntheticSource    held-out synthetic faces: images, ground-truth labels (every renderer attribute and
                                    skin_tone), label maps, keep-masks (everything but the face), counterfactuals
  images         ImageFolderSource  an image folder (+ optional CelebA-style attribute file: labels)
  image_masks    ImageMaskSource    an image folder + a folder of keep-masks OR of label maps, matched by file stem
  seeds          SeedSource         seeds for x_T, no images
  class_folders  ClassFolderSource  one sub-folder of images per class: labels of one attribute

Images are read as the methods' own loaders read them (`resize`): `exact` refuses other sizes (cyclediff, directions:
read_image_folder), `bicubic` resizes square images with antialiased bicubic on the decoded [-1, 1] tensor and clamps
(fuzzy; keep-masks antialiased bilinear), `pil_bicubic` resizes the 8-bit image with PIL's bicubic before decoding
(the data layouts, hextract's class folders; keep-masks PIL bilinear). Label maps are always nearest-resized to R.
Folders are listed by `ImageMaskFolder` (natural order of the file stems, every IMAGE_SUFFIXES file); bad input is one
InputError line naming the knob, e.g. ``source.path=faces/: no such folder``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from facelab.data.layouts import ClassFolders, ImageMaskFolder, keep_outside_face, read_attribute_file
from facelab.data.synthetic import ATTRIBUTES, HAIR_COLOURS, SKIN_TONES, SyntheticFaces, sample_face
from facelab.io.errors import InputError
from facelab.io.images import read_image, read_keep_mask, read_mask

# --- synthetic face ranges, in one place ---------------------------------------------------------------------------
# A synthetic face is (seed, index): SyntheticFaces(seed=s, start=i) renders indices i, i+1, ... of seed s.
# - training: every zoo model trained on indices 0..19999 (ZOO_TRAINING_FACES) of its seed: seed 0 (ddpm64, cyclediff64,
#   attr64, attr64_noisy, codiff64, ldm_*64, vae64), seed 1 (the held-out evaluators attr64_eval, parser64), seed 2
#   (ddpm64_biased, fine-tuned from ddpm64);
# - statistics: fuzzy_stats' clean faces are training faces (seed 0 from index 0); each statistics file records its own
#   range in its metadata ({"faces": {"dataset", "seed", "start"}, "N"}), which `check_disjoint` reads;
# - held-out test faces, the methods' synthetic inputs, start at HELD_OUT_START (seed 0), far from every range above
#   (debias' real-face reference uses seed 1 from 950000, hextract's balanced faces seed 3 from 0).
ZOO_TRAINING_FACES = 20_000
HELD_OUT_START = 900_000
ZOO_TRAINING = {"faces": {"dataset": "synthetic", "seed": 0, "start": 0}, "N": ZOO_TRAINING_FACES}  # seed 0's, as
# metadata in the statistics files' format: check_disjoint(source, ZOO_TRAINING, "zoo training")

KEY = "source"  # the config node the knobs live under, as error messages name them
RESIZES = ("exact", "bicubic", "pil_bicubic")
BINARY = ["0", "1"]


@dataclass
class Inputs:
    """What a source gives a method; N inputs, R the resolution `load` was asked for.

    names: output-file stems; images: [N, 3, R, R] in [-1, 1] (None for seeds); masks: keep-masks [N, 3, R, R] in
    [0, 1], white = keep, per channel as read_keep_mask reads them (synthetic: an expanded view, do not write in place);
    label_maps: int64 [N, R, R] CelebAMask-HQ classes; labels: {attribute: int64 [N]} ground truth, with classes
    {attribute: class names, label k = classes[k]}; seeds: the seeds of x_T; faces: the synthetic dataset (position i =
    face i), for ground-truth counterfactuals."""

    names: list[str]
    images: Tensor | None = None
    masks: Tensor | None = None
    label_maps: Tensor | None = None
    labels: dict[str, Tensor] | None = None
    classes: dict[str, list[str]] | None = None
    seeds: list[int] | None = None
    faces: SyntheticFaces | None = None

    def __len__(self) -> int:
        return len(self.names)

    def label_columns(self, attributes: Sequence[str]) -> Tensor:
        """The labels of `attributes` as int64 [N, A], in that order; an InputError names any without labels."""
        missing = [a for a in attributes if a not in (self.labels or {})]
        if missing:
            have = ", ".join(self.labels) if self.labels else "none"
            raise InputError(f"{KEY}: no labels for {', '.join(missing)} (labels: {have})")
        return torch.stack([self.labels[a] for a in attributes], 1)

    def take(self, first: int, count: int) -> Inputs:
        """Inputs first..first+count−1 (`faces` is dropped: its face i is input i of the whole)."""
        part = slice(first, first + count)

        def cut(x):
            return None if x is None else x[part]

        return Inputs(names=self.names[part], images=cut(self.images), masks=cut(self.masks),
                      label_maps=cut(self.label_maps), classes=self.classes, seeds=cut(self.seeds),
                      labels=None if self.labels is None else {name: v[part] for name, v in self.labels.items()})

    def counterfactual(self, i: int, **changes: int) -> dict:
        """Synthetic face i re-rendered with attributes changed (same identity): an item of SyntheticFaces."""
        if self.faces is None:
            raise InputError(f"{KEY}: counterfactuals need synthetic faces ({KEY}=synthetic)")
        return self.faces.counterfactual(i, **changes)

    def counterfactuals(self, flips: Sequence[str]) -> list[dict | None]:
        """Each face with the attributes `flips` flipped, as the renderer draws it (cyclediff's ground truth), or None
        where there is none: image inputs, no flips, flips the renderer cannot express (a hair colour set to 0)."""
        if self.faces is None or not flips:
            return [None] * len(self)
        result = []
        for i in range(len(self)):
            face = self.faces.face(i)
            try:
                result.append(self.faces.item(face.with_attributes(**{a: 1 - face.attributes[a] for a in flips}), i))
            except (KeyError, ValueError):
                result.append(None)
        return result


class Source:
    """The protocol: `check()` validates without reading images, `load(resolution)` returns Inputs."""

    def check(self) -> None:
        """Raise InputError on bad knobs or files, before any long computation."""

    def load(self, resolution: int) -> Inputs:
        raise NotImplementedError

    def size(self) -> int:
        """The number of inputs, without reading them (checks the knobs)."""
        raise NotImplementedError

    def load_range(self, resolution: int, first: int, count: int) -> Inputs:
        """Inputs first..first+count−1 only: one batch of a large source. This default loads every input once (kept
        for the next range) and slices; SyntheticSource and ClassFolderSource read only the range."""
        cached = getattr(self, "_loaded", None)
        if cached is None or cached[0] != resolution:
            cached = self._loaded = (resolution, self.load(resolution))
        return cached[1].take(first, count)


def build(spec) -> Source:
    """A source from a config node with `_target_` (e.g. cfg.source), or a source as is."""
    if isinstance(spec, Source):
        return spec
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise InputError(f"{KEY}: expected a source config with _target_ (e.g. {KEY}=synthetic), got {spec!r}")
    from hydra.utils import instantiate

    return instantiate(spec)


@contextlib.contextmanager
def named_as(knobs: Mapping[str, str]):
    """Re-raise the InputError of a source a method built from its own knobs with those knobs' names, e.g.
    {"source.path": "gt_path"}, so the one line names what the user set."""
    try:
        yield
    except InputError as err:
        message = str(err)
        for knob, name in knobs.items():
            message = message.replace(knob, name)
        raise InputError(message) from None


def check_disjoint(source: Source, other_meta: Mapping, what: str = "statistics") -> None:
    """Refuse synthetic inputs that overlap the synthetic faces `other_meta` was built from (same seed, overlapping
    indices). `other_meta` is metadata in the statistics files' format, {"faces": {"dataset": "synthetic", "seed": s,
    "start": i}, "N": n} (fuzzy_stats writes it; ZOO_TRAINING is the zoo's); other sources and datasets pass."""
    faces = other_meta.get("faces")
    if not isinstance(source, SyntheticSource) or not isinstance(faces, Mapping):
        return
    if faces.get("dataset", "synthetic") != "synthetic":
        return
    source.check()
    start, count = int(faces["start"]), int(other_meta["N"])
    if int(faces["seed"]) == source.seed and source.start < start + count and start < source.start + source.count:
        raise InputError(f"{KEY}.start={source.start}: the {source.count} faces from {source.start} (seed "
                         f"{source.seed}) overlap the {count} {what} faces from {start}; choose another {KEY}.start "
                         f"(held-out test faces start at {HELD_OUT_START})")


# --- sources -------------------------------------------------------------------------------------------------------
class SyntheticSource(Source):
    """`count` synthetic faces of `seed` from index `start` (held-out by default), rendered at the model's size, with
    ground-truth labels, label maps, keep-masks (everything but the face: skin to lips is regenerated) and
    counterfactuals. Names are `{prefix}{index:06d}`."""

    def __init__(self, count: int = 8, seed: int = 0, start: int = HELD_OUT_START, priors: Mapping | None = None,
                 prefix: str = "face"):
        self.count, self.seed, self.start, self.prefix = count, seed, start, str(prefix)
        self.priors = _plain(priors) or {}

    def check(self) -> None:
        self.count = _count("count", self.count)
        self.seed = _integer("seed", self.seed)
        self.start = _integer("start", self.start)
        if self.start < 0:
            raise InputError(f"{KEY}.start={self.start}: must be at least 0")
        if not isinstance(self.priors, Mapping):
            raise InputError(f"{KEY}.priors={self.priors!r}: expected a mapping of attribute priors")
        try:
            sample_face(np.random.default_rng(0), self.priors)
        except (KeyError, ValueError, TypeError) as err:
            raise InputError(f"{KEY}.priors={self.priors}: {err.args[0] if err.args else err}") from None

    def dataset(self, resolution: int) -> SyntheticFaces:
        """The SyntheticFaces these inputs come from (face i = index start + i)."""
        self.check()
        if not 16 <= resolution <= 1024:
            raise InputError(f"resolution {resolution}: synthetic faces are rendered at 16..1024 px")
        return SyntheticFaces(size=resolution, length=self.count, seed=self.seed, start=self.start, priors=self.priors)

    def size(self) -> int:
        self.check()
        return self.count

    def load_range(self, resolution: int, first: int, count: int) -> Inputs:
        self.check()
        count = min(count, self.count - first)
        return SyntheticSource(count, self.seed, self.start + first, self.priors, self.prefix).load(resolution)

    def load(self, resolution: int) -> Inputs:
        faces = self.dataset(resolution)
        items = [faces[i] for i in range(len(faces))]
        label_maps = torch.stack([item["mask"] for item in items])
        keep = torch.stack([keep_outside_face(item) for item in items])
        attributes = torch.stack([item["attributes"] for item in items]).long()
        labels = {name: attributes[:, j] for j, name in enumerate(ATTRIBUTES)}
        labels["skin_tone"] = torch.tensor([item["skin_tone"] for item in items], dtype=torch.long)
        classes = {**{name: list(BINARY) for name in ATTRIBUTES}, "skin_tone": list(SKIN_TONES)}
        return Inputs(names=[f"{self.prefix}{item['name']}" for item in items],
                      images=torch.stack([item["image"] for item in items]),
                      masks=keep[:, None].expand(-1, 3, -1, -1), label_maps=label_maps, labels=labels,
                      classes=classes, faces=faces)


class SeedSource(Source):
    """`count` seeds from `seed` for x_T (and per-step noise): no images. Names are `seed{s}`."""

    def __init__(self, seed: int = 0, count: int = 4):
        self.seed, self.count = seed, count

    def check(self) -> None:
        self.seed = _integer("seed", self.seed)
        self.count = _count("count", self.count)

    def load(self, resolution: int) -> Inputs:
        self.check()
        seeds = list(range(self.seed, self.seed + self.count))
        return Inputs(names=[f"seed{s}" for s in seeds], seeds=seeds)

    def size(self) -> int:
        self.check()
        return self.count


class ImageFolderSource(Source):
    """The images of `path` (natural order of their stems; the first `count` if given), read by `resize` (module
    docstring); `attributes`: a CelebA-style attribute file giving labels for every column (rows matched by stem)."""

    def __init__(self, path: str | Path, count: int | None = None, resize: str = "exact",
                 attributes: str | Path | None = None):
        self.path, self.count, self.resize, self.attributes = path, count, resize, attributes

    def check(self) -> None:
        self._listing()

    def size(self) -> int:
        return len(self._listing()[0])

    def load(self, resolution: int) -> Inputs:
        names, paths, _ = self._listing()
        images = torch.stack([_read_image(path, resolution, self.resize) for path in paths])
        labels, classes = self._labels(names)
        return Inputs(names=names, images=images, labels=labels, classes=classes)

    def _listing(self) -> tuple[list[str], list[Path], list[Path] | None]:
        """(names, image paths, mask paths or None) of the first `count` images, every knob checked."""
        folder = self._folder()
        return folder.names[:self.count], folder.image_paths[:self.count], None

    def _folder(self) -> ImageMaskFolder:
        """All images of `path`, after checking resize, count and attributes."""
        if self.resize not in RESIZES:
            raise InputError(f"{KEY}.resize={self.resize}: use one of {', '.join(RESIZES)}")
        if self.count is not None:
            self.count = _count("count", self.count)
        if self.attributes is not None and not Path(str(self.attributes)).is_file():
            raise InputError(f"{KEY}.attributes={self.attributes}: no such file (a CelebA-style attribute file)")
        return _images("path", self.path)

    def _labels(self, names: list[str]) -> tuple[dict | None, dict | None]:
        if self.attributes is None:
            return None, None
        with _keyed("attributes", self.attributes):
            columns, rows = read_attribute_file(self.attributes)
        unlabelled = [name for name in names if name not in rows]
        if unlabelled:
            raise InputError(f"{KEY}.attributes={self.attributes}: no row for {len(unlabelled)} image(s): "
                             f"{_preview(unlabelled)}")
        table = torch.from_numpy(np.stack([rows[name] for name in names])).long()
        return {a: table[:, j] for j, a in enumerate(columns)}, {a: list(BINARY) for a in columns}


class ImageMaskSource(ImageFolderSource):
    """The images of `path` with a mask of the same stem from exactly one of `keep_masks` (keep-mask images, white =
    keep, grey = partial) or `label_maps` (CelebAMask-HQ label maps: index, palette or colour PNGs, tensor files).
    Every image needs its mask and every mask its image."""

    def __init__(self, path: str | Path, keep_masks: str | Path | None = None, label_maps: str | Path | None = None,
                 count: int | None = None, resize: str = "exact", attributes: str | Path | None = None):
        super().__init__(path, count, resize, attributes)
        self.keep_masks, self.label_maps = keep_masks, label_maps

    def load(self, resolution: int) -> Inputs:
        names, paths, mask_paths = self._listing()
        images, masks, label_maps = [], [], []
        for path, mask_path in zip(paths, mask_paths):
            if self.keep_masks is None:
                images.append(_read_image(path, resolution, self.resize))
                label_maps.append(read_mask(mask_path, resolution))
            elif self.resize == "pil_bicubic":
                images.append(read_image(path, resolution))
                masks.append(read_keep_mask(mask_path, resolution))
            else:
                image = read_image(path)
                keep = read_keep_mask(mask_path)
                if keep.shape[-2:] != image.shape[-2:]:
                    raise InputError(f"{mask_path}: mask is {_wxh(keep)} but image {path.name} is {_wxh(image)}")
                images.append(_fit(image, path, resolution, self.resize))
                masks.append(_resize(keep, resolution, "bilinear"))
        labels, classes = self._labels(names)
        return Inputs(names=names, images=torch.stack(images), masks=torch.stack(masks) if masks else None,
                      label_maps=torch.stack(label_maps) if label_maps else None, labels=labels, classes=classes)

    def _listing(self) -> tuple[list[str], list[Path], list[Path]]:
        if (self.keep_masks is None) == (self.label_maps is None):
            given = "both" if self.keep_masks is not None else "neither"
            raise InputError(f"{KEY}: give {KEY}.keep_masks=DIR (keep-masks, white = keep) or {KEY}.label_maps=DIR "
                             f"(CelebAMask-HQ label maps): exactly one, got {given}")
        folder = self._folder()
        names, paths = folder.names[:self.count], folder.image_paths[:self.count]
        key = "keep_masks" if self.keep_masks is not None else "label_maps"
        value = self.keep_masks if self.keep_masks is not None else self.label_maps
        masks = _images(key, value)
        found = dict(zip(masks.names, masks.image_paths))
        missing = [name for name in names if name not in found]
        if missing:
            raise InputError(f"{KEY}.{key}={value}: no mask for {len(missing)} image(s): {_preview(missing)}")
        every = set(folder.names)  # all images, before `count`
        stray = [name for name in masks.names if name not in every]
        if stray:
            raise InputError(f"{KEY}.{key}={value}: {len(stray)} mask(s) match no image in {KEY}.path={self.path}: "
                             f"{_preview(stray)}")
        return names, paths, [found[name] for name in names]


class ClassFolderSource(Source):
    """One sub-folder of images per class under `root` (e.g. Male/0/, Male/1/): labels of `attribute` (default: the
    root's name). Numeric folders must be 0..K-1 (their number is the label), others are labelled in natural order.
    `count`: at most this many images per class (the first, by name). Names are the file stems."""

    def __init__(self, root: str | Path, attribute: str | None = None, count: int | None = None,
                 resize: str = "pil_bicubic"):
        self.root, self.attribute, self.count, self.resize = root, attribute, count, resize

    def check(self) -> None:
        self._samples()

    def size(self) -> int:
        return len(self._samples()[0])

    def load_range(self, resolution: int, first: int = 0, count: int | None = None) -> Inputs:
        samples, classes = self._samples()
        return self._read(samples[first:None if count is None else first + count], classes, resolution)

    def load(self, resolution: int) -> Inputs:
        return self.load_range(resolution)

    def _read(self, samples: list[tuple[Path, int, str]], classes: list[str], resolution: int) -> Inputs:
        images = torch.stack([_read_image(path, resolution, self.resize) for path, _, _ in samples])
        attribute = str(self.attribute or Path(str(self.root)).name)
        return Inputs(names=[name for _, _, name in samples], images=images,
                      labels={attribute: torch.tensor([label for _, label, _ in samples], dtype=torch.long)},
                      classes={attribute: classes})

    def _samples(self) -> tuple[list[tuple[Path, int, str]], list[str]]:
        if self.resize not in RESIZES:
            raise InputError(f"{KEY}.resize={self.resize}: use one of {', '.join(RESIZES)}")
        count = None if self.count is None else _count("count", self.count)
        root = _folder("root", self.root)
        with _keyed("root", self.root, strip=f"{root}: "):
            dataset = ClassFolders(root)
        k = len(dataset.classes)
        if sorted({label for _, label, _ in dataset.samples}) != list(range(k)):
            raise InputError(f"{KEY}.root={self.root}: numeric class folders must be named 0..{k - 1}, found "
                             f"{', '.join(dataset.classes)}")
        taken = {label: 0 for label in range(k)}
        samples = []
        for sample in dataset.samples:
            if count is None or taken[sample[1]] < count:
                taken[sample[1]] += 1
                samples.append(sample)
        return samples, list(dataset.classes)


# --- reading -------------------------------------------------------------------------------------------------------
def _read_image(path: Path, resolution: int, resize: str) -> Tensor:
    """One image [3, R, R] in [-1, 1], read by `resize`."""
    if resize == "pil_bicubic":
        return read_image(path, resolution)
    return _fit(read_image(path), path, resolution, resize)


def _fit(image: Tensor, path: Path, resolution: int, resize: str) -> Tensor:
    """A decoded image at the model's size: refused if not R×R (exact), else resized (bicubic, square only)."""
    height, width = image.shape[-2:]
    if resize == "exact":
        if (height, width) != (resolution, resolution):
            raise InputError(f"{path}: {width}x{height} px, the model needs {resolution}x{resolution}; resize the "
                             f"images first or set {KEY}.resize=bicubic")
        return image
    if height != width:
        raise InputError(f"{path}: image is {width}x{height}; {KEY}.resize=bicubic needs square images (the model "
                         f"works at {resolution}x{resolution})")
    return _resize(image, resolution, "bicubic").clamp(-1, 1)


def _resize(x: Tensor, size: int, mode: str) -> Tensor:
    """[C, H, W] to size×size, antialiased (fuzzy's resize); unchanged at that size already."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x[None], size=(size, size), mode=mode, antialias=True, align_corners=False)[0]


# --- checks --------------------------------------------------------------------------------------------------------
def _folder(key: str, value) -> Path:
    if value is None or str(value) == "":
        raise InputError(f"{KEY}.{key}: not set; give a folder")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise InputError(f"{KEY}.{key}={value}: no such folder")
    return path


def _images(key: str, value) -> ImageMaskFolder:
    """The images of a folder (stems in natural order), listed by ImageMaskFolder; errors name the key."""
    folder = _folder(key, value)
    with _keyed(key, value, strip=f"{folder}: "):
        return ImageMaskFolder(folder)


@contextlib.contextmanager
def _keyed(key: str, value, strip: str = ""):
    """Re-raise an InputError from a reader with the knob it came from in front."""
    try:
        yield
    except InputError as err:
        raise InputError(f"{KEY}.{key}={value}: {str(err).removeprefix(strip)}") from None


def _integer(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{KEY}.{key}={value!r}: must be an integer")
    return value


def _count(key: str, value) -> int:
    if _integer(key, value) < 1:
        raise InputError(f"{KEY}.{key}={value}: must be at least 1")
    return value


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _preview(names: Sequence[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _wxh(tensor: Tensor) -> str:
    return f"{tensor.shape[-1]}x{tensor.shape[-2]}"


# --- target edits of inputs (method=codiff_edit) ----------------------------------------------------------------------
EDITS = (*ATTRIBUTES, "hair_shape")  # what `synthetic_edit` can change


@dataclass
class Edit:
    """One edit of one face: the target value per modality ("mask": label map, "text": caption), the attributes it
    should change (name -> wanted value), all attributes the result should show (synthetic ground truth) and the
    counterfactual render (an item of SyntheticFaces), where known."""

    name: str
    targets: dict
    changed: dict
    expected: dict | None = None
    truth: dict | None = None


def synthetic_edit(faces: SyntheticFaces, i: int, name: str) -> Edit | None:
    """Face i re-rendered with `name` (EDITS) changed: an attribute flipped (a hair colour set) or `hair_shape`
    (length and volume mirrored); its label map and caption are the targets. None where the renderer cannot change
    it (a beard on a woman, a face that already has that hair colour)."""
    face = faces.face(i)
    if name == "hair_shape":
        identity = {**face.identity, "hair_length": 1 - face.identity["hair_length"],
                    "hair_volume": 0.2 - face.identity["hair_volume"]}
        new = type(face)(face.attributes, face.skin_tone, identity)
    elif name in HAIR_COLOURS:
        if face.attributes[name]:
            return None
        new = face.with_attributes(**{name: 1})
    else:
        new = face.with_attributes(**{name: 1 - face.attributes[name]})
    changed = {a: new.attributes[a] for a in ATTRIBUTES if new.attributes[a] != face.attributes[a]}
    if not changed and name != "hair_shape":
        return None
    truth = faces.item(new, i)
    return Edit(name, {"mask": truth["mask"], "text": truth["caption"]}, changed, dict(new.attributes), truth)


def own_conditions(inputs: Inputs, i: int) -> dict:
    """Input i's own label map ("mask") and caption ("text") where the inputs know them."""
    own = {}
    if inputs.label_maps is not None:
        own["mask"] = inputs.label_maps[i]
    if inputs.faces is not None:
        own["text"] = inputs.faces[i]["caption"]
    return own


def target_edits(inputs: Inputs, i: int, names: Sequence[str], mask: Tensor | None, text: str | None) -> list[Edit]:
    """The edits of input i: the synthetic edits `names` (the renderable ones), else one "custom" edit to the given
    mask and / or text (input i's own label map or caption, where known, for the one not given)."""
    if names:
        return [edit for edit in (synthetic_edit(inputs.faces, i, name) for name in names) if edit is not None]
    own = own_conditions(inputs, i)
    targets = {"mask": mask if mask is not None else own.get("mask"), "text": text if text is not None else
               own.get("text")}
    return [Edit("custom", {m: v for m, v in targets.items() if v is not None}, {})]


def plan_target_edits(inputs: Inputs, names: Sequence[str], mask: Tensor | None, text: str | None,
                      modalities: Sequence[str], check) -> tuple[list[list[Edit]], list[str], list[str]]:
    """Every input's target_edits restricted to `modalities`, checked before anything runs: (edits per input, the
    modalities some edit has a target for, warnings of `check(modality, value) -> [warning]`). One InputError line
    when no edit has a target for these modalities, or an edit lacks a target that another has."""
    edits, warnings = [], []
    for i in range(len(inputs)):
        found = target_edits(inputs, i, names, mask, text)
        for edit in found:
            edit.targets = {m: v for m, v in edit.targets.items() if m in modalities}
            for m, value in edit.targets.items():
                warnings += [w for w in check(m, value) if w not in warnings]
        edits.append([e for e in found if e.targets])
    used = [m for m in modalities if any(m in e.targets for face in edits for e in face)]
    if not used:
        raise InputError(f"method.modalities={list(modalities)}: no edit has a target for these models (mask= for the "
                         "mask model, text= for the text model)")
    for edit in (edit for face in edits for edit in face):
        if set(edit.targets) != set(used):
            raise InputError(f"edit {edit.name}: targets for {', '.join(sorted(edit.targets))} but the models used "
                             f"are {', '.join(used)}; give a target for each or set method.modalities")
    return edits, used, warnings
