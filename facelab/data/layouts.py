"""Real dataset layouts: readers for the layouts users already have, and an exporter that writes them.

Layouts (the names `export` takes):
- ``celebahq``: ``CelebA-HQ-img/{id}.jpg``;
- ``celebamask``: ``CelebAMask-HQ-mask-anno/{id // 2000}/{id:05d}_{part}.png`` binary part masks, as CelebAMask-HQ
  ships them, and ``CelebAMask-HQ-mask/{id}.png`` merged index masks (what most pipelines read);
- ``dialog``: CelebA-Dialog ``captions_hq.json``:
  ``{"{id}.jpg": {"overall_caption": ..., "attribute_wise_captions": {...}}}``;
- ``attr_txt``: ``CelebAMask-HQ-attribute-anno.txt`` (count line, names line, then ``{id}.jpg`` and 1/-1 per attribute);
- ``image_mask``: ``images/{name}.png`` + ``masks/{name}.png`` keep-masks (white = keep), matched by file stem;
- ``class_folders``: ``{attribute}/0/{name}.png`` and ``{attribute}/1/{name}.png``, one folder per class.

Every reader yields dicts with the keys of `SyntheticFaces` that its files provide: image [3, H, W] in [-1, 1],
mask int64 [H, W], attributes float [A] of 0/1, caption, index, name (plus keep / label where noted).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from facelab.data.synthetic import SEG_CLASSES
from facelab.io.errors import InputError
from facelab.io.images import (
    IMAGE_SUFFIXES,
    Size,
    read_image,
    read_keep_mask,
    read_mask,
    resize_mask,
    save_image,
    save_mask,
)

LAYOUTS = ("celebahq", "celebamask", "dialog", "attr_txt", "image_mask", "class_folders")
IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask"
PART_DIR = "CelebAMask-HQ-mask-anno"
CAPTIONS_FILE = "captions_hq.json"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
IDS_PER_PART_FOLDER = 2000
# Part files are merged in CelebAMask-HQ's order (its g_mask.py): a later part overwrites an earlier one.
PART_NAMES = SEG_CLASSES[1:]
FACE_LABELS = tuple(range(1, 13))  # skin, nose, eye_g, eyes, brows, ears, mouth, lips
_PART_FILE = re.compile(r"^(\d+)_([a-z_]+)\.png$")


class CelebAHQ(Dataset):
    """CelebA-HQ images under `root` with whichever CelebAMask-HQ / CelebA-Dialog annotations lie beside them.

    Masks come from ``CelebAMask-HQ-mask/`` or else are merged from ``CelebAMask-HQ-mask-anno/`` and are resized
    (nearest) to the image size. Captions come from `captions_file` or ``captions_hq.json`` in root or root/text;
    attributes from `attributes_file` or ``CelebAMask-HQ-attribute-anno.txt``. Each ``with_*`` is None (use if
    present), True (required) or False (skip). `split` is a file listing image names or ids one per line, or a
    name resolved as ``root/splits/{split}.txt``. ``index`` is the CelebA-HQ id.
    """

    def __init__(
        self,
        root: str | Path,
        size: Size = None,
        split: str | Path | None = None,
        with_masks: bool | None = None,
        with_captions: bool | None = None,
        with_attributes: bool | None = None,
        captions_file: str | Path | None = None,
        attributes_file: str | Path | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: dataset root not found")
        images = _list_images(self.root / IMAGE_DIR)
        if split is not None:
            images = _select_split(images, self.root, split)
        self.size = size
        self.names = list(images)
        self.image_paths = list(images.values())
        self.masks = None if with_masks is False else self._find_masks(with_masks)
        self.captions = None if with_captions is False else self._find_captions(with_captions, captions_file)
        self.attribute_names, self.attributes = (
            ([], None) if with_attributes is False else self._find_attributes(with_attributes, attributes_file)
        )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        name = self.names[i]
        image = read_image(self.image_paths[i], self.size)
        item = {"image": image, "index": int(name) if name.isdigit() else i, "name": name}
        if self.masks is not None:
            hw = tuple(image.shape[-2:])
            source = self.masks[i]
            item["mask"] = read_mask(source, hw) if isinstance(source, Path) else merge_part_masks(source, hw)
        if self.captions is not None:
            item["caption"] = self.captions[i]
        if self.attributes is not None:
            item["attributes"] = torch.from_numpy(self.attributes[i])
        return item

    def _find_masks(self, required: bool | None) -> list | None:
        merged, parts = self.root / MASK_DIR, self.root / PART_DIR
        if merged.is_dir():
            masks = _list_images(merged)
            _check_matched(self.names, masks, merged, "mask")
            return [masks[name] for name in self.names]
        if parts.is_dir():
            found = _scan_part_masks(parts)
            _check_matched(self.names, found, parts, "part mask")
            return [found[name] for name in self.names]
        if required:
            raise InputError(
                f"{self.root}: no {MASK_DIR}/ or {PART_DIR}/ folder; pass with_masks=False for images only"
            )
        return None

    def _find_captions(self, required: bool | None, captions_file: str | Path | None) -> list[str] | None:
        candidates = [self.root / CAPTIONS_FILE, self.root / "text" / CAPTIONS_FILE]
        if captions_file:
            candidates = [Path(captions_file)]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            if required or captions_file:
                raise InputError(f"{candidates[0]}: caption file not found; pass with_captions=False to skip captions")
            return None
        try:
            entries = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: invalid JSON ({err})") from None
        if not isinstance(entries, dict):
            raise InputError(f"{path}: expected an object keyed by image name, like {{\"0.jpg\": {{...}}}}")
        by_stem = {Path(key).stem: entry for key, entry in entries.items()}
        _check_matched(self.names, by_stem, path, "caption")
        return [_caption_text(by_stem[name], path, name) for name in self.names]

    def _find_attributes(self, required: bool | None, attributes_file: str | Path | None):
        path = Path(attributes_file) if attributes_file else self.root / ATTRIBUTE_FILE
        if not path.is_file():
            if required or attributes_file:
                raise InputError(f"{path}: attribute file not found; pass with_attributes=False to skip attributes")
            return [], None
        names, rows = read_attribute_file(path)
        _check_matched(self.names, rows, path, "attribute row")
        return names, np.stack([rows[name] for name in self.names])


class ImageMaskFolder(Dataset):
    """Images with optional masks of the same file stem (e.g. fuzzy's gt/ + mask/, codiff's label maps).

    ``mask_kind="keep"``: masks are keep-masks (white = keep), yielded as ``keep`` float [3, H, W] in [0, 1];
    ``mask_kind="labels"``: masks are CelebAMask-HQ label maps, yielded as ``mask`` int64 [H, W].
    Image and mask sizes must agree unless `size` is given, which resizes both. ``index`` is the position.
    """

    def __init__(self, image_dir: str | Path, mask_dir: str | Path | None = None, size: Size = None,
                 mask_kind: str = "keep"):
        if mask_kind not in ("keep", "labels"):
            raise InputError(f"mask_kind={mask_kind!r}: expected 'keep' or 'labels'")
        images = _list_images(Path(image_dir))
        self.size, self.mask_kind = size, mask_kind
        self.names = list(images)
        self.image_paths = list(images.values())
        self.mask_paths = None
        if mask_dir is not None:
            masks = _list_images(Path(mask_dir))
            _check_matched(self.names, masks, Path(mask_dir), "mask")
            self.mask_paths = [masks[name] for name in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> dict:
        image = read_image(self.image_paths[i], self.size)
        item = {"image": image, "index": i, "name": self.names[i]}
        if self.mask_paths is not None:
            path = self.mask_paths[i]
            hw = tuple(image.shape[-2:]) if self.size is not None else None
            mask = read_keep_mask(path, hw) if self.mask_kind == "keep" else read_mask(path, hw)
            if mask.shape[-2:] != image.shape[-2:]:
                raise InputError(
                    f"{path}: mask is {_wxh(mask)} but image {self.image_paths[i].name} is {_wxh(image)}; "
                    "pass size= to resize both"
                )
            item["keep" if self.mask_kind == "keep" else "mask"] = mask
        return item


class ClassFolders(Dataset):
    """One sub-folder of images per class (the debiasing classifier layout); yields image and ``label``.

    Labels are the folder names when all are integers (``0/``, ``1/``), else positions in sorted folder order;
    ``classes`` lists the folder names.
    """

    def __init__(self, root: str | Path, size: Size = None):
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"{root}: class folder root not found")
        folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                         key=lambda d: _natural_key(d.name))
        if not folders:
            raise InputError(f"{root}: no class folders (expected one sub-folder of images per class, e.g. 0/ and 1/)")
        self.size = size
        self.classes = [d.name for d in folders]
        numeric = all(name.isdigit() for name in self.classes)
        self.samples = [
            (path, int(folder.name) if numeric else k, name)
            for k, folder in enumerate(folders)
            for name, path in _list_images(folder).items()
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label, name = self.samples[i]
        return {"image": read_image(path, self.size), "label": label, "index": i, "name": name}


def read_attribute_file(path: str | Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """Parse a CelebA-style attribute file: names and {image stem: float32 0/1 vector} (1 -> 1; -1 or 0 -> 0)."""
    path = Path(path)
    lines = [line.split() for line in _read_text(path).splitlines() if line.strip()]
    if len(lines) < 2 or len(lines[0]) != 1 or not (lines[0][0].isascii() and lines[0][0].isdigit()):
        raise InputError(f"{path}: expected a count line, an attribute-names line, then one row per image")
    names, rows = lines[1], {}
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise InputError(f"{path}: attribute names repeat ({_preview(repeated)})")
    for number, row in enumerate(lines[2:], start=3):
        if len(row) != len(names) + 1 or not set(row[1:]) <= {"1", "-1", "0"}:
            raise InputError(f"{path}: line {number}: expected an image name and {len(names)} values of 1/-1")
        rows[Path(row[0]).stem] = np.array([value == "1" for value in row[1:]], dtype=np.float32)
    if len(rows) != int(lines[0][0]):
        raise InputError(f"{path}: header says {lines[0][0]} images but {len(rows)} rows follow")
    return names, rows


def merge_part_masks(parts: Sequence[tuple[int, Path]], size: Size = None) -> torch.Tensor:
    """Merge binary part masks [(label, path), ...] into a label map, later parts overwriting earlier ones."""
    labels = None
    for label, path in parts:
        part = read_keep_mask(path)[0].numpy() > 0  # non-zero in the first channel = inside
        if labels is None:
            labels = np.zeros(part.shape, dtype=np.uint8)
        elif part.shape != labels.shape:
            raise InputError(f"{path}: part mask is {part.shape[1]}x{part.shape[0]}, other parts are "
                             f"{labels.shape[1]}x{labels.shape[0]}")
        labels[part] = label
    return resize_mask(torch.from_numpy(labels.astype(np.int64)), size)


def keep_outside_face(sample: dict) -> torch.Tensor:
    """Default keep-mask for the image_mask export: keep everything but the face (skin to lips), regenerate that."""
    return (~torch.isin(sample["mask"], torch.tensor(FACE_LABELS))).float()


def export(
    dataset: Dataset,
    root: str | Path,
    layouts: Sequence[str] = LAYOUTS,
    n: int | None = None,
    attribute: str = "Male",
    keep_mask: Callable[[dict], torch.Tensor] = keep_outside_face,
    overwrite: bool = False,
) -> Path:
    """Write the first `n` samples of `dataset` into the named `layouts` under `root` (see the module docstring).

    CelebA-HQ-family files use the numeric sample name (else its index) as id. `attribute` picks the class folders;
    `keep_mask(sample)` gives the image_mask keep-mask ([H, W] or [3, H, W] in [0, 1]). Refuses to write into
    existing layout outputs unless `overwrite`.
    """
    root = Path(root)
    unknown = sorted(set(layouts) - set(LAYOUTS))
    if unknown:
        raise InputError(f"layouts {unknown}: unknown; choose from {list(LAYOUTS)}")
    n = len(dataset) if n is None else n
    if not 0 < n <= len(dataset):
        raise InputError(f"n={n}: must lie in 1..{len(dataset)} (the dataset size)")
    names = list(getattr(dataset, "attribute_names", []))
    if {"attr_txt", "class_folders"} & set(layouts) and not names:
        raise InputError("dataset has no attribute_names; the attr_txt and class_folders layouts need them")
    if "class_folders" in layouts and attribute not in names:
        raise InputError(f"attribute={attribute!r}: not one of the dataset's attributes {names}")
    if not overwrite:
        _refuse_existing(root, layouts, attribute)

    captions, attribute_rows = {}, []
    for i in tqdm(range(n), desc=f"export to {root}", disable=None):
        sample = dataset[i]
        image, name = sample["image"], str(sample["name"])
        image_id = int(name) if name.isdigit() else int(sample["index"])
        file = f"{image_id}.jpg"
        if "celebahq" in layouts:
            save_image(image, root / IMAGE_DIR / file, overwrite)
        if "celebamask" in layouts:
            _write_celebamask(sample["mask"], root, image_id, overwrite)
        if "dialog" in layouts:
            # facelab's captions are not split per attribute, so attribute_wise_captions stays empty.
            captions[file] = {"overall_caption": sample["caption"], "attribute_wise_captions": {}}
        if "attr_txt" in layouts:
            values = " ".join("1" if v > 0.5 else "-1" for v in sample["attributes"].tolist())
            attribute_rows.append(f"{file}  {values}")
        if "image_mask" in layouts:
            save_image(image, root / "images" / f"{name}.png", overwrite)
            save_image(keep_mask(sample) * 2 - 1, root / "masks" / f"{name}.png", overwrite)
        if "class_folders" in layouts:
            label = int(sample["attributes"][names.index(attribute)] > 0.5)
            save_image(image, root / attribute / str(label) / f"{name}.png", overwrite)
    if "dialog" in layouts:
        _write_text(root / CAPTIONS_FILE, json.dumps(captions, indent=1) + "\n", overwrite)
    if "attr_txt" in layouts:
        _write_text(root / ATTRIBUTE_FILE, "\n".join([str(n), " ".join(names), *attribute_rows]) + "\n", overwrite)
    return root


def _write_celebamask(mask: torch.Tensor, root: Path, image_id: int, overwrite: bool) -> None:
    save_mask(mask, root / MASK_DIR / f"{image_id}.png", overwrite=overwrite)
    folder = root / PART_DIR / str(image_id // IDS_PER_PART_FOLDER)
    for label, part in enumerate(PART_NAMES, start=1):
        inside = mask == label
        if inside.any():
            save_image(inside.float() * 2 - 1, folder / f"{image_id:05d}_{part}.png", overwrite)


def _write_text(path: Path, text: str, overwrite: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "w" if overwrite else "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists; not overwriting it (pass overwrite=True)") from None


def _refuse_existing(root: Path, layouts: Sequence[str], attribute: str) -> None:
    outputs = {
        "celebahq": [IMAGE_DIR], "celebamask": [MASK_DIR, PART_DIR], "dialog": [CAPTIONS_FILE],
        "attr_txt": [ATTRIBUTE_FILE], "image_mask": ["images", "masks"], "class_folders": [attribute],
    }
    existing = [root / path for layout in layouts for path in outputs[layout] if (root / path).exists()]
    if existing:
        raise FileExistsError(f"{existing[0]}: already exists; export into a new folder or pass overwrite=True")


def _natural_key(name: str) -> list:
    return [int(token) if token.isdigit() else token for token in re.split(r"(\d+)", name)]


def _list_images(folder: Path) -> dict[str, Path]:
    """Image files of a folder keyed by stem, in natural order; errors on a missing or empty folder."""
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found")
    images: dict[str, Path] = {}
    for path in folder.iterdir():
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if path.stem in images:
            raise InputError(f"{folder}: two images named {path.stem!r} ({images[path.stem].name}, {path.name})")
        images[path.stem] = path
    if not images:
        raise InputError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return {stem: images[stem] for stem in sorted(images, key=_natural_key)}


def _scan_part_masks(folder: Path) -> dict[str, list[tuple[int, Path]]]:
    """CelebAMask-HQ part files {id: [(label, path), ...]} in overlay order, from all sub-folders of `folder`."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for path in sorted(folder.glob("*/*.png")):
        match = _PART_FILE.match(path.name)
        if match and match.group(2) in PART_NAMES:
            found.setdefault(str(int(match.group(1))), []).append((SEG_CLASSES.index(match.group(2)), path))
    if not found:
        raise InputError(f"{folder}: no part masks named like 0/00000_skin.png")
    return {key: sorted(parts) for key, parts in found.items()}


def _check_matched(names: Sequence[str], available, source: Path, what: str) -> None:
    missing = [name for name in names if name not in available]
    if missing:
        unused = sorted(set(available) - set(names), key=_natural_key)
        hint = f"; unmatched {what}s: {_preview(unused)}" if unused else ""
        raise InputError(f"{source}: no {what} for {len(missing)} image(s): {_preview(missing)}{hint}")


def _preview(names: Sequence[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(name if name.isprintable() and name.strip() == name and name else repr(name)
                     for name in names[:limit]) + more


def _select_split(images: dict[str, Path], root: Path, split: str | Path) -> dict[str, Path]:
    path = next((p for p in (root / "splits" / f"{split}.txt", Path(split)) if p.is_file()), None)
    if path is None:
        raise InputError(f"split {str(split)!r}: neither {root / 'splits' / f'{split}.txt'} nor a file")
    wanted = [Path(line.split()[0]).stem for line in _read_text(path).splitlines() if line.strip()]
    missing = [name for name in wanted if name not in images]
    if missing:
        raise InputError(f"{path}: {len(missing)} listed image(s) not in {IMAGE_DIR}/: {_preview(missing)}")
    if not wanted:
        raise InputError(f"{path}: empty split file")
    return {name: images[name] for name in wanted}


def _read_text(path: Path) -> str:
    """A UTF-8 text file's contents, or one line saying why not."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise InputError(f"{path}: unreadable ({err.strerror})") from None


def _caption_text(entry, path: Path, name: str) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict):
        for key in ("overall_caption", "Beard_and_Age"):  # CelebA-Dialog, Collaborative Diffusion
            if isinstance(entry.get(key), str):
                return entry[key]
    raise InputError(f"{path}: entry for {name!r} has no 'overall_caption' text")


def _wxh(tensor: torch.Tensor) -> str:
    return f"{tensor.shape[-1]}x{tensor.shape[-2]}"
