import json
import math

import pytest
import torch

from conftest import run_cli
from facelab.data.synthetic import SyntheticFaces, caption
from facelab.io.errors import InputError
from facelab.metrics.captions import SYNTHETIC_STATED, caption_consistency, stated_attributes
from facelab.metrics.parsing import confusion_matrix, mask_consistency
from facelab.models import pretrained
from facelab.models.parser import ParserNet, class_weights, load_parser

TINY_PARSER = ["data.dataset.size=16", "data.dataset.length=24", "data.batch_size=4", "data.val_fraction=0.25",
               "model.channels=[8,16]", "trainer.max_steps=4", "trainer.val_check_interval=2",
               "trainer.limit_val_batches=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
               "trainer.enable_model_summary=false"]


def test_train_export_and_load_agree(tmp_path, monkeypatch):
    run = tmp_path / "run"
    result = run_cli("train", "+experiment=parser", *TINY_PARSER, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["val/pixel_acc"] <= 1 and 0 <= metrics["val/miou"] <= 1 and "val/iou/skin" in metrics
    exported, from_ckpt = load_parser(run / "parser"), load_parser(run / "checkpoints" / "last.ckpt")
    assert exported.meta["data_identity"] == {"seed": 1, "start": 0, "length": 24}
    monkeypatch.setattr(pretrained, "ZOO_DIR", run)
    by_name = load_parser("parser")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    labels = exported.parse(x)
    assert labels.shape == (3, 16, 16) and labels.dtype == torch.int64
    assert torch.equal(labels, from_ckpt.parse(x)) and torch.equal(labels, by_name.parse(x))
    assert exported.parse(torch.zeros(2, 3, 40, 40)).shape == (2, 40, 40)  # resized to 16 px and back


def test_zoo_parser_parses_held_out_faces():
    faces = SyntheticFaces(64, 16, seed=1, start=950000)
    batch = [faces[i] for i in range(len(faces))]
    images, masks = torch.stack([b["image"] for b in batch]), torch.stack([b["mask"] for b in batch])
    scores = mask_consistency(load_parser("parser64").parse(images), masks)
    assert scores["pixel_acc"] > 0.95 and scores["miou"] > 0.6


def test_mask_consistency_by_hand():
    pred = torch.tensor([[[0, 1], [1, 1]], [[3, 3], [3, 3]]])
    target = torch.tensor([[[0, 0], [1, 2]], [[3, 3], [3, 3]]])
    # image 0: class 0 TP 1, union 2; class 1 TP 1, union 3; class 2 TP 0, union 1; image 1: class 3 all 4 right
    first = mask_consistency(pred[:1], target[:1], num_classes=4)
    assert first["pixel_acc"] == 0.5 and first["miou"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert first["iou"] == pytest.approx({"0": 1 / 2, "1": 1 / 3, "2": 0.0})  # class 3: empty union, left out
    both = mask_consistency(pred, target, num_classes=4)
    assert both["pixel_acc"] == 0.75 and both["miou"] == pytest.approx((1 / 2 + 1 / 3 + 0 + 1) / 4)
    torch.testing.assert_close(both["pixel_acc_per_image"], torch.tensor([0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(both["miou_per_image"], torch.tensor([(1 / 2 + 1 / 3) / 3, 1.0], dtype=torch.float64))
    assert confusion_matrix(pred, target, 4).tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 4]]
    # the target is resized to the prediction's size by nearest-exact: 4 px -> 2 px reads pixels 1 and 3
    big = torch.zeros(1, 4, 4, dtype=torch.long)
    big[0, 1::2, 1::2] = torch.tensor([[0, 0], [1, 2]])
    assert confusion_matrix(pred[:1], big, 4).tolist() == confusion_matrix(pred[:1], target[:1], 4).tolist()
    named = mask_consistency(torch.ones(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 2, dtype=torch.long))
    assert named["iou"] == {"skin": 1.0}


def test_class_weights_by_hand():
    masks = torch.tensor([[0] * 8 + [1] * 2])  # class 2 absent: the rarest present class's weight
    torch.testing.assert_close(class_weights(masks, 3, power=1.0), torch.tensor([0.25, 1.0, 1.0]))
    torch.testing.assert_close(class_weights(masks, 3, power=0.0), torch.ones(3))


def test_synthetic_captions_state_every_attribute_truly():
    faces = SyntheticFaces(64, 300, seed=0)
    for i in range(len(faces)):
        face = faces.face(i)
        stated = stated_attributes(caption(face))
        assert set(stated) == SYNTHETIC_STATED, caption(face)
        truth = {**face.attributes, "skin_tone": face.skin_tone}
        assert {k: truth[k] for k in stated} == stated, caption(face)


@pytest.mark.parametrize("text, expected", [
    ("This man has beard of medium length. He is in his thirties.", {"Male": 1, "No_Beard": 0}),
    ("The woman has no fringe. She doesn't wear any eyeglasses. She smiles broadly. She is in her forties.",
     {"Male": 0, "Bangs": 0, "Eyeglasses": 0, "Smiling": 1, "Young": 0}),
    ("There is no beard on his face. He looks young, not smiling.",
     {"Male": 1, "No_Beard": 1, "Young": 1, "Smiling": 0}),
    ("The person has blonde hair and dark skin, with a big smile.",
     {"Blond_Hair": 1, "Black_Hair": 0, "Brown_Hair": 0, "Gray_Hair": 0, "Pale_Skin": 0, "skin_tone": 2,
      "Smiling": 1}),
    ("He and she are smiling.", {"Smiling": 1}),  # contradictory gender: not stated
])
def test_dialog_style_captions(text, expected):
    assert stated_attributes(text) == expected


def test_caption_consistency_by_hand():
    captions = ["This man is smiling.", "She is not smiling. She wears eyeglasses.", "A person."]
    probs = {"Male": torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]),
             "Smiling": torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.1, 0.9]])}
    # stated: Male 1 (right), Smiling 1 (wrong); Male 0 (right), Smiling 0 (right); Eyeglasses has no head
    result = caption_consistency(probs, captions)
    assert result == {"accuracy": 0.75, "per_attribute": {"Male": 1.0, "Smiling": 0.5}, "count": 4}
    assert math.isnan(caption_consistency({}, captions)["accuracy"])


def test_bad_inputs_are_clear():
    with pytest.raises(InputError, match="not a zoo parser"):
        load_parser("no_such_parser")
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(InputError, match=r"target: labels must lie in 0\.\.18; found 0\.\.19"):
        mask_consistency(labels, labels + 19 * (torch.rand(2, 4, 4) > 0.5))
    with pytest.raises(InputError, match="pred has 2 label maps but target has 3"):
        mask_consistency(labels, torch.zeros(3, 4, 4, dtype=torch.long))
    with pytest.raises(InputError, match="integer label maps"):
        confusion_matrix(labels.float(), labels)
    with pytest.raises(InputError, match=r"expected \[3, K\] for 3 captions"):
        caption_consistency({"Male": torch.zeros(2, 2)}, ["a", "b", "c"])
    with pytest.raises(InputError, match="RGB images"):
        ParserNet((8, 16), image_size=16).parse(torch.zeros(1, 1, 16, 16))
