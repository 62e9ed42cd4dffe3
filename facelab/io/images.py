"""Reading and writing images, CelebAMask-HQ label maps and keep-masks.

Images are float tensors [3, H, W] in [-1, 1]; files hold clamp((x + 1) * 127.5). Label maps are int64 [H, W] with
CelebAMask-HQ classes 0..18. Keep-masks are float [3, H, W] in [0, 1], white = keep.

Bad input ends in one `InputError` line naming the file, what was found and what is allowed, never a traceback or a
silently wrong result:

- empty, truncated, corrupt (a PNG whose chunk checksums do not match) and non-image files are refused;
- images of more than `MAX_PIXELS` pixels (decompression bombs: a small file whose header claims e.g.
  100000x100000) are refused before their pixels are decoded;
- image colour: 8-bit 1/L/P/RGB/CMYK/YCbCr images convert to RGB; images with alpha (LA, PA, RGBA, a palette or
  grey with a transparent colour) are composited over white; 16-bit greyscale scales by 1/65535 (16-bit colour PNGs
  are reduced to 8 bits by Pillow when read, an error below 1/255); float and 32-bit modes have no defined white and
  are refused;
- label maps must be lossless: JPEG (and lossy WebP, JPEG-compressed TIFF) is refused, since its noise moves labels
  at every region edge; float label maps (TIFF mode F, float tensors) are read only if every value is a whole number;
- file names may hold any character, including bytes that are not UTF-8 (shown as \\xNN in messages).
"""
from __future__ import annotations

import io
import os
import re
import warnings
import zlib
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

# The most pixels (width * height) an image or label map may have: 8192x8192, 64 times a 1024x1024 CelebA-HQ face.
# Larger headers are refused unread (Pillow's own limit, Image.MAX_IMAGE_PIXELS, is larger and only warns at first).
MAX_PIXELS = 8192 * 8192
IMAGE_FORMATS = "PNG, JPEG, BMP, WebP or TIFF"
# Modes read_image converts to RGB (those with alpha are composited over white) and 16-bit greyscale modes.
_RGB_MODES = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
_GREY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
_LABEL_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "F"}) | _GREY16_MODES
# Lossless formats a label map may be stored in (TIFF and WebP only when not lossy-compressed).
_LABEL_FORMATS = frozenset({"PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM", "TGA"})
_LABEL_FORMATS_TEXT = "PNG, BMP, GIF, TIFF (not JPEG-compressed), lossless WebP, PPM, TGA or a .npy/.pt/.pth tensor"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

Size = int | tuple[int, int] | None
PathLike = str | bytes | os.PathLike


def read_image(path: PathLike, size: Size = None) -> torch.Tensor:
    """Read an image as float RGB [3, H, W] in [-1, 1], resized (antialiased bicubic) to `size` if given.

    Alpha is composited over white; 16-bit greyscale keeps its 16 bits; see the module docstring for the modes.
    """
    img = _open(path)
    if img.mode in _GREY16_MODES:
        grey = Image.fromarray(np.asarray(img, dtype=np.float32) / 65535)  # mode F: Pillow resizes it like 8-bit
        grey = np.asarray(_resize(grey, size, Image.Resampling.BICUBIC), dtype=np.float32).clip(0, 1)
        return torch.from_numpy(grey * 2 - 1).expand(3, -1, -1).contiguous()
    if img.mode not in _RGB_MODES:
        raise InputError(f"{_shown(path)}: images must be 8-bit ({', '.join(sorted(_RGB_MODES))}) or 16-bit "
                         f"greyscale, not PIL mode {img.mode} (no defined white); save it as 8- or 16-bit")
    if img.mode != "RGB" and img.has_transparency_data:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    img = _resize(img.convert("RGB"), size, Image.Resampling.BICUBIC)
    return _to_tensor(img) / 127.5 - 1


def read_image_folder(folder: str | Path | None, size: int) -> tuple[list[str], torch.Tensor]:
    """The .png/.jpg images of `gt_path=folder`, sorted by name: their stems and [N, 3, size, size] in [-1, 1].
    An image of another size is refused (a model reads exactly its own)."""
    if not folder or not Path(os.fsdecode(folder)).is_dir():
        raise InputError(f"method.input=images needs gt_path=DIR with the images to edit (got {_shown(folder or '')})")
    folder = Path(os.fsdecode(folder))
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not paths:
        raise InputError(f"gt_path={_shown(folder)}: no .png/.jpg images")
    images = [read_image(p) for p in paths]
    for path, image in zip(paths, images):
        if image.shape[1:] != (size, size):
            raise InputError(f"{_shown(path)}: {image.shape[2]}x{image.shape[1]} px, the model needs {size}x{size}; "
                             "resize the images first")
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


