import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from facelab.data.datamodule import FaceDataModule, collate_faces
from facelab.data.export import main as export_main
from facelab.data.layouts import (
    ATTRIBUTE_FILE,
    CAPTIONS_FILE,
    IMAGE_DIR,
    MASK_DIR,
    PART_DIR,
    CelebAHQ,
    ClassFolders,
    ImageMaskFolder,
    export,
    keep_outside_face,
)
from facelab.data.synthetic import ATTRIBUTES, SyntheticFaces
from facelab.io import InputError, save_image, save_mask

N, SIZE = 12, 32
CONF = Path(__file__).resolve().parents[1] / "conf" / "data"


@pytest.fixture(scope="module")
def faces():
    return SyntheticFaces(size=SIZE, length=N, seed=3)


@pytest.fixture(scope="module")
def samples(faces):
    return [faces[i] for i in range(N)]


@pytest.fixture(scope="module")
def root(tmp_path_factory, faces):
    return export(faces, tmp_path_factory.mktemp("data") / "CelebAMask-HQ")


def _copy(root, tmp_path, *names):
    """A new root holding only the named entries of the exported root."""
    new = tmp_path / "root"
    new.mkdir()
    for name in names:
        (shutil.copytree if (root / name).is_dir() else shutil.copy)(root / name, new / name)
    return new


def test_export_writes_the_original_file_names(root, samples):
    assert sorted(p.name for p in (root / IMAGE_DIR).iterdir())[:2] == ["0.jpg", "1.jpg"]
    assert (root / MASK_DIR / "11.png").is_file()
    assert (root / PART_DIR / "0" / "00000_skin.png").is_file()
    lines = (root / ATTRIBUTE_FILE).read_text().splitlines()
    assert lines[0] == str(N) and lines[1].split() == ATTRIBUTES and lines[2].startswith("0.jpg  ")
    assert len(list((root / "Male").glob("*/*.png"))) == N


def test_celebahq_round_trip(root, samples):
    ds = CelebAHQ(root)
    assert len(ds) == N and ds.attribute_names == ATTRIBUTES
    for i, sample in enumerate(samples):
        item = ds[i]
        assert item["name"] == str(i) and item["index"] == i
        assert (item["image"] - sample["image"]).abs().mean() < 0.05  # JPEG
        assert torch.equal(item["mask"], sample["mask"])
        assert torch.equal(item["attributes"], sample["attributes"])
        assert item["caption"] == sample["caption"]


def test_celebahq_merges_part_masks_and_omits_what_is_absent(root, samples, tmp_path):
    ds = CelebAHQ(_copy(root, tmp_path, IMAGE_DIR, PART_DIR), size=16)
    item = ds[5]
    assert set(item) == {"image", "mask", "index", "name"}
    assert item["image"].shape == (3, 16, 16)
    assert "mask" not in CelebAHQ(root, with_masks=False)[0]
    assert torch.equal(CelebAHQ(tmp_path / "root")[5]["mask"], samples[5]["mask"])
    with pytest.raises(InputError, match="captions_hq.json: caption file not found"):
        CelebAHQ(tmp_path / "root", with_captions=True)


def test_celebahq_split_file(root, tmp_path):
    (tmp_path / "test.txt").write_text("3.jpg\n7.jpg\n")
    assert CelebAHQ(root, split=tmp_path / "test.txt").names == ["3", "7"]
    (tmp_path / "bad.txt").write_text("3.jpg\n99.jpg\n")
    with pytest.raises(InputError, match="bad.txt: 1 listed image"):
        CelebAHQ(root, split=tmp_path / "bad.txt")


def test_celebahq_bad_annotations(root, tmp_path):
    new = _copy(root, tmp_path, IMAGE_DIR, MASK_DIR, CAPTIONS_FILE, ATTRIBUTE_FILE)
    save_mask(torch.zeros(SIZE, SIZE, dtype=torch.long), new / IMAGE_DIR / "12.png")
    with pytest.raises(InputError, match=f"{MASK_DIR}: no mask for 1 image.*: 12"):
        CelebAHQ(new)
    (new / IMAGE_DIR / "12.png").unlink()
    Image.fromarray(np.full((SIZE, SIZE), 23, np.uint8)).save(new / MASK_DIR / "4.png")
    with pytest.raises(InputError, match="4.png: labels up to 23 but CelebAMask-HQ has 19 classes"):
        CelebAHQ(new)[4]
    lines = (new / ATTRIBUTE_FILE).read_text().splitlines()
    (new / ATTRIBUTE_FILE).write_text("\n".join(lines[:3] + [lines[3] + " 1"] + lines[4:]))
    with pytest.raises(InputError, match=f"{ATTRIBUTE_FILE}: line 4: expected an image name and 17 values"):
        CelebAHQ(new)
    (new / CAPTIONS_FILE).write_text("{not json")
    with pytest.raises(InputError, match="captions_hq.json: invalid JSON"):
        CelebAHQ(new, with_attributes=False)


