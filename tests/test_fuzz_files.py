"""Property-based tests of the readers of facelab's own derived files: direction files, projection statistics and
h-space shards. Each starts from a valid file, then loses a tensor or a metadata key, gets a tensor of another shape,
dtype or with NaN, metadata of another type or not JSON at all, or is truncated or bit-flipped. Every case must end in
a correct read or one InputError line naming the file; no other exception may escape."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from facelab.data.hspace import HSpaceDataset
from facelab.diffusion.projection import load_stats
from facelab.directions.files import Directions
from facelab.io.errors import InputError

FAST = settings(max_examples=60, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONG = settings(FAST, max_examples=1500, derandomize=False)
GRID = [900, 500, 100]


def valid_directions() -> tuple[dict, dict]:
    basis = torch.nn.functional.normalize(torch.randn(2, 3, 4 * 2 * 2), dim=-1).reshape(2, 3, 4, 2, 2)
    meta = {"method": "pca", "h_space": "after", "fingerprint": "f" * 8, "params": {"pca": 2}}
    return ({"basis": basis, "scale": torch.rand(2, 3) + 0.1, "extra.baseline": torch.zeros(3)},
            {"facelab": "directions", "timesteps": json.dumps(GRID), "meta": json.dumps(meta)})


def valid_stats() -> tuple[dict, dict]:
    meta = {"format": "facelab.fuzzy_stats/1", "depths": [20, 40], "N": 8, "model": "tiny", "model_sha256": "f" * 8,
            "resolution": 4, "projection_offset": True, "projection_step": 50, "seed": 0}
    return ({"mean": torch.randn(2, 3, 4, 4, dtype=torch.float64), "std": torch.rand(2, 3, 4, 4, dtype=torch.float64)},
            {key: json.dumps(value) for key, value in meta.items()})


def valid_shard() -> tuple[dict, dict]:
    meta = {"format": "facelab.hspace/1", "grid": GRID, "attributes": {"Male": 2}, "h_shape": [4, 2, 2],
            "num_train_timesteps": 1000}
    return ({"h": torch.randn(5, 3, 4, 2, 2).half(), "labels": torch.randint(0, 2, (5, 1))},
            {"meta": json.dumps(meta), "names": json.dumps([f"{i:05d}" for i in range(5)])})


JUNK = st.sampled_from(["", "{", "null", "[]", "{}", "3", "-1", "1e400", "true", '"text"', "[1, 2.5]", "[true]",
                        '{"a": 1}', "NaN", '["pca"]', "[-5, 0, 1000000000000000000000]"])


@st.composite
def damaged(draw, make):
    """(bytes) of a file made by `make`, damaged in one or two ways."""
    tensors, meta = make()
    for _ in range(draw(st.integers(1, 2))):
        how = draw(st.sampled_from(["drop_tensor", "reshape", "nan", "dtype", "drop_meta", "junk_meta", "inner",
                                    "bytes"]))
        if how == "drop_tensor" and tensors:
            tensors.pop(draw(st.sampled_from(sorted(tensors))))
        elif how == "reshape" and tensors:
            key = draw(st.sampled_from(sorted(tensors)))
            tensors[key] = torch.zeros(draw(st.lists(st.integers(0, 4), max_size=5)))
        elif how == "nan" and tensors:
            key = draw(st.sampled_from(sorted(tensors)))
            if tensors[key].numel() and tensors[key].is_floating_point():
                tensors[key] = tensors[key].clone()
                tensors[key].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -1.0, 1e30]))
        elif how == "dtype" and tensors:
            key = draw(st.sampled_from(sorted(tensors)))
            tensors[key] = tensors[key].to(draw(st.sampled_from([torch.bool, torch.int8, torch.float16,
                                                                 torch.bfloat16, torch.int64])))
        elif how == "drop_meta" and meta:
            meta.pop(draw(st.sampled_from(sorted(meta))))
        elif how == "junk_meta" and meta:
            meta[draw(st.sampled_from(sorted(meta)))] = draw(JUNK)
        elif how == "inner":  # one key inside a JSON object entry gets a junk value, or goes
            for entry in sorted(meta):
                try:
                    inner = json.loads(meta[entry])
                except ValueError:
                    continue
                if isinstance(inner, dict) and inner:
                    key = draw(st.sampled_from(sorted(inner)))
                    if draw(st.booleans()):
                        inner.pop(key)
                    else:
                        inner[key] = json.loads(draw(JUNK.filter(lambda s: s not in ("", "{", "NaN"))))
                    meta[entry] = json.dumps(inner)
                    break
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "f.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        data = path.read_bytes()
    if draw(st.booleans()) and draw(st.booleans()):  # a quarter of the cases: damaged bytes too
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data) - 1))]
        else:
            at = draw(st.integers(0, len(data) - 1))
            data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    return data


def _one_line(err: InputError, path) -> None:
    message = str(err)
    assert "\n" not in message and str(path) in message, message


def _check_directions(path) -> None:
    try:
        found = Directions.load(path)
        found.check("f" * 8, "after", GRID, str(path))
        for k in range(len(found)):
            deltas = found.delta(k)
            assert all(torch.isfinite(d).all() for d in deltas.values())
    except InputError as err:
        _one_line(err, path)
    except Exception as err:
        pytest.fail(f"{type(err).__name__} escaped: {err}")


def _check_stats(path) -> None:
    try:
        mean, std, _ = load_stats(path, "f" * 8, 4, "tiny", [40], True, 50)
        assert mean.shape == std.shape == (1, 3, 4, 4) and torch.isfinite(mean).all() and (std >= 0).all()
    except InputError as err:
        _one_line(err, path)
    except Exception as err:
        pytest.fail(f"{type(err).__name__} escaped: {err}")


def _check_shard(path) -> None:
    try:
        data = HSpaceDataset(path)
        assert data.meta["format"] == "facelab.hspace/1"
        for i in range(len(data)):
            item = data[i]
            assert item["h"].dim() == 2 and item["labels"].dim() == 1
    except InputError as err:
        _one_line(err, path)
    except Exception as err:
        pytest.fail(f"{type(err).__name__} escaped: {err}")


CASES = {"directions": (valid_directions, _check_directions), "stats": (valid_stats, _check_stats),
         "shard": (valid_shard, _check_shard)}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_valid_files_read(kind, tmp_path):
    make, check = CASES[kind]
    tensors, meta = make()
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path), metadata=meta)
    check(path)
    if kind == "directions":
        assert torch.equal(Directions.load(path).basis, tensors["basis"])


@pytest.mark.parametrize("kind", sorted(CASES))
def test_nan_files_are_refused_with_their_name(kind, tmp_path):
    make, _ = CASES[kind]
    tensors, meta = make()
    key = next(k for k in ("scale", "std", "h") if k in tensors)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path), metadata=meta)
    if kind == "shard":  # h is read row by row while training; NaN there is the training loss's (train.py) to catch
        return
    with pytest.raises(InputError, match="NaN or infinite"):
        (Directions.load if kind == "directions" else lambda p: load_stats(p, "f" * 8, 4, "tiny", [40], True, 50))(path)


def _fuzz(kind, data, tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(data)
    CASES[kind][1](path)


@FAST
@given(data=damaged(valid_directions))
def test_damaged_direction_files(tmp_path, data):
    _fuzz("directions", data, tmp_path)


@FAST
@given(data=damaged(valid_stats))
def test_damaged_statistics_files(tmp_path, data):
    _fuzz("stats", data, tmp_path)


@FAST
@given(data=damaged(valid_shard))
def test_damaged_h_space_shards(tmp_path, data):
    _fuzz("shard", data, tmp_path)


@pytest.mark.slow
@LONG
@given(kind=st.sampled_from(sorted(CASES)), data=st.data())
def test_damaged_files_long(tmp_path, kind, data):
    _fuzz(kind, data.draw(damaged(CASES[kind][0])), tmp_path)


# --- text inputs: CelebA attribute files and CelebA-Dialog caption files --------------------------------------------
ATTRIBUTES = "3\nMale Smiling\n0.jpg 1 -1\n1.jpg -1 1\n2.jpg 1 1\n"


@st.composite
def damaged_text(draw, valid: str) -> bytes:
    """`valid` with a few characters replaced, inserted or cut, or its bytes damaged (maybe no longer UTF-8)."""
    text = valid
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        piece = draw(st.one_of(st.sampled_from(["", " ", "\n", "-1", "1", "0", "²", "x", "\t", "Male", "\x00", "9"]),
                               st.text(max_size=3)))
        text = text[:at] + piece + text[at + draw(st.integers(0, 3)):]
    data = text.encode("utf-8")
    if draw(st.integers(0, 3)) == 0 and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([draw(st.integers(0x80, 0xFF))]) + data[at + 1:]
    return data


def _check_attributes(path) -> None:
    from facelab.data.layouts import read_attribute_file

    try:
        names, rows = read_attribute_file(path)
        assert names and all(v.shape == (len(names),) and set(v.tolist()) <= {0.0, 1.0} for v in rows.values())
    except InputError as err:
        _one_line(err, path)
    except Exception as err:
        pytest.fail(f"{type(err).__name__} escaped: {err}")


@FAST
@given(data=damaged_text(ATTRIBUTES))
def test_damaged_attribute_files(tmp_path, data):
    path = tmp_path / "attributes.txt"
    path.write_bytes(data)
    _check_attributes(path)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=16), inner,
                                                                                max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def dialog_root(tmp_path_factory):
    from facelab.data.layouts import IMAGE_DIR
    from facelab.io.images import save_image

    root = tmp_path_factory.mktemp("dialog")
    for name in ("0", "1"):
        save_image(torch.zeros(3, 4, 4), root / IMAGE_DIR / f"{name}.png")
    return root


@FAST
@given(entries=st.dictionaries(st.sampled_from(["0.jpg", "1.jpg", "1.png", "2.jpg", "", "0"]),
                               JSON | st.fixed_dictionaries({"overall_caption": JSON}), max_size=3)
       | JSON, damage=st.booleans())
def test_hostile_caption_files(dialog_root, entries, damage):
    """A CelebA-Dialog captions_hq.json of any JSON shape, or damaged bytes: captions read, or one line."""
    from facelab.data.layouts import CAPTIONS_FILE, CelebAHQ

    data = json.dumps(entries).encode("utf-8")
    if damage:
        data = data[: len(data) // 2] + b"\xff" + data[len(data) // 2:]
    path = dialog_root / CAPTIONS_FILE
    path.write_bytes(data)
    try:
        captions = CelebAHQ(dialog_root, with_captions=True, with_masks=False, with_attributes=False).captions
        assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    except InputError as err:
        _one_line(err, path)
    except Exception as err:
        pytest.fail(f"{type(err).__name__} escaped: {err}")


def test_captions_with_markup_quotes_and_commas_read_verbatim(dialog_root):
    from facelab.data.layouts import CAPTIONS_FILE, CelebAHQ

    texts = ['She has "bangs", a smile, and <script>alert(1)</script>.', "Él lleva gafas; ü, 日本"]
    (dialog_root / CAPTIONS_FILE).write_text(json.dumps({"0.jpg": {"overall_caption": texts[0]}, "1.jpg": texts[1]}))
    assert CelebAHQ(dialog_root, with_captions=True, with_masks=False, with_attributes=False).captions == texts
