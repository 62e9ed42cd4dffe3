"""facelab.sources: every source gives exactly what today's per-method loaders give on the same inputs (fuzzy, cyclediff,
directions, hextract; torch.equal), the one disjointness rule, the configs, and one clear error per bad input."""

import inspect
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import CONF, compose
from facelab.data.synthetic import SyntheticFaces
from facelab.io.errors import InputError
from facelab.io.images import save_image, save_mask
from facelab.methods import cyclediff, directions, fuzzy, hextract
from facelab.sources import (
    HELD_OUT_START,
    ZOO_TRAINING,
    ClassFolderSource,
    ImageFolderSource,
    ImageMaskSource,
    SeedSource,
    SyntheticSource,
    build,
    check_disjoint,
)
from facelab.utils import typed_options

R = 16
ATTRS = ["Male", "Smiling", "Eyeglasses", "Young"]
SOURCES = {"synthetic": SyntheticSource, "images": ImageFolderSource, "image_masks": ImageMaskSource,
           "seeds": SeedSource, "class_folders": ClassFolderSource}


def fake_denoiser(attributes=None):
    """What the loaders read of a denoiser: its UNet's config and device, its attributes."""
    config = SimpleNamespace(sample_size=R, in_channels=3)
    return SimpleNamespace(unet=SimpleNamespace(config=config, device=torch.device("cpu")), attributes=attributes,
                           schedule=None)


