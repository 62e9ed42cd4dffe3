"""Every guidance term is a config (facelab/conf/guidance/*.yaml): each composes with a `_target_` and a header, builds
standalone where it can and changes a run of method=ddim on the zoo models (the attribute term raises its attribute's
probability under the guiding classifier), and a term that a method cannot take is refused with one line naming it."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from conftest import compose
from facelab.data.synthetic import SyntheticFaces
from facelab.diffusion import DDIM, sample
from facelab.directions.files import Directions
from facelab.guidance.hedit import HEdit
from facelab.io.errors import InputError
from facelab.io.images import read_image
from facelab.models.classifier import load_classifier
from facelab.models.pretrained import load_denoiser, model_fingerprint
from facelab.sample import run_sample
from facelab.utils import CONF_DIR

NAMES = sorted(path.stem for path in (Path(CONF_DIR) / "guidance").glob("*.yaml"))
FAST = ["method=ddim", "num_samples=1", "sampler.steps=3", "progress=false", "device=cpu"]
# per term that builds standalone: (the run's overrides, the term's; hedit: + its direction file)
STANDALONE = {
    "record": ([], []),
    "debias": (["model.pretrained=ddpm64_biased"], ["guidance.debias.head_lookup=nearest"]),
    "debias_image": ([], []),
    "attribute": ([], ["target.Smiling=1"]),
    "fuzzy": ([], []),
    "hedit": ([], ["guidance.hedit.scale=100"]),  # ‖h‖ ≈ 100 on ddpm64: a random unit direction needs a large scale
    "range": (["sampler.clip=false", "sampler.steps=10"], []),  # unclipped, the zoo model's x̂0 leaves [-1, 1]
}
SOURCE_ONLY = ("cycle", "feature")  # need each batch's source images: method=cyclediff builds them itself


def run(tmp_path, name, overrides):
    out = tmp_path / name
    run_sample(compose("sample", [*FAST, *overrides], out))
    return out


def image(out, index=0) -> np.ndarray:
    """Sample `index` of a run as [3, H, W] in [-1, 1]."""
    return read_image(out / "samples" / f"{index:05d}.png").numpy()


def input_error(excinfo) -> str:
    """The InputError's line (raised directly, or by a config-built object inside Hydra's instantiate)."""
    err = excinfo.value
    if isinstance(err, InstantiationException):
        err = err.__cause__
    assert isinstance(err, InputError), repr(err)
    return str(err)


@pytest.fixture(scope="module")
def direction_file(tmp_path_factory):
    """A random unit direction for ddpm64 at h_space=after on the 3-step DDIM grid of FAST."""
    denoiser = load_denoiser("ddpm64")
    grid = DDIM(steps=3).timesteps(denoiser.schedule)
    probe = HEdit(record=True)
    sample(denoiser, denoiser.schedule, torch.zeros(1, 3, 64, 64), grid[:1], guidance=[probe], progress=False)
    basis = torch.randn(1, len(grid), *probe.hs[0].shape[1:], generator=torch.Generator().manual_seed(0))
    basis = basis / basis.flatten(2).norm(dim=2)[..., None, None, None]
    meta = {"model": "ddpm64", "fingerprint": model_fingerprint(denoiser), "h_space": "after", "method": "pca"}
    path = tmp_path_factory.mktemp("directions") / "directions.safetensors"
    return Directions(basis, torch.ones(1, len(grid)), grid, meta).save(path)


def overrides_for(name, direction_file):
    extra = [f"guidance.hedit.file={direction_file}"] if name == "hedit" else []
    return [*STANDALONE[name][0], f"guidance=[{name}]", *STANDALONE[name][1], *extra]


def test_every_config_is_covered_and_documented():
    assert set(NAMES) == set(STANDALONE) | set(SOURCE_ONLY)
    for name in NAMES:
        text = (Path(CONF_DIR) / "guidance" / f"{name}.yaml").read_text()
        header = text[:text.index(f"\n{name}:")]
        assert all(line.startswith("#") for line in header.splitlines()), name
        assert "python -m facelab.sample" in header and "Knobs" in header, name


@pytest.mark.parametrize("name", NAMES)
def test_config_composes_with_a_target(name, tmp_path):
    cfg = compose("sample", [*FAST, f"guidance=[{name}]"], tmp_path)
    assert list(cfg.guidance) == [name] and cfg.guidance[name]._target_.startswith("facelab.guidance.")


@pytest.mark.parametrize("name", sorted(STANDALONE))
def test_standalone_term_builds(name, tmp_path, direction_file):
    cfg = compose("sample", [*FAST, *overrides_for(name, direction_file)], tmp_path)
    term = instantiate(cfg.guidance[name])
    assert type(term).__module__.startswith("facelab.guidance.")


@pytest.mark.parametrize("name", sorted(set(STANDALONE) - {"record"}))
def test_term_changes_the_samples(name, tmp_path, direction_file):
    guided = image(run(tmp_path, name, overrides_for(name, direction_file)))
    unguided = image(run(tmp_path, "plain", STANDALONE[name][0]))
    assert np.abs(guided - unguided).mean() > 0.01, name  # > 1.3 levels of 255 on average
    if name == "fuzzy":  # pulled toward its input, the first held-out synthetic face
        face = SyntheticFaces(64, 1, 0, start=900000)[0]["image"].numpy()
        assert np.abs(guided - face).mean() < np.abs(unguided - face).mean()


def test_record_keeps_the_samples_and_writes_the_trajectory(tmp_path):
    out = run(tmp_path, "record", ["guidance=[record]", "guidance.record.every=1"])
    assert (out / "trajectory.png").is_file()
    assert np.array_equal(image(out), image(run(tmp_path, "plain", [])))


def test_attribute_guidance_raises_the_attribute(tmp_path):
    """On average over 4 samples, the guided attribute's probability under the guiding classifier goes up."""
    many = ["num_samples=4", "batch_size=4"]
    unguided = run(tmp_path, "plain", many)
    guided = run(tmp_path, "attribute", [*many, "guidance=[attribute]", "target.Eyeglasses=1"])
    classifier = load_classifier("attr64")

    def probability(out):
        images = torch.stack([read_image(out / "samples" / f"{i:05d}.png") for i in range(4)])
        with torch.no_grad():
            return float(classifier.predict(images)["Eyeglasses"][:, 1].mean())

    before, after = probability(unguided), probability(guided)
    assert after > before + 0.3, (before, after)


