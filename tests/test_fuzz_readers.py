"""Property tests: every hostile file given to an image, keep-mask or label-map reader ends in a correct read or one
InputError line naming the file, never another exception type or a malformed result."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from facelab.io import InputError, read_image, read_keep_mask, read_mask

# The fast suite replays one fixed set of examples (CI must not flake); the slow LONG runs explore afresh.
FAST = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONG = settings(FAST, max_examples=600, derandomize=False)

MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F", "LAB", "HSV")
FORMATS = ("PNG", "TIFF", "BMP", "JPEG", "WEBP", "GIF", "PPM")
SUFFIX = {"PNG": ".png", "TIFF": ".tif", "BMP": ".bmp", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "PPM": ".ppm"}
READERS = {"image": read_image, "keep": read_keep_mask, "mask": read_mask}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def _header_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A valid-checksum PNG whose header claims width x height but holds one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 8)) + _chunk(b"IEND", b"")


@st.composite
def encoded_images(draw):
    """(bytes, format, mode) of a small image in a random PIL mode saved in a random format that accepts it."""
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    width, height = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        top = {"I;16": 65536, "I": 70000, "F": 20}[mode]
        values = rng.integers(0, top, size=(height, width)).astype(dtype)
        if mode == "F" and draw(st.booleans()):
            values = values + rng.random((height, width), np.float32)
        img = Image.fromarray(values)
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        img = Image.frombytes(mode, (width, height), rng.integers(0, 256, width * height * bands, np.uint8).tobytes()
                              if mode != "1" else rng.integers(0, 256, (width + 7) // 8 * height, np.uint8).tobytes())
        if mode in ("P", "PA"):
            img.putpalette(rng.integers(0, 256, 768, np.uint8).tobytes())
    buffer = io.BytesIO()
    try:
        img.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)
    return buffer.getvalue(), fmt, mode


@st.composite
def hostile_bytes(draw):
    """(bytes, suffix): an encoded image, maybe truncated, bit-flipped, spliced with junk or with a huge header."""
    kind = draw(st.sampled_from(["intact", "truncated", "flipped", "junk", "empty", "random", "huge_header"]))
    if kind == "empty":
        return b"", draw(st.sampled_from(list(SUFFIX.values())))
    if kind == "random":
        return draw(st.binary(max_size=300)), draw(st.sampled_from(list(SUFFIX.values())))
    if kind == "huge_header":
        side = draw(st.sampled_from([0, 1, 8193, 9000, 20000, 100_000, 2**31 - 1]))
        return _header_png(side, draw(st.sampled_from([side, 1, 100_000])), 8, draw(st.sampled_from([0, 2, 6]))), ".png"
    data, fmt, _ = draw(encoded_images())
    if kind == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "flipped":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        data = bytes(data)
    elif kind == "junk":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=40)) + data[at:]
    return data, SUFFIX[fmt]


def _check(reader_name: str, path, size=None):
    """Read `path`; return the result, or None after an InputError; fail on anything else or a malformed result."""
    try:
        out = READERS[reader_name](path, size)
    except InputError as err:
        message = str(err)
        assert "\n" not in message and path.name in message, message
        return None
    except Exception as err:  # the point: no other exception type may escape
        pytest.fail(f"{reader_name} on {path.name}: {type(err).__name__} escaped: {err}")
    if reader_name == "mask":
        assert out.dtype == torch.int64 and out.dim() == 2 and out.numel() > 0
        assert 0 <= out.min() and out.max() < 19
    else:
        assert out.dtype == torch.float32 and out.dim() == 3 and out.shape[0] == 3 and out.numel() > 0
        assert torch.isfinite(out).all()
        low = -1 if reader_name == "image" else 0
        assert low - 1e-6 <= out.min() and out.max() <= 1 + 1e-6
    if size is not None:
        assert tuple(out.shape[-2:]) == (size, size)
    return out


def _fuzz_readers(tmp_path, case, size):
    data, suffix = case
    path = tmp_path / f"case{suffix}"
    path.write_bytes(data)
    for name in READERS:
        _check(name, path, size)


@FAST
@given(case=hostile_bytes(), size=st.sampled_from([None, 5]))
def test_hostile_image_files_end_in_a_read_or_one_line(tmp_path, case, size):
    _fuzz_readers(tmp_path, case, size)


@pytest.mark.slow
@LONG
@given(case=hostile_bytes(), size=st.sampled_from([None, 5]))
def test_hostile_image_files_long(tmp_path, case, size):
    _fuzz_readers(tmp_path, case, size)


@FAST
@given(side=st.integers(1, 10), seed=st.integers(0, 2**32 - 1), cut=st.integers(0, 10_000),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=0, max_size=3))
def test_damaged_png_is_refused_or_reads_exactly(tmp_path, side, seed, cut, flips):
    """PNG carries checksums, so a damaged PNG must be refused unless the damage missed the image (after IEND)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue() + b"trailing bytes after IEND")
    for at, xor in flips:
        data[at % len(data)] ^= xor
    data = bytes(data[: len(data) - cut % len(data)])
    (tmp_path / "damaged.png").write_bytes(data)
    out = _check("image", tmp_path / "damaged.png")
    if out is not None:
        assert torch.equal(out, torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1)


