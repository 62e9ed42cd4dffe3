"""`python -m facelab.fuzzy_stats source=images source.path=DIR`: projection statistics from a folder of real faces."""
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose, run_cli
from facelab.diffusion.projection import project_errors, read_stats
from facelab.fuzzy_stats import compute_stats
from facelab.io.errors import InputError
from facelab.models.components.seeding import stream_generator
from facelab.models.pretrained import load_denoiser

DEPTHS = "zscore_set=[20,40]"


def write_faces(folder, count: int, size: int) -> list[np.ndarray]:
    """`count` random RGB PNGs named 0.png, 1.png, ... (natural order); returns their pixels."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{i}.png")
    return pixels


def test_statistics_from_an_image_folder(tiny_model_dir, tmp_path):
    pixels = write_faces(tmp_path / "faces", 3, 16)
    out = tmp_path / "stats.safetensors"
    cfg = compose("fuzzy_stats", [f"model.pretrained={tiny_model_dir}", "source=images",
                                  f"source.path={tmp_path / 'faces'}", DEPTHS, "batch_size=2", "progress=false",
                                  f"out={out}"], tmp_path / "run")
    assert cfg.N == 1000  # more than the folder holds: all 3 images are used
    tensors, meta = read_stats(compute_stats(cfg))
    assert meta["faces"] == {"dataset": "images", "path": str((tmp_path / "faces").resolve()), "resize": "exact"}
    assert meta["N"] == 3 and meta["depths"] == [20, 40] and meta["resolution"] == 16

    # reference: the same images decoded here, projected with the run's projection stream in the same batches
    y = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
    denoiser, gen = load_denoiser(str(tiny_model_dir)), stream_generator(0, "cpu", 1)
    errors = torch.cat([project_errors(denoiser, y[i:i + 2], [20, 40], gen, True, 50)[1] for i in (0, 2)]).double()
    torch.testing.assert_close(tensors["mean"], errors.mean(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(tensors["std"], errors.std(0, unbiased=False), rtol=1e-4, atol=1e-3)


def test_first_n_images_only(tiny_model_dir, tmp_path):
    write_faces(tmp_path / "faces", 3, 16)
    cfg = compose("fuzzy_stats", [f"model.pretrained={tiny_model_dir}", "source=images", "N=2", DEPTHS,
                                  f"source.path={tmp_path / 'faces'}", "progress=false", f"out={tmp_path / 's'}"],
                  tmp_path / "run")
    assert read_stats(compute_stats(cfg))[1]["N"] == 2


@pytest.mark.parametrize("case", ["size", "not_a_folder"])
def test_refusals_are_one_line_and_write_nothing(case, tiny_model_dir, tmp_path):
    folder = tmp_path / "faces"
    if case == "size":
        write_faces(folder, 2, 20)
        message = r"0.png: 20x20 px, the model needs 16x16; resize the images first or set source.resize=bicubic"
    else:
        message = r"source.path=.*faces.*no such folder"
    out = tmp_path / "stats.safetensors"
    with pytest.raises(InputError, match=message):
        compute_stats(compose("fuzzy_stats", [f"model.pretrained={tiny_model_dir}", "source=images", DEPTHS,
                                              f"source.path={folder}", "progress=false", f"out={out}"],
                              tmp_path / "run"))
    assert not out.exists()


@pytest.mark.slow  # a CLI process: ≈ 18 s on a shared 2-core machine
def test_cli_refuses_images_of_another_size(tiny_model_dir, tmp_path):
    write_faces(tmp_path / "faces", 2, 20)
    out = tmp_path / "stats.safetensors"
    result = run_cli("fuzzy_stats", f"model.pretrained={tiny_model_dir}", "source=images", DEPTHS,
                     f"source.path={tmp_path / 'faces'}", "progress=false", f"out={out}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "20x20 px, the model needs 16x16" in result.stderr
    assert not out.exists()