def read_mask(path: PathLike, size: Size = None) -> torch.Tensor:
    """Read a CelebAMask-HQ label map as int64 [H, W], nearest-resized to `size` if given.

    Accepts index images (mode L/P/I;16/I holding 0..18, or F holding whole numbers), palette PNGs, RGB PNGs in
    `CELEBAMASK_PALETTE` colours (mapped to the nearest colour, so small noise from e.g. resizing is tolerated), and
    .pt/.pth/.npy tensors: a [19, H*W] or [19, H, W] one-hot (Collaborative Diffusion's format) or an [H, W] label
    map. Lossy files (JPEG, lossy WebP, JPEG-compressed TIFF) are refused: their noise moves labels at region edges.
    """
    path = Path(os.fsdecode(path))
    if path.suffix.lower() in TENSOR_SUFFIXES:
        labels = _labels_from_tensor_file(path)
    else:
        labels = _labels_from_image(_open(path, label_map=True), path)
    labels = np.asarray(labels).astype(np.int64)
    name = _shown(path)
    if labels.ndim != 2 or labels.size == 0:
        raise InputError(f"{name}: expected a non-empty [H, W] label map, got shape {list(labels.shape)}")
    if labels.min() < 0:
        raise InputError(f"{name}: negative label {labels.min()}; CelebAMask-HQ labels are 0..{NUM_CLASSES - 1}")
    if labels.max() >= NUM_CLASSES:
        raise InputError(f"{name}: labels up to {labels.max()} but CelebAMask-HQ has {NUM_CLASSES} classes")
    if labels.shape[0] * labels.shape[1] > MAX_PIXELS:
        raise InputError(f"{name}: {labels.shape[1]}x{labels.shape[0]} label map, more than MAX_PIXELS={MAX_PIXELS}")
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


def read_keep_mask(path: PathLike, size: Size = None) -> torch.Tensor:
    """Read a keep-mask image as float [3, H, W] in [0, 1] (white = keep, grey = partial), bilinear-resized.

    8-bit masks (1, L, LA, P, RGB, RGBA) scale by 1/255, 16-bit greyscale ones by 1/65535; other modes (float,
    32-bit) have no defined white and are refused rather than silently clipped.
    """
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L"):
        grey = torch.from_numpy(np.array(img, dtype=np.float32)) / 65535
        return _resize_tensor(grey.expand(3, -1, -1), size)
    if img.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        raise InputError(f"{_shown(path)}: keep-masks must be 8- or 16-bit images (1, L, LA, P, RGB, RGBA, I;16), "
                         f"not PIL mode {img.mode}")
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