@FAST
@given(side=st.integers(1, 10), seed=st.integers(0, 2**32 - 1),
       style=st.sampled_from(["L", "P", "colour", "I;16", "F", "npy", "pt", "one_hot"]),
       fmt=st.sampled_from(["PNG", "TIFF", "BMP", "JPEG", "WEBP", "WEBP_LOSSLESS"]))
def test_label_maps_read_exactly_or_are_refused_when_lossy(tmp_path, side, seed, style, fmt):
    from facelab.io import CELEBAMASK_PALETTE

    labels = np.random.default_rng(seed).integers(0, 19, (side, side))
    if style in ("npy", "pt", "one_hot"):
        path = tmp_path / ("labels.npy" if style == "npy" else "labels.pt")
        if style == "npy":
            np.save(path, labels)
        else:
            tensor = torch.from_numpy(labels)
            torch.save(torch.nn.functional.one_hot(tensor, 19).permute(2, 0, 1).float() if style == "one_hot"
                       else tensor, path)
        assert torch.equal(_check("mask", path), torch.from_numpy(labels))
        return
    img = {"L": lambda: Image.fromarray(labels.astype(np.uint8)),
           "P": lambda: Image.fromarray(labels.astype(np.uint8)),
           "colour": lambda: Image.fromarray(CELEBAMASK_PALETTE[labels]),
           "I;16": lambda: Image.fromarray(labels.astype(np.uint16)),
           "F": lambda: Image.fromarray(labels.astype(np.float32))}[style]()
    if style == "P":
        img.putpalette(CELEBAMASK_PALETTE.tobytes())
    path = tmp_path / f"labels{SUFFIX[fmt.split('_')[0]]}"
    buffer = io.BytesIO()
    try:
        img.save(buffer, format=fmt.split("_")[0], **({"lossless": True} if fmt == "WEBP_LOSSLESS" else {}))
    except (OSError, ValueError, KeyError):
        return  # this format cannot hold this mode
    path.write_bytes(buffer.getvalue())
    out = _check("mask", path)
    if fmt in ("JPEG", "WEBP"):
        assert out is None  # lossy: refused
    elif out is not None:  # a lossless format may still store the mode as something the reader refuses
        assert torch.equal(out, torch.from_numpy(labels))
    else:
        assert (fmt, style) in (("BMP", "I;16"), ("BMP", "F"), ("WEBP_LOSSLESS", "I;16"), ("WEBP_LOSSLESS", "F"))


@st.composite
def tensor_files(draw):
    """(bytes, suffix): a .npy or .pt holding a random shape and dtype, maybe truncated or bit-flipped."""
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 19]), max_size=4)))
    dtype = draw(st.sampled_from(["int8", "uint8", "int64", "uint64", "float16", "float32", "float64", "bool",
                                  "complex64", "<U1", "bfloat16"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.normal(0, 20, shape)
    if draw(st.booleans()):
        values = np.abs(values).round()
    if values.size and draw(st.booleans()):
        values.flat[0] = draw(st.sampled_from([np.nan, np.inf, -1.0, 19.0, 1e30]))
    suffix = draw(st.sampled_from([".npy", ".pt"]))
    buffer = io.BytesIO()
    with np.errstate(invalid="ignore", over="ignore"):
        if dtype == "bfloat16" or (suffix == ".pt" and dtype not in ("<U1", "uint64")):
            tensor = torch.from_numpy(np.asarray(values, dtype=np.float32)).to(getattr(torch, dtype)
                                                                      if dtype not in ("<U1", "uint64") else torch.float)
            torch.save(tensor, buffer)
            suffix = ".pt"
        else:
            values = np.asarray(values)  # shape () draws give a numpy scalar
            np.save(buffer, values.astype(np.str_) if dtype == "<U1" else values.astype(dtype))
            suffix = ".npy"
    data = buffer.getvalue()
    damage = draw(st.sampled_from(["none", "none", "truncate", "flip"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return data, suffix


@FAST
@given(case=tensor_files(), size=st.sampled_from([None, 3]))
def test_hostile_tensor_label_maps_end_in_a_read_or_one_line(tmp_path, case, size):
    data, suffix = case
    path = tmp_path / f"labels{suffix}"
    path.write_bytes(data)
    _check("mask", path, size)
