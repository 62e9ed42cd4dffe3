"""Reading and writing images, CelebAMask-HQ label maps and keep-masks.

Images are float tensors [3, H, W] in [-1, 1]; files hold clamp((x + 1) * 127.5). Label maps are int64 [H, W] with
CelebAMask-HQ classes 0..18. Keep-masks are float [3, H, W] in [0, 1], white = keep.
"""
from __future__ import annotations

from math import isqrt
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from facelab.io.errors import InputError

# Colours of CelebAMask-HQ's colour visualisation (its g_color.py), indexed by class label 0..18.
CELEBAMASK_PALETTE = np.array(
    [
        [0, 0, 0], [204, 0, 0], [76, 153, 0], [204, 204, 0], [51, 51, 255], [204, 0, 204], [0, 255, 255],
        [255, 204, 204], [102, 51, 0], [255, 0, 0], [102, 204, 0], [255, 255, 0], [0, 0, 153], [0, 0, 204],
        [255, 51, 153], [0, 204, 204], [0, 51, 0], [255, 153, 51], [0, 204, 0],
    ],
    dtype=np.uint8,
)
NUM_CLASSES = len(CELEBAMASK_PALETTE)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
TENSOR_SUFFIXES = frozenset({".pt", ".pth", ".npy"})
MASK_STYLES = ("index", "palette", "colour")

# An RGB mask is colour-coded if at most this fraction of its pixels lie farther than this from every palette colour.
_FAR_DISTANCE = 48
_MAX_FAR_FRACTION = 0.2

Size = int | tuple[int, int] | None


def read_image(path: str | Path, size: Size = None) -> torch.Tensor:
    """Read an image as float RGB [3, H, W] in [-1, 1], resized (antialiased bicubic) to `size` if given."""
    img = _resize(_open(path).convert("RGB"), size, Image.Resampling.BICUBIC)
    return _to_tensor(img) / 127.5 - 1


def read_image_folder(folder: str | Path | None, size: int) -> tuple[list[str], torch.Tensor]:
    """The .png/.jpg images of `gt_path=folder`, sorted by name: their stems and [N, 3, size, size] in [-1, 1].
    An image of another size is refused (a model reads exactly its own)."""
    if not folder or not Path(folder).is_dir():
        raise InputError(f"method.input=images needs gt_path=DIR with the images to edit (got {folder})")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise InputError(f"gt_path={folder}: no .png/.jpg images")
    images = [read_image(p) for p in paths]
    for path, image in zip(paths, images):
        if image.shape[1:] != (size, size):
            raise InputError(f"{path}: {image.shape[2]}x{image.shape[1]} px, the model needs {size}x{size}; resize "
                             "the images first")
    return [p.stem for p in paths], torch.stack(images)


def save_image(image: torch.Tensor, path: str | Path, overwrite: bool = False) -> Path:
    """Write an image in [-1, 1] ([3, H, W], [1, H, W] or [H, W]) as clamp((x + 1) * 127.5); JPEG at quality 95.

    Refuses to replace an existing file unless `overwrite`.
    """
    x = image.detach().float().cpu()
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() == 3 and x.shape[0] == 3:
        x = x.permute(1, 2, 0)
    elif x.dim() != 2:
        raise ValueError(f"{path}: expected an image of shape [3, H, W], [1, H, W] or [H, W], got {list(image.shape)}")
    pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return _write(Image.fromarray(pixels), path, overwrite)


def read_mask(path: str | Path, size: Size = None) -> torch.Tensor:
    """Read a CelebAMask-HQ label map as int64 [H, W], nearest-resized to `size` if given.

    Accepts index PNGs (mode L/P holding 0..18), palette PNGs, RGB PNGs in `CELEBAMASK_PALETTE` colours (mapped to
    the nearest colour, so JPEG noise is tolerated), and .pt/.pth/.npy tensors: a [19, H*W] or [19, H, W] one-hot
    (Collaborative Diffusion's format) or an [H, W] label map.
    """
    path = Path(path)
    if path.suffix.lower() in TENSOR_SUFFIXES:
        labels = _labels_from_tensor_file(path)
    else:
        labels = _labels_from_image(_open(path), path)
    labels = np.asarray(labels).astype(np.int64)
    if labels.size and labels.min() < 0:
        raise InputError(f"{path}: negative label {labels.min()}; CelebAMask-HQ labels are 0..{NUM_CLASSES - 1}")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise InputError(f"{path}: labels up to {labels.max()} but CelebAMask-HQ has {NUM_CLASSES} classes")
    return resize_mask(torch.from_numpy(labels), size)


def resize_mask(mask: torch.Tensor, size: Size) -> torch.Tensor:
    """Nearest-resize a label map [H, W] (output pixel i samples input pixel floor((i + 0.5) * scale))."""
    hw = _hw(size)
    if hw is None or tuple(mask.shape) == hw:
        return mask
    img = _resize(Image.fromarray(_checked_labels(mask).astype(np.uint8)), hw, Image.Resampling.NEAREST)
    return torch.from_numpy(np.asarray(img).astype(np.int64))