@pytest.mark.parametrize("name", SOURCE_ONLY)
def test_source_terms_are_refused_outside_cyclediff(name, tmp_path):
    with pytest.raises((InputError, InstantiationException)) as excinfo:
        run(tmp_path, name, [f"guidance=[{name}]"])
    message = input_error(excinfo)
    assert f"guidance=[{name}]" in message and "method=cyclediff" in message


def test_hedit_refuses_another_grid(tmp_path, direction_file):
    with pytest.raises((InputError, InstantiationException)) as excinfo:
        run(tmp_path, "hedit", [*overrides_for("hedit", direction_file), "sampler.steps=4"])
    assert "guidance.hedit.file" in input_error(excinfo) and "sampler.steps=3" in input_error(excinfo)


@pytest.mark.parametrize("method, name", [("codiff", "hedit"), ("codiff", "fuzzy"), ("ldm", "record"),
                                          ("directions", "record"), ("hextract", "attribute")])
def test_methods_refuse_terms_they_cannot_take(method, name, tmp_path, direction_file):
    overrides = [f"method={method}", f"guidance=[{name}]", "num_samples=1", "progress=false", "device=cpu"]
    if method == "ldm":
        overrides.append("text=A smiling woman.")
    if method == "directions":
        overrides.append("discover=pca")
    with pytest.raises(InputError) as excinfo:  # before anything is built: a plain InputError
        run_sample(compose("sample", overrides, tmp_path / "run"))
    assert str(excinfo.value).startswith(f"guidance=[{name}]: method={method} cannot take this term")


def test_codiff_samples_with_the_terms(tmp_path):
    """method=codiff adds the terms it can take (here attribute guidance on the decoded x̂0) to its sampling."""
    common = ["method=codiff", "num_samples=1", "batch_size=1", "sampler.steps=3", "progress=false", "device=cpu"]
    outs = []
    for name, extra in (("plain", []), ("attribute", ["guidance=[attribute]", "target.Smiling=1",
                                                      "guidance.attribute.scale=20"])):
        out = tmp_path / name
        run_sample(compose("sample", [*common, *extra], out))
        outs.append(read_image(next(out.rglob("000000_x_0.png"))).numpy())
    assert np.abs(outs[0] - outs[1]).mean() > 0.01
