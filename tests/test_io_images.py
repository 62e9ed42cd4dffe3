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