def _shown(path: PathLike) -> str:
    """A file name as printable text: bytes that are not UTF-8 (surrogate escapes) appear as \\xNN."""
    text = os.fsdecode(path)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _open(path: PathLike, label_map: bool = False) -> Image.Image:
    """Decode an image file, turning every failure into one InputError line (see the module docstring)."""
    path = Path(os.fsdecode(path))
    name = _shown(path)
    if not path.is_file():
        raise InputError(f"{name}: no such file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{name}: cannot read the file ({err.strerror or _one_line(err)})") from None
    if not data:
        raise InputError(f"{name}: empty file (0 bytes); expected an image ({IMAGE_FORMATS})")
    if data.startswith(_PNG_SIGNATURE):
        _check_png(data, name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > MAX_PIXELS:
                raise InputError(f"{name}: image is {width}x{height} = {width * height} px, more than "
                                 f"facelab.io.images.MAX_PIXELS={MAX_PIXELS} (a decompression bomb?)")
            if width <= 0 or height <= 0:
                raise InputError(f"{name}: image is {width}x{height} px; expected at least 1x1")
            if label_map:
                _check_lossless(img, data, name)
            img.load()
        except InputError:
            raise
        except UnidentifiedImageError:
            raise InputError(f"{name}: not an image (cannot identify image file); expected {IMAGE_FORMATS}") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            found = f"{pixels.group(1)} px" if pixels else "too many pixels"
            raise InputError(f"{name}: image header claims {found}, more than facelab.io.images.MAX_PIXELS="
                             f"{MAX_PIXELS} (a decompression bomb?)") from None
        except Exception as err:  # Pillow's decoders raise many types; any failure to decode is the file's fault
            raise InputError(f"{name}: unreadable image ({_one_line(err)})") from None
    for warning in caught:  # Pillow warns, and reads on, when a file (e.g. a TIFF) ends early: refuse that
        if "truncated" in str(warning.message).lower():
            raise InputError(f"{name}: unreadable image ({_one_line(warning.message)})")
    for warning in caught:  # others (e.g. odd EXIF in a camera's JPEG) stay warnings, naming the file
        warnings.warn(f"{name}: {_one_line(warning.message)}", warning.category, stacklevel=3)
    return img


def _check_png(data: bytes, name: str) -> None:
    """Refuse a PNG that is truncated (no IEND chunk) or corrupt (a chunk's CRC-32 does not match its bytes).

    Pillow checks neither the image data's checksums nor the end, so a damaged PNG could decode to wrong pixels."""
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise InputError(f"{name}: unreadable image (truncated PNG: the file ends before its IEND chunk)")
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, end = data[pos + 4:pos + 8], pos + 12 + length
        if end > len(data):
            raise InputError(f"{name}: unreadable image (truncated PNG: the file ends inside a "
                             f"{kind.decode('latin-1')!r} chunk)")
        if zlib.crc32(data[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            raise InputError(f"{name}: unreadable image (corrupt PNG: checksum mismatch in a "
                             f"{kind.decode('latin-1')!r} chunk)")
        if kind == b"IEND":
            return
        pos = end


def _check_lossless(img: Image.Image, data: bytes, name: str) -> None:
    fmt = img.format or "unknown format"
    lossy = fmt not in _LABEL_FORMATS
    if fmt == "TIFF":
        lossy = str(img.info.get("compression", "")).lower() in ("jpeg", "tiff_jpeg", "webp")
        fmt = f"TIFF ({img.info.get('compression')} compression)" if lossy else fmt
    if fmt == "WEBP":
        lossy = _webp_is_lossy(data)
        fmt = "lossy WebP" if lossy else fmt
    if lossy:
        raise InputError(f"{name}: label map stored as {fmt}, a lossy format whose noise moves labels at region "
                         f"edges; expected a lossless {_LABEL_FORMATS_TEXT}")


def _webp_is_lossy(data: bytes) -> bool:
    """Whether a RIFF WebP file holds a lossy (VP8) image rather than a lossless (VP8L) one."""
    pos = 12
    while pos + 8 <= len(data):
        kind = data[pos:pos + 4]
        if kind == b"VP8L":
            return False
        if kind == b"VP8 ":
            return True
        size = int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return True  # no image chunk found: not known to be lossless


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
    if img.mode not in _LABEL_MODES:
        raise InputError(f"{_shown(path)}: label maps must be index (L, P, I, I;16, F), palette or colour (RGB, RGBA) "
                         f"images, not PIL mode {img.mode}")
    if img.mode == "F":
        return _whole_numbers(np.asarray(img), path)
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
            f"{_shown(path)}: not a CelebAMask-HQ label map ({far_fraction:.0%} of pixels are far from every palette "
            "colour); expected an index, palette or colour-coded mask"
        )
    return dist2.argmin(1)[inverse].reshape(rgb.shape[:2])


def _whole_numbers(array: np.ndarray, path: Path) -> np.ndarray:
    """A float label map as int64, refused if any value is not a whole number (truncating would move labels)."""
    bad = ~np.isfinite(array) | (array != np.round(array))
    if bad.any():
        raise InputError(f"{_shown(path)}: {int(bad.sum())} of {array.size} label-map values are not whole numbers "
                         f"(e.g. {array[bad].flat[0]:g}); expected integer classes 0..{NUM_CLASSES - 1}")
    return array.astype(np.int64)


def _labels_from_tensor_file(path: Path) -> np.ndarray:
    name = _shown(path)
    if not path.is_file():
        raise InputError(f"{name}: no such file")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            array = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(array, torch.Tensor):
                raise TypeError(f"holds a {type(array).__name__}, not a tensor")
            array = array.detach()
            if array.is_floating_point() and array.dtype not in (torch.float16, torch.float32, torch.float64):
                array = array.float()  # bfloat16 and the like, which numpy lacks
            array = array.numpy()
    except Exception as err:  # any failure to decode the file is the file's fault
        raise InputError(f"{name}: unreadable tensor file ({_one_line(err)})") from None
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_
                                                 or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{name}: holds {getattr(array, 'dtype', type(array).__name__)} values; expected an integer "
                         "label map or a numeric one-hot")
    if array.size == 0:
        raise InputError(f"{name}: empty tensor of shape {list(array.shape)}; expected a label map")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{name}: {int((~np.isfinite(array)).sum())} values are NaN or infinite")
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2 and array.shape[0] == NUM_CLASSES:
        side = isqrt(array.shape[1])
        if side * side != array.shape[1]:
            raise InputError(f"{name}: shape {list(array.shape)} looks like a [19, H*W] one-hot but {array.shape[1]} "
                             "is not a square number; expected a [19, H*W] (square map) or [19, H, W] one-hot")
        return array.argmax(0).reshape(side, side)  # one-hot over a row-major flattened square map
    if array.ndim == 3 and array.shape[0] == NUM_CLASSES:
        return array.argmax(0)
    if array.ndim == 2 and np.issubdtype(array.dtype, np.integer):
        return array
    if array.ndim == 2 and np.issubdtype(array.dtype, np.floating):
        return _whole_numbers(array, path)
    raise InputError(
        f"{name}: expected a [19, H*W] or [19, H, W] one-hot or an integer [H, W] label map, got {list(array.shape)}"
    )
