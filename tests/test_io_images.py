import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from facelab.data.synthetic import SyntheticFaces
from facelab.io import (
    CELEBAMASK_PALETTE,
    InputError,
    colorize_mask,
    read_image,
    read_keep_mask,
    read_mask,
    resize_mask,
    save_image,
    save_mask,
)


@pytest.fixture(scope="module")
def face():
    return SyntheticFaces(size=32, length=1)[0]


def test_png_round_trip_is_exact(tmp_path, face):
    path = save_image(face["image"], tmp_path / "face.png")
    expected = ((face["image"] + 1) * 127.5).round() / 127.5 - 1
    assert torch.allclose(read_image(path), expected, atol=1e-6)


def test_jpeg_round_trip_within_tolerance_and_resize(tmp_path, face):
    path = save_image(face["image"], tmp_path / "face.jpg")
    assert (read_image(path) - face["image"]).abs().mean() < 0.05
    assert read_image(path, 16).shape == (3, 16, 16)
    assert read_image(path, (8, 24)).shape == (3, 8, 24)


def test_save_image_refuses_to_overwrite(tmp_path, face):
    path = save_image(face["image"], tmp_path / "face.png")
    with pytest.raises(FileExistsError, match="face.png"):
        save_image(-face["image"], path)
    save_image(-face["image"], path, overwrite=True)
    assert torch.allclose(read_image(path), -face["image"], atol=1 / 127)


@pytest.mark.parametrize("style", ["index", "palette", "colour"])
def test_mask_styles_decode_to_the_same_labels(tmp_path, face, style):
    path = save_mask(face["mask"], tmp_path / f"{style}.png", style=style)
    assert Image.open(path).mode == {"index": "L", "palette": "P", "colour": "RGB"}[style]
    assert torch.equal(read_mask(path), face["mask"])


def test_noisy_colour_mask_maps_to_nearest_palette_colour(tmp_path, face):
    noise = np.random.default_rng(0).integers(-12, 13, size=(32, 32, 3))
    rgb = np.clip(colorize_mask(face["mask"]).astype(int) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "noisy.png")
    assert torch.equal(read_mask(tmp_path / "noisy.png"), face["mask"])


def test_palette_png_is_decoded_by_colour_not_index_order(tmp_path, face):
    order = np.random.default_rng(1).permutation(19)  # index k shows the colour of label order[k]
    img = Image.fromarray(np.argsort(order)[face["mask"].numpy()].astype(np.uint8))
    img.putpalette(CELEBAMASK_PALETTE[order].tobytes())
    img.save(tmp_path / "shuffled.png")
    assert torch.equal(read_mask(tmp_path / "shuffled.png"), face["mask"])


def test_grey_rgb_and_tensor_label_maps(tmp_path, face):
    labels = face["mask"].numpy().astype(np.uint8)
    Image.fromarray(np.stack([labels] * 3, -1)).save(tmp_path / "grey_rgb.png")
    assert torch.equal(read_mask(tmp_path / "grey_rgb.png"), face["mask"])
    one_hot = torch.nn.functional.one_hot(face["mask"].flatten(), 19).T.float()  # [19, 1024], codiff's format
    torch.save(one_hot, tmp_path / "one_hot.pt")
    assert torch.equal(read_mask(tmp_path / "one_hot.pt"), face["mask"])
    np.save(tmp_path / "labels.npy", labels)
    assert torch.equal(read_mask(tmp_path / "labels.npy", 16), resize_mask(face["mask"], 16))


def test_resize_mask_samples_pixel_centres():
    mask = torch.arange(16).reshape(4, 4)
    assert resize_mask(mask, 2).tolist() == [[5, 7], [13, 15]]


def test_labels_above_18_name_the_file(tmp_path):
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((4, 4), 23, np.uint8)).save(tmp_path / "masks" / "0001.png")
    with pytest.raises(InputError, match=r"masks/0001.png: labels up to 23 but CelebAMask-HQ has 19 classes"):
        read_mask(tmp_path / "masks" / "0001.png")