def random_images(folder: Path, names, size: int | tuple[int, int] = R, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    height, width = (size, size) if isinstance(size, int) else size
    for name in names:
        save_image(torch.rand(3, height, width, generator=gen) * 2 - 1, folder / f"{name}.png")
    return folder


def keep_masks(folder: Path, names, size: int = R) -> Path:
    """Grey, partial and colour keep-masks (per-channel weights)."""
    folder.mkdir(parents=True)
    for k, name in enumerate(names):
        pixels = np.full((size, size, 3), 255, np.uint8)
        pixels[: size // 2] = 128 if k % 2 else (40, 200, 90)
        pixels[:, : size // 4] = 0
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


def single_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message
    return message


# --- the same inputs as today's loaders ----------------------------------------------------------------------------
def fuzzys_former_inputs(cfg, resolution):
    """method=fuzzy's reader before it read through sources: (names, images, keep-masks or None)."""
    import torch.nn.functional as F

    from facelab.data.layouts import ImageMaskFolder, keep_outside_face

    opts = cfg.method
    needs_masks = opts.mode in ("mask", "modulate")
    if opts.gt_path is None:
        faces = SyntheticFaces(size=resolution, length=cfg.num_samples, seed=opts.faces.seed, start=opts.faces.start)
        items = [faces[i] for i in range(len(faces))]
        keeps = torch.stack([keep_outside_face(item).expand(3, -1, -1) for item in items]) if needs_masks else None
        return [item["name"] for item in items], torch.stack([item["image"] for item in items]), keeps
    folder = ImageMaskFolder(opts.gt_path, opts.mask_path if needs_masks else None)
    items = [folder[i] for i in range(len(folder))]

    def resize(x, mode):
        if x.shape[-1] == resolution:
            return x
        return F.interpolate(x[None], size=(resolution, resolution), mode=mode, antialias=True, align_corners=False)[0]

    images = torch.stack([resize(item["image"], "bicubic").clamp(-1, 1) for item in items])
    keeps = torch.stack([resize(item["keep"], "bilinear") for item in items]) if needs_masks else None
    return folder.names, images, keeps


def fuzzys_inputs(cfg):
    """What method=fuzzy reads now: its own source (gt_path / mask_path or method.faces) without +source."""
    source, default = fuzzy.input_source(cfg, typed_options(fuzzy.Options, cfg.method))
    assert default
    return source.load(R)


def test_synthetic_is_fuzzys_default_faces_with_their_keep_masks(tmp_path):
    cfg = compose("sample", ["method=fuzzy", "mode=mask", "num_samples=3", "+source=synthetic", "source.count=3",
                             "source.prefix="], tmp_path / "run")
    names, images, keeps = fuzzys_former_inputs(cfg, R)
    inputs = build(cfg.source).load(R)
    assert inputs.names == names == ["900000", "900001", "900002"]
    assert torch.equal(inputs.images, images) and torch.equal(inputs.masks, keeps)
    assert inputs.label_maps.shape == (3, R, R) and inputs.label_maps.dtype == torch.int64
    own = fuzzys_inputs(compose("sample", ["method=fuzzy", "mode=mask", "num_samples=3"], tmp_path / "own"))
    assert own.names == names and torch.equal(own.images, images) and torch.equal(own.masks, keeps)


def cyclediffs_former_faces(cfg):
    """method=cyclediff's loader before it read through sources: (names, images, y_src, SyntheticFaces or None)."""
    from facelab.data.layouts import read_attribute_file
    from facelab.io.images import read_image

    opts = cfg.method
    if opts.input == "synthetic":
        faces = SyntheticFaces(R, cfg.num_samples, opts.faces.seed, start=opts.faces.start)
        items = [faces[i] for i in range(len(faces))]
        labels = torch.stack([item["attributes"] for item in items])[:, [faces.attribute_names.index(a) for a in ATTRS]]
        return [f"face{item['name']}" for item in items], torch.stack([item["image"] for item in items]), \
            labels * 2 - 1, faces
    paths = sorted(p for p in Path(opts.gt_path).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    columns, rows = read_attribute_file(opts.labels)
    labels = torch.tensor([[rows[p.stem][columns.index(a)] for a in ATTRS] for p in paths], dtype=torch.float32)
    return [p.stem for p in paths], torch.stack([read_image(p) for p in paths]), labels * 2 - 1, None


def cyclediffs_former_counterfactuals(faces, count, flips):
    """method=cyclediff's ground truths before sources gave them: each face re-rendered with `flips` flipped."""
    if faces is None or not flips:
        return [None] * count
    result = []
    for index in range(count):
        face = faces.face(index)
        try:
            result.append(faces.item(face.with_attributes(**{a: 1 - face.attributes[a] for a in flips}), index))
        except (KeyError, ValueError):
            result.append(None)
    return result


def cyclediffs_inputs(cfg):
    """What method=cyclediff reads now without +source: its own source (method.faces, or gt_path + method.labels)."""
    source, knobs = cyclediff.input_source(cfg, typed_options(cyclediff.Options, cfg.method))
    assert knobs
    return source.load(R)


def test_synthetic_is_cyclediffs_faces_labels_and_counterfactuals(tmp_path):
    cfg = compose("sample", ["method=cyclediff", "num_samples=4", "+source=synthetic", "source.count=4"],
                  tmp_path / "run")
    names, images, y_src, faces = cyclediffs_former_faces(cfg)
    inputs = build(cfg.source).load(R)
    assert inputs.names == names == [f"face{HELD_OUT_START + i}" for i in range(4)]
    assert torch.equal(inputs.images, images)
    assert torch.equal(inputs.label_columns(ATTRS).float() * 2 - 1, y_src)
    own = cyclediffs_inputs(compose("sample", ["method=cyclediff", "num_samples=4"], tmp_path / "own"))
    assert own.names == names and torch.equal(own.images, images)
    assert torch.equal(own.label_columns(ATTRS).float() * 2 - 1, y_src)
    assert inputs.classes["skin_tone"] == ["light", "medium", "dark"] and inputs.classes["Male"] == ["0", "1"]
    for flips in (["Smiling"], ["Male", "Eyeglasses"], ["Black_Hair", "Brown_Hair"], []):
        ours, theirs = inputs.counterfactuals(flips), cyclediffs_former_counterfactuals(faces, 4, flips)
        assert [item is None for item in ours] == [item is None for item in theirs]
        for mine, truth in zip(ours, theirs):
            if truth is not None:
                assert torch.equal(mine["image"], truth["image"])
                assert torch.equal(mine["attributes"], truth["attributes"])
    assert torch.equal(inputs.counterfactual(1, Smiling=1)["image"], faces.counterfactual(1, Smiling=1)["image"])


def directions_former_inputs(cfg, resolution):
    """method=directions' loader before it read through sources: (names, images, label maps, seeds), None where absent."""
    from facelab.io.images import read_image_folder, read_mask

    opts = cfg.method
    if opts.input == "samples":
        seeds = list(range(cfg.seed, cfg.seed + opts.edit_seeds))
        return [f"seed{s}" for s in seeds], None, None, seeds
    if opts.input == "synthetic":
        faces = SyntheticFaces(resolution, opts.edit_seeds, opts.faces.seed, start=opts.faces.start + cfg.seed)
        items = [faces[i] for i in range(len(faces))]
        return [f"face{it['name']}" for it in items], torch.stack([it["image"] for it in items]), \
            torch.stack([it["mask"] for it in items]), None
    names, images = read_image_folder(opts.gt_path, resolution)
    labels = torch.stack([read_mask(Path(opts.label_path) / f"{name}.png", (resolution, resolution))
                          for name in names]) if opts.label_path else None
    return names, images, labels, None


def directions_inputs(cfg):
    """What method=directions reads now without +source: its own source (method.input and its knobs)."""
    return directions.Options.from_cfg(cfg.method).default_source(cfg.seed).load(R)


def test_synthetic_and_seeds_are_directions_inputs(tmp_path):
    knobs = ["method=directions", "discover=pca", "method.input=synthetic", "method.edit_seeds=3"]
    cfg = compose("sample", [*knobs, "+source=synthetic", "source.count=3"], tmp_path / "run")
    names, images, labels, _ = directions_former_inputs(cfg, R)
    for inputs in (build(cfg.source).load(R), directions_inputs(compose("sample", knobs, tmp_path / "own"))):
        assert inputs.names == names and torch.equal(inputs.images, images) and torch.equal(inputs.label_maps, labels)

    knobs = ["method=directions", "discover=pca", "method.input=samples", "method.edit_seeds=3", "seed=7"]
    cfg = compose("sample", [*knobs, "+source=seeds", "source.seed=7", "source.count=3"], tmp_path / "run2")
    names, _, _, seeds = directions_former_inputs(cfg, R)
    for inputs in (build(cfg.source).load(R), directions_inputs(compose("sample", knobs, tmp_path / "own2"))):
        assert inputs.names == names == ["seed7", "seed8", "seed9"] and inputs.images is None
        assert inputs.seeds == seeds


def test_image_masks_with_label_maps_are_directions_image_inputs(tmp_path):
    faces = SyntheticFaces(size=32, length=3, seed=5)
    stems = ["a", "b", "c"]
    random_images(tmp_path / "images", stems)
    for stem, k, style in zip(stems, range(3), ("index", "palette", "colour")):
        save_mask(faces[k]["mask"], tmp_path / "labels" / f"{stem}.png", style=style)  # 32 px: nearest-resized
    knobs = ["method=directions", "discover=pca", "method.input=images", f"gt_path={tmp_path / 'images'}",
             f"mask_path={tmp_path / 'labels'}"]
    cfg = compose("sample", [*knobs, "+source=image_masks", f"source.path={tmp_path / 'images'}",
                             f"source.label_maps={tmp_path / 'labels'}"], tmp_path / "run")
    names, images, labels, _ = directions_former_inputs(cfg, R)
    for inputs in (build(cfg.source).load(R), directions_inputs(compose("sample", knobs, tmp_path / "own"))):
        assert inputs.names == names == stems and inputs.masks is None
        assert torch.equal(inputs.images, images) and torch.equal(inputs.label_maps, labels)
    plain = directions_inputs(compose("sample", knobs[:-1], tmp_path / "plain"))
    assert plain.names == stems and torch.equal(plain.images, images) and plain.label_maps is None


@pytest.mark.parametrize("size", [R, 24])
def test_image_masks_with_keep_masks_are_fuzzys_folder_inputs(tmp_path, size):
    stems = ["000", "001", "002"]
    random_images(tmp_path / "gt", stems, size)
    keep_masks(tmp_path / "mask", stems, size)
    cfg = compose("sample", ["method=fuzzy", "mode=mask", f"gt_path={tmp_path / 'gt'}",
                             f"mask_path={tmp_path / 'mask'}"], tmp_path / "run")
    names, images, keeps = fuzzys_former_inputs(cfg, R)
    inputs = ImageMaskSource(tmp_path / "gt", keep_masks=tmp_path / "mask", resize="bicubic").load(R)
    assert inputs.names == names == stems and inputs.label_maps is None
    assert torch.equal(inputs.images, images) and torch.equal(inputs.masks, keeps)
    own = fuzzys_inputs(cfg)
    assert own.names == names and torch.equal(own.images, images) and torch.equal(own.masks, keeps)
    assert not torch.equal(keeps[0, 0], keeps[0, 1])  # the colour mask's channels stay apart
    replace = compose("sample", ["method=fuzzy", "mode=replace", f"gt_path={tmp_path / 'gt'}"], tmp_path / "run2")
    _, only_images, none = fuzzys_former_inputs(replace, R)
    plain = ImageFolderSource(tmp_path / "gt", resize="bicubic").load(R)
    assert none is None and plain.masks is None and torch.equal(plain.images, only_images)
    assert torch.equal(fuzzys_inputs(replace).images, only_images)
    if size == R:  # at the model's size every resize mode reads the same pixels
        for resize in ("exact", "pil_bicubic"):
            again = ImageMaskSource(tmp_path / "gt", keep_masks=tmp_path / "mask", resize=resize).load(R)
            assert torch.equal(again.images, images) and torch.equal(again.masks, keeps)


def test_images_with_an_attribute_file_are_cyclediffs_image_inputs(tmp_path):
    random_images(tmp_path / "faces", ["00000", "00001", "00002"])
    attrs = tmp_path / "attrs.txt"
    attrs.write_text("3\nMale Smiling Eyeglasses Young Bangs\n00000.png 1 -1 -1 1 1\n00001.png -1 1 -1 -1 -1\n"
                     "00002.jpg 1 1 1 -1 1\n")
    cfg = compose("sample", ["method=cyclediff", "method.input=images", f"gt_path={tmp_path / 'faces'}",
                             f"method.labels={attrs}", "+source=images", f"source.path={tmp_path / 'faces'}",
                             f"source.attributes={attrs}"], tmp_path / "run")
    names, images, y_src, _ = cyclediffs_former_faces(cfg)
    inputs = build(cfg.source).load(R)
    assert inputs.names == names and torch.equal(inputs.images, images)
    assert torch.equal(inputs.label_columns(ATTRS).float() * 2 - 1, y_src)
    own = cyclediffs_inputs(compose("sample", ["method=cyclediff", "method.input=images",
                                               f"gt_path={tmp_path / 'faces'}", f"method.labels={attrs}"],
                                    tmp_path / "own"))
    assert own.names == names and torch.equal(own.images, images)
    assert torch.equal(own.label_columns(ATTRS).float() * 2 - 1, y_src)
    assert inputs.labels["Bangs"].tolist() == [1, 0, 1] and inputs.counterfactuals(["Male"]) == [None] * 3
    assert ImageFolderSource(tmp_path / "faces", count=2).load(R).names == ["00000", "00001"]


def hextracts_former_batches(cfg):
    """method=hextract's inversion inputs before it read through sources, batch by batch: (images, labels, names,
    {"attributes": {name: K}, "classes": ... of class folders})."""
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from facelab.data.datamodule import collate_faces
    from facelab.data.layouts import ClassFolders
    from facelab.data.synthetic import ATTRIBUTES

    opts, folders = cfg.method, cfg.method.source == "class_folders"
    if folders:
        dataset = ClassFolders(opts.root, size=R)
        attribute = opts.attribute or Path(opts.root).name
        labelling = {"attributes": {attribute: len(dataset.classes)}, "classes": {attribute: dataset.classes}}
    else:
        dataset = SyntheticFaces(size=R, length=cfg.num_samples, seed=opts.faces.seed, start=opts.faces.start,
                                 priors=OmegaConf.to_container(opts.faces.priors, resolve=True))
        labelling = {"attributes": {a: 3 if a == "skin_tone" else 2 for a in opts.attributes}}
    images, labels, names = [], [], []
    for batch in DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate_faces):
        images.append(batch["image"])
        labels.append(batch["label"][:, None] if folders else torch.stack(
            [(batch[a] if a == "skin_tone" else batch["attributes"][:, ATTRIBUTES.index(a)]).long()
             for a in labelling["attributes"]], 1))
        names += [str(n) for n in batch["name"]]
    return torch.cat(images), torch.cat(labels), names, labelling


def hextracts_batches(cfg, composed: bool = False):
    """What method=hextract inverts now, read in the run's batches (load_range): its own source, or +source."""
    opts = hextract.Options.from_cfg(cfg.method)
    source = build(cfg.source) if composed else opts.default_source(cfg.num_samples)
    parts = [source.load_range(R, first, cfg.batch_size) for first in range(0, source.size(), cfg.batch_size)]
    labelling = hextract.labelling(opts, source, parts[0])
    labels = torch.cat([part.label_columns(list(labelling["attributes"])) for part in parts])
    return torch.cat([part.images for part in parts]), labels, [n for part in parts for n in part.names], labelling


def test_synthetic_with_priors_is_hextracts_synthetic_source(tmp_path):
    knobs = ["method=hextract", "num_samples=5", "batch_size=2", "+method.faces.priors.Male=0.9"]
    cfg = compose("sample", [*knobs, "+source=synthetic", "source.count=5", "source.seed=3", "source.start=0",
                             "source.priors={Male: 0.9}", "source.prefix="], tmp_path / "run")
    images, labels, names, former = hextracts_former_batches(cfg)
    inputs = build(cfg.source).load(R)
    assert inputs.names == names and torch.equal(inputs.images, images)
    assert torch.equal(inputs.label_columns(["Male", "skin_tone"]), labels)
    for ours in (hextracts_batches(cfg, composed=True), hextracts_batches(compose("sample", knobs, tmp_path / "own"))):
        assert ours[2] == names and torch.equal(ours[0], images) and torch.equal(ours[1], labels)
        assert ours[3]["attributes"] == former["attributes"] and ours[3]["label_source"].startswith("synthetic:seed=3")


@pytest.mark.parametrize("size", [R, 24])
def test_class_folders_are_hextracts_class_folders(tmp_path, size):
    root = tmp_path / "Male"
    random_images(root / "0", ["f1", "f2", "f10"], size, seed=1)
    random_images(root / "1", ["m1", "m2"], size, seed=2)
    knobs = ["method=hextract", "method.source=class_folders", f"method.root={root}", "batch_size=2"]
    cfg = compose("sample", [*knobs, "+source=class_folders", f"source.root={root}"], tmp_path / "run")
    images, labels, names, former = hextracts_former_batches(cfg)
    inputs = build(cfg.source).load(R)
    assert inputs.names == names == ["f1", "f2", "f10", "m1", "m2"] and torch.equal(inputs.images, images)
    assert torch.equal(inputs.label_columns(["Male"]), labels)
    assert inputs.classes == {"Male": former["classes"]["Male"]}
    for ours in (hextracts_batches(cfg, composed=True), hextracts_batches(compose("sample", knobs, tmp_path / "own"))):
        assert ours[2] == names and torch.equal(ours[0], images) and torch.equal(ours[1], labels)
        assert {k: ours[3][k] for k in former} == former
    few = ClassFolderSource(root, attribute="Gender", count=2).load(R)
    assert few.names == ["f1", "f2", "m1", "m2"] and few.labels["Gender"].tolist() == [0, 0, 1, 1]


# --- held-out faces ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("faces, n", [({"seed": 0, "start": 0}, 128), ({"seed": 0, "start": 899990}, 10),
                                      ({"seed": 0, "start": 899990}, 11), ({"seed": 1, "start": 900000}, 5),
                                      ({"seed": 0, "start": 900002}, 5), ({"seed": 0, "start": 900003}, 5)])
def test_check_disjoint_is_fuzzys_rule(tmp_path, faces, n):
    meta = {"faces": {"dataset": "synthetic", **faces}, "N": n}
    # method=fuzzy's rule before it used check_disjoint: its 3 test faces from 900000 of seed 0 against the statistics'
    refused = faces["seed"] == 0 and 900000 < faces["start"] + n and faces["start"] < 900000 + 3
    source = SyntheticSource(count=3)
    if refused:
        with pytest.raises(InputError, match="source.start=900000: the 3 faces from 900000 .* overlap") as err:
            check_disjoint(source, meta)
        single_line(err)
    else:
        check_disjoint(source, meta)


def test_check_disjoint_against_the_zoo_and_other_sources(tmp_path):
    with pytest.raises(InputError, match="overlap the 20000 zoo training faces from 0"):
        check_disjoint(SyntheticSource(count=4, start=19998), ZOO_TRAINING, "zoo training")
    check_disjoint(SyntheticSource(count=4, seed=3, start=0), ZOO_TRAINING)  # another seed
    check_disjoint(SyntheticSource(), ZOO_TRAINING)  # the held-out default
    check_disjoint(ImageFolderSource(tmp_path), ZOO_TRAINING)  # real images: nothing to check
    check_disjoint(SyntheticSource(start=0), {"faces": {"dataset": "celebahq"}, "N": 10})


# --- configs -------------------------------------------------------------------------------------------------------
def test_every_config_builds_its_source_and_documents_itself(tmp_path):
    folder = random_images(tmp_path / "images", ["x"])
    required = {"images": [f"source.path={folder}"], "image_masks": [f"source.path={folder}"],
                "class_folders": [f"source.root={tmp_path}"]}
    files = sorted((CONF / "source").glob("*.yaml"))
    assert [f.stem for f in files] == sorted(SOURCES)
    for file in files:
        text = file.read_text()
        assert text.startswith("# ") and "Knobs (defaults):" in text and "python -m facelab.sample" in text
        cfg = compose("sample", [f"+source={file.stem}", *required.get(file.stem, [])], tmp_path / file.stem)
        source = build(cfg.source)
        assert type(source) is SOURCES[file.stem]
        knobs = {k: v for k, v in yaml.safe_load(text).items() if not k.startswith("_")}
        params = inspect.signature(SOURCES[file.stem]).parameters
        assert list(knobs) == list(params), file.stem  # the yaml lists every knob, in order
        defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
        assert {k: knobs[k] for k in defaults} == defaults, file.stem  # the yaml's defaults are the class's


# --- bad input -----------------------------------------------------------------------------------------------------
def bad_cases(tmp: Path) -> list:
    images = random_images(tmp / "images", ["a", "b"])
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("no images here")
    masks = keep_masks(tmp / "masks", ["a", "b", "c"])
    partial = keep_masks(tmp / "partial", ["a"])
    random_images(tmp / "big", ["a"], 24)
    random_images(tmp / "wide", ["a"], (16, 24))
    random_images(tmp / "gaps" / "0", ["a"])
    random_images(tmp / "gaps" / "2", ["b"])
    random_images(tmp / "hollow" / "0", ["a"])
    (tmp / "hollow" / "1").mkdir(parents=True)
    (tmp / "flat").mkdir()
    attrs = tmp / "attrs.txt"
    attrs.write_text("1\nMale\na.png 1\n")
    return [
        (lambda: ImageFolderSource(tmp / "nope"), r"^source.path=.*nope: no such folder$"),
        (lambda: ImageFolderSource(None), r"^source.path: not set; give a folder$"),
        (lambda: ImageFolderSource(tmp / "empty"), r"^source.path=.*empty: no images \("),
        (lambda: ImageFolderSource(images, count=0), r"^source.count=0: must be at least 1$"),
        (lambda: ImageFolderSource(images, resize="lanczos"), r"^source.resize=lanczos: use one of exact, bicubic"),
        (lambda: ImageFolderSource(images, attributes=tmp / "none.txt"), r"^source.attributes=.*: no such file"),
        (lambda: ImageFolderSource(images, attributes=attrs), r"^source.attributes=.*: no row for 1 image\(s\): b$"),
        (lambda: ImageFolderSource(tmp / "big"), r"a.png: 24x24 px, the model needs 16x16; .* source.resize=bicubic"),
        (lambda: ImageFolderSource(tmp / "wide", resize="bicubic"), r"a.png: image is 24x16; source.resize=bicubic "
                                                                    "needs square images"),
        (lambda: ImageMaskSource(images, keep_masks=masks), r"^source.keep_masks=.*masks: 1 mask\(s\) match no image "
                                                            r"in source.path=.*images: c$"),
        (lambda: ImageMaskSource(images, label_maps=partial), r"^source.label_maps=.*partial: no mask for 1 "
                                                              r"image\(s\): b$"),
        (lambda: ImageMaskSource(images, keep_masks=tmp / "nope"), r"^source.keep_masks=.*nope: no such folder$"),
        (lambda: ImageMaskSource(images, label_maps=tmp / "empty"), r"^source.label_maps=.*empty: no images"),
        (lambda: ImageMaskSource(images), r"^source: give source.keep_masks=DIR .*: exactly one, got neither$"),
        (lambda: ImageMaskSource(images, keep_masks=masks, label_maps=masks), r"exactly one, got both$"),
        (lambda: ImageMaskSource(images, keep_masks=partial, count=0), r"^source.count=0: must be at least 1$"),
        (lambda: SyntheticSource(count=0), r"^source.count=0: must be at least 1$"),
        (lambda: SyntheticSource(count=2.5), r"^source.count=2.5: must be an integer$"),
        (lambda: SyntheticSource(start=-1), r"^source.start=-1: must be at least 0$"),
        (lambda: SyntheticSource(priors={"Laughing": 0.5}), r"^source.priors=.*unknown prior\(s\) \['Laughing'\]"),
        (lambda: SeedSource(count=-1), r"^source.count=-1: must be at least 1$"),
        (lambda: ClassFolderSource(tmp / "nope"), r"^source.root=.*nope: no such folder$"),
        (lambda: ClassFolderSource(tmp / "flat"), r"^source.root=.*flat: no class folders \(expected one sub-folder"),
        (lambda: ClassFolderSource(tmp / "gaps"), r"^source.root=.*gaps: numeric class folders must be named 0..1, "
                                                  "found 0, 2$"),
        (lambda: ClassFolderSource(tmp / "hollow"), r"^source.root=.*hollow: .*1: no images"),
        (lambda: ClassFolderSource(tmp / "gaps" / "0", count=0), r"^source.count=0: must be at least 1$"),
    ]


def test_bad_input_is_one_clear_error_each(tmp_path):
    for make, message in bad_cases(tmp_path):
        source = make()
        with pytest.raises(InputError, match=message) as err:
            source.load(R)
        single_line(err)
        if "px" not in message and "square" not in message and "no row" not in message:
            with pytest.raises(InputError, match=message):
                source.check()  # found before any image is read
    inputs = ImageFolderSource(tmp_path / "images").load(R)
    with pytest.raises(InputError, match="source: no labels for Male"):
        inputs.label_columns(["Male"])
    with pytest.raises(InputError, match="counterfactuals need synthetic faces"):
        inputs.counterfactual(0, Smiling=1)
    with pytest.raises(InputError, match="expected a source config with _target_"):
        build({"path": "x"})
