import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facelab.data.synthetic import (
    ATTRIBUTES,
    RENDERER_VERSION,
    SEG,
    SEG_CLASSES,
    Face,
    SyntheticFaces,
    caption,
    render,
    sample_face,
)

# Renders by the renderer before it was windowed (facelab/data/synthetic.py at 1276bd15, ~70 faces/s), recorded
# before the change: sizes 16..256, supersample 2 and 3, all accessories, counterfactuals.
REFERENCE = Path(__file__).resolve().parent / "fixtures" / "synthetic_renders_v1.npz"
ALL_ON = {"Male": 0.0, "Young": 0.0, "Smiling": 1.0, "Mouth_Slightly_Open": 1.0, "Eyeglasses": 1.0, "Bangs": 1.0,
          "Bags_Under_Eyes": {"Young=1": 1.0, "Young=0": 1.0}, "Wearing_Hat": 1.0,
          "Wearing_Earrings": {"Male=0": 1.0, "Male=1": 1.0}, "Wearing_Necklace": {"Male=0": 1.0, "Male=1": 1.0}}


def test_item_contents_and_ranges():
    ds = SyntheticFaces(size=64, length=8, seed=3)
    item = ds[5]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["mask"].shape == (64, 64) and item["mask"].dtype == torch.int64
    assert item["attributes"].shape == (len(ATTRIBUTES),)
    assert set(item["attributes"].tolist()) <= {0.0, 1.0}
    assert item["name"] == "000005" and isinstance(item["caption"], str)
    assert len(SEG_CLASSES) == 19 and RENDERER_VERSION >= 1


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_sizes_and_core_parts_present(size):
    item = SyntheticFaces(size=size, length=1, seed=0)[0]
    assert item["image"].shape[-1] == size
    present = set(item["mask"].unique().tolist())
    for part in ("background", "skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "u_lip", "l_lip", "hair"):
        assert SEG[part] in present, part


def test_deterministic_and_seed_dependent():
    a, b = SyntheticFaces(size=32, length=4, seed=1), SyntheticFaces(size=32, length=4, seed=1)
    assert torch.equal(a[2]["image"], b[2]["image"]) and torch.equal(a[2]["mask"], b[2]["mask"])
    c = SyntheticFaces(size=32, length=4, seed=2)
    assert not torch.equal(a[2]["image"], c[2]["image"])
    # `start` offsets the index stream: item 0 of start=2 is item 2 of start=0
    assert torch.equal(SyntheticFaces(size=32, length=2, seed=1, start=2)[0]["image"], a[2]["image"])


def test_priors_control_attribute_frequencies():
    ds = SyntheticFaces(size=32, length=400, seed=0, priors={"Male": 0.8, "Eyeglasses": 0.0})
    faces = [ds.face(i) for i in range(len(ds))]
    male = np.mean([f.attributes["Male"] for f in faces])
    assert abs(male - 0.8) < 0.06
    assert not any(f.attributes["Eyeglasses"] for f in faces)
    # correlations: women have no beard; exactly one hair colour; Pale_Skin follows the light tone
    assert all(f.attributes["No_Beard"] for f in faces if not f.attributes["Male"])
    assert all(sum(f.attributes[h] for h in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair")) == 1
               for f in faces)
    assert all(f.attributes["Pale_Skin"] == (f.skin_tone == 0) for f in faces)


def test_bad_priors_are_rejected():
    with pytest.raises(KeyError, match="Smiley"):
        SyntheticFaces(size=32, length=1, priors={"Smiley": 0.5})


def test_counterfactual_changes_only_the_attribute_region():
    ds = SyntheticFaces(size=64, length=50, seed=0)
    i = next(i for i in range(50) if not ds.face(i).attributes["Eyeglasses"])
    base, cf = ds[i], ds.counterfactual(i, Eyeglasses=1)
    assert cf["attributes"][ATTRIBUTES.index("Eyeglasses")] == 1
    changed = (base["attributes"] != cf["attributes"]).nonzero().flatten().tolist()
    assert changed == [ATTRIBUTES.index("Eyeglasses")]
    assert (cf["mask"] == SEG["eye_g"]).any() and not (base["mask"] == SEG["eye_g"]).any()
    diff = (base["image"] - cf["image"]).abs().amax(0) > 1e-3
    assert 0 < diff.float().mean() < 0.2  # a local change, same identity elsewhere
    assert ds.identity(i) == ds.identity(i)


def test_counterfactual_smiling_moves_the_mouth_and_caption():
    ds = SyntheticFaces(size=64, length=50, seed=0)
    i = next(i for i in range(50) if not ds.face(i).attributes["Smiling"])
    cf = ds.counterfactual(i, Smiling=1)
    assert "is smiling" in cf["caption"] and "not smiling" in ds[i]["caption"]
    mouth = torch.isin(ds[i]["mask"], torch.tensor([SEG["u_lip"], SEG["l_lip"], SEG["mouth"]]))
    assert ((ds[i]["image"] - cf["image"]).abs().amax(0) > 1e-3)[mouth].any()


def test_counterfactual_rejects_unknown_attribute():
    with pytest.raises(KeyError, match="Smilling"):
        SyntheticFaces(size=32, length=1).counterfactual(0, Smilling=1)


def test_caption_mentions_attributes():
    ds = SyntheticFaces(size=32, length=30, seed=0)
    for i in range(30):
        face, text = ds.face(i), caption(ds.face(i))
        assert ("This man" in text) == bool(face.attributes["Male"])
        assert ("eyeglasses" in text) == bool(face.attributes["Eyeglasses"])
        assert ("beard" in text) == (not face.attributes["No_Beard"])


def test_index_out_of_range():
    with pytest.raises(IndexError):
        SyntheticFaces(size=32, length=3)[3]


def test_renders_equal_the_recorded_v1_renders():
    ref = np.load(REFERENCE)
    for k, (size, seed, index, all_on, changes, ss) in enumerate(json.loads(str(ref["cases"]))):
        face = SyntheticFaces(size=size, length=index + 1, seed=seed, priors=ALL_ON if all_on else None).face(index)
        rgb, label = render(face.with_attributes(**changes) if changes else face, size, supersample=ss)
        assert rgb.dtype == np.uint8 and label.dtype == np.int64 and rgb.shape == (size, size, 3)
        want = ref[f"rgb{k}"]
        assert np.array_equal(rgb, want), f"case {k}: {np.abs(rgb.astype(int) - want).max()} levels off"
        assert np.array_equal(label, ref[f"label{k}"]), f"case {k}: {(label != ref[f'label{k}']).sum()} labels differ"


def test_windows_hold_every_shape_even_at_the_parameter_extremes():
    """Windowed drawing equals whole-canvas drawing, also for identities at the ends of the prior ranges."""
    probe = [sample_face(np.random.default_rng([5, j])).identity for j in range(100)]
    lows, highs = ({key: f([q[key] for q in probe]) for key in probe[0]} for f in (min, max))
    for k in range(12):
        face = sample_face(np.random.default_rng([99, k]), ALL_ON if k % 2 else {"Male": 1.0, "Young": 0.0})
        pick = np.random.default_rng([7, k]).random(len(lows)) < 0.5
        identity = {key: (lows if p else highs)[key] for key, p in zip(lows, pick)} if k % 3 else face.identity
        face = Face(face.attributes, face.skin_tone, identity)
        fast, slow = render(face, 32), render(face, 32, windows=False)
        assert np.array_equal(fast[0], slow[0]) and np.array_equal(fast[1], slow[1]), k