def colorize_mask(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """Colour a label map [H, W] with `CELEBAMASK_PALETTE`, giving uint8 RGB [H, W, 3]."""
    return CELEBAMASK_PALETTE[_checked_labels(mask)]


def save_mask(mask: torch.Tensor | np.ndarray, path: str | Path, style: str = "index", overwrite: bool = False) -> Path:
    """Write a label map [H, W] as a greyscale index PNG, a palette PNG (indices + palette) or an RGB colour PNG."""
    labels = _checked_labels(mask).astype(np.uint8)
    if style == "colour":
        img = Image.fromarray(CELEBAMASK_PALETTE[labels])
    elif style in ("index", "palette"):
        img = Image.fromarray(labels)
        if style == "palette":
            img.putpalette(CELEBAMASK_PALETTE.tobytes())
    else:
        raise ValueError(f"style={style!r}: expected one of {MASK_STYLES}")
    return _write(img, path, overwrite)


def read_keep_mask(path: str | Path, size: Size = None) -> torch.Tensor:
    """Read a keep-mask image as float [3, H, W] in [0, 1] (white = keep, grey = partial), bilinear-resized.

    8-bit masks (1, L, LA, P, RGB, RGBA) scale by 1/255, 16-bit greyscale ones by 1/65535; other modes (float,
    32-bit) have no defined white and are refused rather than silently clipped.
    """
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L"):
        grey = torch.from_numpy(np.array(img, dtype=np.float32)) / 65535
        return _resize_tensor(grey.expand(3, -1, -1), size)
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        raise InputError(f"{path}: keep-masks must be 8- or 16-bit images, not PIL mode {img.mode}")
    img = _resize(img.convert("RGB"), size, Image.Resampling.BILINEAR)
    return _to_tensor(img) / 255


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """A batch [B, C, H, W] resized (antialiased bilinear) to size×size, e.g. to a classifier's input size."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False)


def _resize_tensor(x: torch.Tensor, size: Size) -> torch.Tensor:
    hw = _hw(size)
    if hw is None or tuple(x.shape[-2:]) == hw:
        return x.contiguous()
    return torch.nn.functional.interpolate(x[None], size=hw, mode="bilinear", align_corners=False)[0]


def _hw(size: Size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _resize(img: Image.Image, size: Size, resample: Image.Resampling) -> Image.Image:
    hw = _hw(size)
    if hw is None or img.size == (hw[1], hw[0]):
        return img
    return img.resize((hw[1], hw[0]), resample)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1).contiguous()


def _open(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        img = Image.open(path)
        img.load()
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{path}: unreadable image ({err})") from None
    return img


def _write(img: Image.Image, path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unknown image file extension")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        file = open(path, "wb" if overwrite else "xb")
    except FileExistsError:
        raise FileExistsError(f"{path}: already exists; not overwriting it (pass overwrite=True)") from None
    with file:
        img.save(file, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return path


def _checked_labels(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    labels = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if labels.ndim != 2:
        raise ValueError(f"expected a label map [H, W], got shape {list(labels.shape)}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _rgb_keys(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _labels_from_image(img: Image.Image, path: Path) -> np.ndarray:
    if img.mode == "P":
        indices = np.asarray(img)
        palette = img.getpalette("RGB")
        if palette is None:
            return indices
        colours = np.array(palette, dtype=np.uint8).reshape(-1, 3)
        used = np.unique(indices)
        if used.max() < len(colours) and np.isin(_rgb_keys(colours[used]), _rgb_keys(CELEBAMASK_PALETTE)).all():
            return _nearest_labels(colours[indices], path)  # palette colours decide, whatever the index order
        return indices
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img.convert("RGB"))
        if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return rgb[..., 0]  # a greyscale index map stored as RGB
        return _nearest_labels(rgb, path)
    return np.asarray(img.convert("L") if img.mode in ("1", "LA") else img)


def _nearest_labels(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map RGB pixels to the label of the nearest palette colour; error if the image is not colour-coded."""
    keys, inverse, counts = np.unique(_rgb_keys(rgb).ravel(), return_inverse=True, return_counts=True)
    colours = np.stack([(keys >> 16) & 255, (keys >> 8) & 255, keys & 255], axis=-1)
    dist2 = ((colours[:, None, :] - CELEBAMASK_PALETTE[None].astype(np.int64)) ** 2).sum(-1)
    far_fraction = counts[dist2.min(1) > _FAR_DISTANCE**2].sum() / counts.sum()
    if far_fraction > _MAX_FAR_FRACTION:
        raise InputError(
            f"{path}: not a CelebAMask-HQ label map ({far_fraction:.0%} of pixels are far from every palette colour); "
            "expected an index, palette or colour-coded mask"
        )
    return dist2.argmin(1)[inverse].reshape(rgb.shape[:2])


def _labels_from_tensor_file(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(array, torch.Tensor):
                raise TypeError(f"holds a {type(array).__name__}, not a tensor")
            array = array.numpy()
    except Exception as err:  # any failure to decode the file is the file's fault
        raise InputError(f"{path}: unreadable tensor file ({err})") from None
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2 and array.shape[0] == NUM_CLASSES and isqrt(array.shape[1]) ** 2 == array.shape[1]:
        side = isqrt(array.shape[1])
        return array.argmax(0).reshape(side, side)  # one-hot over a row-major flattened square map
    if array.ndim == 3 and array.shape[0] == NUM_CLASSES:
        return array.argmax(0)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
        return array
    raise InputError(
        f"{path}: expected a [19, H*W] or [19, H, W] one-hot or an integer [H, W] label map, got {list(array.shape)}"
    )