def test_photo_is_not_a_mask(tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(InputError, match="photo.png: not a CelebAMask-HQ label map"):
        read_mask(tmp_path / "photo.png")


def test_corrupt_truncated_and_missing_files(tmp_path, face):
    (tmp_path / "mask.png").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match=r"mask.png: not an image \(cannot identify image file\)"):
        read_mask(tmp_path / "mask.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(InputError, match="junk.png: unreadable image"):
        read_mask(tmp_path / "junk.png")
    whole = save_image(face["image"], tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="cut.png: unreadable image"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(InputError, match="absent.png: no such file"):
        read_keep_mask(tmp_path / "absent.png")
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(InputError, match="bad.pt: unreadable tensor file"):
        read_mask(tmp_path / "bad.pt")


def test_keep_mask_is_white_keep_with_grey(tmp_path):
    Image.fromarray(np.array([[0, 255], [128, 255]], np.uint8)).save(tmp_path / "keep.png")
    keep = read_keep_mask(tmp_path / "keep.png")
    assert keep.shape == (3, 2, 2) and keep.dtype == torch.float32
    assert torch.allclose(keep[1], torch.tensor([[0, 1], [128 / 255, 1]]))
    assert read_keep_mask(tmp_path / "keep.png", 8).shape == (3, 8, 8)


def test_colorize_mask_uses_palette_and_checks_range(face):
    rgb = colorize_mask(face["mask"])
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    assert (rgb == CELEBAMASK_PALETTE[face["mask"].numpy()]).all()
    with pytest.raises(ValueError, match="0..18"):
        colorize_mask(torch.full((2, 2), 19))


def test_keep_mask_bit_depths(tmp_path):
    import numpy as np
    from PIL import Image

    grey16 = tmp_path / "m16.png"
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(grey16)
    assert abs(read_keep_mask(grey16).mean().item() - 32768 / 65535) < 1e-6
    assert read_keep_mask(grey16, size=8).shape == (3, 8, 8)
    floats = tmp_path / "mf.tif"
    Image.fromarray(np.full((4, 4), 2.0, np.float32)).save(floats)
    with pytest.raises(InputError, match="mf.tif: keep-masks must be 8- or 16-bit"):
        read_keep_mask(floats)


# --- hostile inputs: one InputError line or a correct read ------------------------------------------------------------
def _png(width, height, bit_depth, colour_type, rows=None, extra=()):
    """A PNG built chunk by chunk: rows are the unfiltered scanlines (bytes), or None for a header-only file."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    body += b"".join(chunk(kind, data) for kind, data in extra)
    if rows is not None:
        body += chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for row in rows)))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


def test_16_bit_grey_png_scales_by_65535(tmp_path):
    values = np.array([[0, 1000, 32768], [40000, 60000, 65535]], np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    image = read_image(tmp_path / "grey16.png")
    assert image.shape == (3, 2, 3)
    assert torch.allclose(image, torch.from_numpy(values / 65535 * 2 - 1).float().expand(3, -1, -1), atol=1e-6)
    assert read_image(tmp_path / "grey16.png", 8).shape == (3, 8, 8)
    assert read_image(tmp_path / "grey16.png", 8).abs().max() <= 1


def test_16_bit_colour_png_reads_to_8_bit_precision(tmp_path):
    rgb = np.array([[[0, 30000, 65535], [40000, 1234, 50000]]], np.uint16)  # [1, 2, 3]
    (tmp_path / "rgb16.png").write_bytes(_png(2, 1, 16, 2, [rgb.astype(">u2").tobytes()]))
    expected = torch.from_numpy(rgb / 65535 * 2 - 1).float().permute(2, 0, 1)
    assert (read_image(tmp_path / "rgb16.png") - expected).abs().max() < 2 / 255


def test_palette_grey_cmyk_images_read_as_rgb(tmp_path, face):
    rgb = ((face["image"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    assert torch.allclose(read_image(tmp_path / "palette.png"),
                          _to_signed(np.asarray(Image.open(tmp_path / "palette.png").convert("RGB"))))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    assert torch.allclose(read_image(tmp_path / "grey.png"), _to_signed(np.stack([rgb[..., 0]] * 3, -1)))
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.tif")
    assert torch.allclose(read_image(tmp_path / "cmyk.tif"), _to_signed(rgb), atol=1.5 / 127.5)


def test_alpha_is_composited_over_white(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    expected = np.array([[[200, 100, 50], [255, 255, 255], [227, 177, 152]]])
    assert (read_image(tmp_path / "rgba.png") - _to_signed(expected)).abs().max() <= 1.01 / 127.5
    Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png")[0] - _to_signed(expected)[0]).abs().max() <= 1.01 / 127.5


def _to_signed(rgb):
    return torch.from_numpy(np.asarray(rgb, np.float32)).permute(2, 0, 1) / 127.5 - 1


@pytest.mark.parametrize("reader", [read_image, read_keep_mask, read_mask])
@pytest.mark.parametrize("side", [100_000, 9_000])  # above Pillow's own limit, and between MAX_PIXELS and Pillow's
def test_decompression_bomb_is_refused_unread(tmp_path, reader, side):
    (tmp_path / "bomb.png").write_bytes(_png(side, side, 8, 2, rows=None))
    with pytest.raises(InputError, match=r"bomb.png: image (header claims|is) .*MAX_PIXELS=67108864") as err:
        reader(tmp_path / "bomb.png")
    assert "\n" not in str(err.value)


def test_lossy_label_maps_are_refused(tmp_path, face):
    labels = face["mask"].numpy().astype(np.uint8)
    Image.fromarray(labels).save(tmp_path / "index.jpg", quality=95)
    with pytest.raises(InputError, match="index.jpg: label map stored as JPEG, a lossy format"):
        read_mask(tmp_path / "index.jpg")
    Image.fromarray(colorize_mask(face["mask"])).save(tmp_path / "colour.webp", quality=90)
    with pytest.raises(InputError, match="colour.webp: label map stored as lossy WebP"):
        read_mask(tmp_path / "colour.webp")
    Image.fromarray(colorize_mask(face["mask"])).save(tmp_path / "colour_lossless.webp", lossless=True)
    assert torch.equal(read_mask(tmp_path / "colour_lossless.webp"), face["mask"])
    Image.fromarray(labels).save(tmp_path / "index.tif", compression="tiff_lzw")
    assert torch.equal(read_mask(tmp_path / "index.tif"), face["mask"])
    assert (read_image(tmp_path / "index.jpg") - read_image(tmp_path / "index.tif")).abs().max() < 0.1  # images: fine


def test_float_label_maps_must_hold_whole_numbers(tmp_path, face):
    labels = face["mask"].numpy().astype(np.float32)
    Image.fromarray(labels).save(tmp_path / "whole.tif")
    assert torch.equal(read_mask(tmp_path / "whole.tif"), face["mask"])
    labels[0, :5] += 0.5
    Image.fromarray(labels).save(tmp_path / "float.tif")
    with pytest.raises(InputError, match=r"float.tif: 5 of 1024 label-map values are not whole numbers \(e.g. "):
        read_mask(tmp_path / "float.tif")
    np.save(tmp_path / "float.npy", labels)
    with pytest.raises(InputError, match="float.npy: 5 of 1024 label-map values are not whole numbers"):
        read_mask(tmp_path / "float.npy")
    one_hot = torch.nn.functional.one_hot(face["mask"], 19).permute(2, 0, 1).float()
    one_hot[3, 4, 5] = float("nan")
    torch.save(one_hot, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="nan.pt: 1 values are NaN or infinite"):
        read_mask(tmp_path / "nan.pt")
    np.save(tmp_path / "rows.npy", np.zeros((19, 1000), np.int64))
    with pytest.raises(InputError, match="rows.npy: shape .19, 1000. looks like a .19, H.W. one-hot but 1000"):
        read_mask(tmp_path / "rows.npy")
    np.save(tmp_path / "text.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(InputError, match="text.npy: holds <U1 values"):
        read_mask(tmp_path / "text.npy")


@pytest.mark.parametrize("name", ["a b, c 'q' \"d\".png", "visage é ñ 漢字.png", b"\xff\xfe bytes \xc3(.png"])
def test_unusual_file_names_read_fine(tmp_path, face, name):
    path = tmp_path / (os.fsdecode(name) if isinstance(name, bytes) else name)
    save_image(face["image"], path)
    assert torch.allclose(read_image(path), read_image(save_image(face["image"], tmp_path / "plain.png")))
    assert torch.allclose(read_image(os.fsencode(path)), read_image(path))
    save_mask(face["mask"], path.with_suffix(".mask.png"))
    assert torch.equal(read_mask(path.with_suffix(".mask.png")), face["mask"])
    assert read_keep_mask(path).shape == (3, 32, 32)
    path.with_suffix(".bad.png").write_bytes(b"")
    with pytest.raises(InputError) as err:
        read_image(path.with_suffix(".bad.png"))
    message = str(err.value)
    message.encode("utf-8")  # printable: undecodable bytes are shown as \xNN
    assert message.startswith(str(tmp_path)) and "empty file (0 bytes)" in message


def test_empty_truncated_and_corrupt_files_are_one_line(tmp_path, face):
    whole = save_image(face["image"], tmp_path / "whole.png").read_bytes()
    cases = {
        "empty.png": b"",
        "no_iend.png": whole[:-12],
        "half.png": whole[: len(whole) // 2],
        "flipped.png": whole[:60] + bytes([whole[60] ^ 1]) + whole[61:],  # inside IDAT: Pillow alone misses it
        "text.jpg": b"hello, I am not an image\n",
        "header_only.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        for reader in (read_image, read_keep_mask, read_mask):
            with pytest.raises(InputError, match=rf"{name}: (empty file|unreadable image|not an image)") as err:
                reader(tmp_path / name)
            assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"flipped.png: unreadable image \(corrupt PNG: checksum mismatch in a 'IDAT'"):
        read_image(tmp_path / "flipped.png")


def test_float_and_32_bit_images_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(InputError, match="float.tif: images must be 8-bit .* not PIL mode F"):
        read_image(tmp_path / "float.tif")
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "int32.tif")
    with pytest.raises(InputError, match="int32.tif: images must be 8-bit .* not PIL mode I "):
        read_image(tmp_path / "int32.tif")