def test_image_mask_folder_round_trip(root, samples):
    ds = ImageMaskFolder(root / "images", root / "masks")
    assert ds.names == [s["name"] for s in samples]
    for item, sample in zip(ds, samples):
        assert torch.allclose(item["image"], sample["image"], atol=1 / 127)
        assert torch.equal(item["keep"], keep_outside_face(sample).expand(3, -1, -1))
    assert ImageMaskFolder(root / "images", size=16)[0]["image"].shape == (3, 16, 16)


def test_image_mask_folder_label_maps(tmp_path, samples):
    for sample in samples[:2]:
        save_image(sample["image"], tmp_path / "gt" / f"{sample['name']}.png")
        save_mask(sample["mask"], tmp_path / "seg" / f"{sample['name']}.png", style="colour")
    ds = ImageMaskFolder(tmp_path / "gt", tmp_path / "seg", mask_kind="labels")
    assert torch.equal(ds[1]["mask"], samples[1]["mask"])
    assert ImageMaskFolder(tmp_path / "gt", tmp_path / "seg", size=16, mask_kind="labels")[1]["mask"].shape == (16, 16)


def test_image_mask_folder_errors(tmp_path, samples):
    images, masks = tmp_path / "images", tmp_path / "masks"
    with pytest.raises(InputError, match="images: folder not found"):
        ImageMaskFolder(images)
    images.mkdir()
    with pytest.raises(InputError, match="images: no images"):
        ImageMaskFolder(images)
    for sample in samples[:2]:
        save_image(sample["image"], images / f"{sample['name']}.png")
    save_image(torch.ones(SIZE, SIZE), masks / "000000.png")
    with pytest.raises(InputError, match="masks: no mask for 1 image.*: 000001"):
        ImageMaskFolder(images, masks)
    save_image(torch.ones(SIZE, SIZE), masks / "000001_mask.png")
    with pytest.raises(InputError, match="000001; unmatched masks: 000001_mask"):
        ImageMaskFolder(images, masks)
    (masks / "000001_mask.png").rename(masks / "000001.png")
    (masks / "000000.png").unlink()
    save_image(torch.ones(SIZE // 2, SIZE // 2), masks / "000000.png")
    with pytest.raises(InputError, match="000000.png: mask is 16x16 but image 000000.png is 32x32; pass size="):
        ImageMaskFolder(images, masks)[0]
    assert ImageMaskFolder(images, masks, size=SIZE)[0]["keep"].shape == (3, SIZE, SIZE)
    (images / "000001.png").write_bytes(b"corrupt")
    with pytest.raises(InputError, match="000001.png: not an image"):
        ImageMaskFolder(images, masks)[1]


def test_class_folders(root, samples):
    ds = ClassFolders(root / "Male")
    assert ds.classes == ["0", "1"] and len(ds) == N
    male = {s["name"]: int(s["attributes"][ATTRIBUTES.index("Male")]) for s in samples}
    assert all(item["label"] == male[item["name"]] for item in ds)
    with pytest.raises(InputError, match="no class folders"):
        ClassFolders(root / "images")


def test_export_refuses_to_overwrite_and_checks_arguments(root, faces, tmp_path):
    with pytest.raises(FileExistsError, match=IMAGE_DIR):
        export(faces, root, layouts=["celebahq"])
    with pytest.raises(InputError, match="unknown"):
        export(faces, tmp_path, layouts=["celeba"])
    with pytest.raises(InputError, match="attribute='Beard'"):
        export(faces, tmp_path, layouts=["class_folders"], attribute="Beard")


def test_export_cli(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--n", "3", "--size", "32", "--layouts", "celebahq", "attr_txt"]
    export_main(args)
    assert len(CelebAHQ(tmp_path)) == 3 and "wrote 3 faces" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .*already exists"):
        export_main(args)


def test_collate_stacks_tensors_and_lists_strings(samples):
    batch = collate_faces(samples[:4])
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["mask"].dtype == torch.int64
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["caption"] == [s["caption"] for s in samples[:4]]


def test_datamodule_split_is_seeded(faces):
    def val_names(seed):
        dm = FaceDataModule(faces, val_fraction=0.25, batch_size=4, seed=seed)
        dm.setup("fit")
        assert len(dm.train_set) == 9 and len(dm.val_set) == 3
        return [name for batch in dm.val_dataloader() for name in batch["name"]]

    assert val_names(0) == val_names(0) != val_names(1)
    dm = FaceDataModule(faces, val_dataset=faces, batch_size=5)
    dm.setup()
    assert len(dm.train_set) == N and next(iter(dm.train_dataloader()))["image"].shape == (5, 3, SIZE, SIZE)


@pytest.mark.parametrize("name, data_dir", [
    ("synthetic", "."), ("celebahq", "."), ("image_mask", "CelebAMask-HQ"), ("class_folders", "CelebAMask-HQ"),
])
def test_hydra_configs_build(name, data_dir, root):
    paths = {"data_dir": str(root.parent / data_dir)}
    cfg = OmegaConf.create({"paths": paths, "data": OmegaConf.load(CONF / f"{name}.yaml")})
    cfg.data.dataset.size = SIZE
    if name == "synthetic":
        cfg.data.dataset.length = 8
    dm = instantiate(cfg.data)
    assert isinstance(dm, FaceDataModule)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape[1:] == (3, SIZE, SIZE)
